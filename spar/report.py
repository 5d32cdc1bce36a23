"""What a training or evaluation run shows and leaves behind: progress, tables, files, plots.

* :class:`EpochProgress`: progress of training on rank 0. On a terminal a rich progress bar
  per epoch, redrawn in place, and one permanent summary line per epoch; anywhere else (a
  pipe, CI, a SLURM log) exactly one plain line per epoch and nothing per step, so logs stay
  readable and grep-able.
* :func:`render_table`: a two-column (name, value) table rendered by rich to a string, ASCII
  only when the output is not a terminal; its width never depends on the terminal's.
* :func:`append_history` / :func:`read_history`: ``history.csv``, one row per epoch
  (:data:`HISTORY_COLUMNS`). A resumed run that redoes an epoch replaces that epoch's row (and
  drops the later ones), so ``--resume`` continues the same file without duplicate rows.
* :func:`plot_training` (``training.png``), :func:`plot_reliability`,
  :func:`plot_uncertainty`: figures, written atomically; each returns ``False`` and writes
  nothing where matplotlib is not installed (a ``pip install --no-deps`` machine).
* :func:`save_predictions`: one ``.npz`` with a row per example (predicted class, mean
  predictive probabilities, predictive entropy, mutual information), loadable with plain
  ``np.load`` (no pickled objects).

Every file is written by temp-and-rename (:func:`spar._fs.atomic_write`): a crash leaves the
previous file, never a half-written one.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

import torch
from torch import Tensor

from spar import metrics
from spar._fs import atomic_write

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = [
    "HISTORY_COLUMNS",
    "PREDICTION_FIELDS",
    "EpochProgress",
    "append_history",
    "epoch_line",
    "plot_reliability",
    "plot_training",
    "plot_uncertainty",
    "read_history",
    "render_table",
    "save_predictions",
]

# ----------------------------------------------------------------------------- progress


def _present(summary: Mapping[str, Any], key: str) -> float | None:
    value = summary.get(key)
    return None if value is None else float(value)


def epoch_line(epoch: int, epochs: int, summary: Mapping[str, float | None]) -> str:
    """The one-line summary of an epoch, plain text (no colour, no box characters).

    ``epoch   3/12  loss 0.4123  acc 0.912  val acc 0.905  val ECE 0.031  1.10 s  1,234 ex/s``

    Args:
        epoch: the epoch, counting from 1.
        epochs: the number of epochs of the run.
        summary: ``loss``, ``acc``, ``val_accuracy``, ``val_ece``, ``seconds``, ``rate``
            (examples per second); a key that is missing or ``None`` (``val_*`` without a
            validation set) is left out of the line.
    """
    parts = [f"epoch {epoch:>3}/{epochs}"]
    fields = (
        ("loss", "loss {:.4f}"),
        ("acc", "acc {:.3f}"),
        ("val_accuracy", "val acc {:.3f}"),
        ("val_ece", "val ECE {:.3f}"),
        ("seconds", "{:.2f} s"),
        ("rate", "{:,.0f} ex/s"),
    )
    for key, fmt in fields:
        value = _present(summary, key)
        if value is not None:
            parts.append(fmt.format(value))
    return "  ".join(parts)


def _step_text(stats: Mapping[str, float]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("acc", "acc {:.3f}"), ("rate", "{:,.0f} ex/s")):
        value = _present(stats, key)
        if value is not None:
            parts.append(fmt.format(value))
    return "  ".join(parts)


class EpochProgress:
    """Progress of training on rank 0.

    On a terminal (``stream.isatty()``): a rich progress bar per epoch, redrawn in place
    (steps done/total, loss, accuracy, examples/s, elapsed and remaining time), and at each
    epoch's end one permanent summary line (:func:`epoch_line`). Not a terminal (a pipe, CI,
    a SLURM log): nothing per step and exactly one plain line per epoch (no ANSI codes, no
    box characters, no carriage returns). Disabled (``enabled=False``, every rank but 0):
    nothing at all.

    Use it as a context manager: leaving the block stops the live display (and rich's
    refresh thread), also when the block raises::

        with EpochProgress(rank == 0, epochs) as progress:
            for epoch in range(start, epochs):
                progress.start_epoch(epoch + 1, steps)
                for i in range(steps):
                    ...
                    progress.step(i + 1, {"loss": loss, "acc": acc, "rate": rate})
                progress.end_epoch({"loss": ..., "acc": ..., "val_accuracy": ...,
                                    "val_ece": ..., "seconds": ..., "rate": ...})

    Args:
        enabled: print anything at all.
        epochs: the number of epochs of the run (the ``/12`` of ``epoch 3/12``).
        stream: where to write; default ``sys.stderr`` (stdout stays for results).
    """

    def __init__(self, enabled: bool, epochs: int, *, stream: TextIO | None = None) -> None:
        self.enabled = bool(enabled)
        self.epochs = int(epochs)
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._epoch = 0

    # -- the live display (terminal only)

    def _live(self) -> Progress:
        """The rich progress display, started on first use."""
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("<", markup=False),
                TimeRemainingColumn(),
                console=console,
                refresh_per_second=5,
            )
        if not self._progress.live.is_started:
            self._progress.start()
        return self._progress

    def close(self) -> None:
        """Stop the live display and its refresh thread (idempotent)."""
        if self._progress is not None:
            # rich signals its refresh thread to end but does not wait for it; join it so
            # that no thread outlives the display (a private attribute: tolerate its absence)
            thread = getattr(self._progress.live, "_refresh_thread", None)
            self._progress.stop()
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._task = None

    def __enter__(self) -> EpochProgress:
        if self.enabled and self.tty:
            self._live()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events

    def start_epoch(self, epoch: int, steps: int) -> None:
        """An epoch begins.

        Args:
            epoch: the epoch, counting from 1.
            steps: the number of steps it will run.
        """
        self._epoch = int(epoch)
        if not (self.enabled and self.tty):
            return
        progress = self._live()
        if self._task is not None:  # the previous epoch never ended (no end_epoch call)
            progress.remove_task(self._task)
        self._task = progress.add_task(
            f"epoch {self._epoch:>3}/{self.epochs}", total=max(int(steps), 1), stats=""
        )

    def step(self, done: int, stats: Mapping[str, float]) -> None:
        """``done`` steps of the epoch are done; ``stats``: ``loss``, ``acc``, ``rate``
        (examples/s) so far. Redraws the bar on a terminal, does nothing elsewhere."""
        if not (self.enabled and self.tty) or self._task is None:
            return
        self._live().update(self._task, completed=int(done), stats=_step_text(stats))

    def end_epoch(self, summary: Mapping[str, float | None]) -> None:
        """The epoch ended: write its summary line (see :func:`epoch_line` for the keys)."""
        if not self.enabled:
            return
        line = epoch_line(self._epoch, self.epochs, summary)
        if not self.tty:
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        progress = self._live()
        if self._task is not None:
            progress.remove_task(self._task)
            self._task = None
            progress.refresh()  # the finished bar goes now, not at the next timed refresh
        # printed through the live console: it lands above the bar and stays
        progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


class TaskProgress(EpochProgress):
    """Progress of one long task (``spar eval`` evaluating a split) on rank 0: a rich bar of
    the items done on a terminal; elsewhere nothing while it runs. When the task ends without
    an error, one plain line ``"<description>: <total> done in <seconds> s"`` stays in both.

    Args:
        enabled: print anything at all.
        description: what is done, e.g. ``"evaluating test (10,000 examples, S=64)"``.
        total: the number of items (examples).
        stream: where to write; default ``sys.stderr``.
    """

    def __init__(
        self, enabled: bool, description: str, total: int, *, stream: TextIO | None = None
    ) -> None:
        super().__init__(enabled, 1, stream=stream)
        self.description, self.total = str(description), int(total)
        self._t0 = time.perf_counter()

    def __enter__(self) -> TaskProgress:
        self._t0 = time.perf_counter()
        if self.enabled and self.tty:
            total = max(self.total, 1)
            self._task = self._live().add_task(self.description, total=total, stats="")
        return self

    def advance(self, done: int) -> None:
        """``done`` items of ``total`` are done (redraws the bar on a terminal)."""
        if self.enabled and self.tty and self._task is not None:
            self._live().update(self._task, completed=int(done))

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if self.enabled and exc_type is None:
                seconds = time.perf_counter() - self._t0
                line = f"{self.description}: {self.total:,} done in {seconds:.1f} s"
                if self.tty and self._progress is not None:
                    if self._task is not None:
                        self._progress.remove_task(self._task)
                        self._task = None
                        self._progress.refresh()
                    self._progress.console.print(line, markup=False, highlight=False)
                else:
                    self.stream.write(line + "\n")
                    self.stream.flush()
        finally:
            self.close()


# ----------------------------------------------------------------------------- tables


def render_table(
    rows: Sequence[tuple[str, str]], *, title: str | None = None, plain: bool = False
) -> str:
    """A two-column table (name left, value right-aligned) rendered by rich to a string.

    The width is the content's (the console rendering it is sized to fit), never the
    terminal's or ``$COLUMNS``, so the same report looks the same everywhere.

    Args:
        rows: ``(name, value)`` pairs, already formatted.
        title: a line centred above the table.
        plain: ASCII only (``+--+`` borders, no colour, no ANSI codes): for logs, files and
            anything that is not a terminal. Otherwise rounded box characters and colour.

    Returns:
        The table's lines joined by ``\\n``, no trailing newline or trailing spaces.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = [(str(name), str(value)) for name, value in rows]
    table = Table(
        box=box.ASCII if plain else box.ROUNDED,
        show_header=False,
        title=title,
        title_style="" if plain else "bold",
        min_width=len(title) + 4 if title else None,
    )
    table.add_column("name", style="" if plain else "cyan", no_wrap=True)
    table.add_column("value", justify="right", style="" if plain else "bold", no_wrap=True)
    for name, value in rows:
        table.add_row(name, value)
    longest = [max((len(r[i]) for r in rows), default=0) for i in (0, 1)]
    width = sum(longest) + len(title or "") + 16  # cells, padding and borders, with room
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width,
        height=25,
        force_terminal=not plain,
        color_system=None if plain else "standard",
        no_color=plain,
        highlight=False,
        emoji=False,
        markup=False,
        legacy_windows=False,
        force_jupyter=False,
        force_interactive=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").split("\n"))


# ----------------------------------------------------------------------------- history.csv

HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "nll",
    "kl",
    "val_accuracy",
    "val_nll",
    "val_ece",
    "seconds",
    "samples_per_s",
    "peak_memory_mib",
)
"""The columns of ``history.csv``, in order: the epoch (from 1); the training loss, its
negative log-likelihood and KL terms (means over the epoch); accuracy, NLL and ECE on the
validation set (empty without one); the epoch's wall seconds, training examples per second
and peak memory (MiB)."""


def _parse_cell(text: str, column: str, where: str) -> float | int | None:
    if text == "":
        return None
    try:
        if column == "epoch":
            return int(text)
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} holds {text!r}, expected a number") from None


def read_history(path: str | os.PathLike) -> list[dict[str, float | None]]:
    """The rows of a ``history.csv``: one dict per epoch with every :data:`HISTORY_COLUMNS`
    key; ``epoch`` an int, the others floats, ``None`` for empty cells. ``[]`` when the file
    is missing or empty.

    Raises:
        ValueError: the file has another header (not a spar history) or a malformed row;
            the message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return []
    if tuple(lines[0]) != HISTORY_COLUMNS:
        raise ValueError(
            f"{path} is not a spar history file: its header is {','.join(lines[0])!r}, "
            f"expected {','.join(HISTORY_COLUMNS)!r}"
        )
    rows = []
    for number, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        where = f"{path} line {number}"
        if len(cells) != len(HISTORY_COLUMNS):
            raise ValueError(f"{where} has {len(cells)} cells, expected {len(HISTORY_COLUMNS)}")
        rows.append(
            {c: _parse_cell(t, c, where) for c, t in zip(HISTORY_COLUMNS, cells, strict=True)}
        )
    return rows


def _format_cell(value: Any, column: str) -> str:
    if value is None:
        return ""
    if column == "epoch":
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"history row: epoch must be an int >= 1, got {value!r}")
        return str(int(value))
    if isinstance(value, bool):
        raise TypeError(f"history row: {column} must be a number, got a bool")
    try:
        number = float(value)  # python/numpy numbers and 0-dim tensors
    except (TypeError, ValueError):
        raise TypeError(
            f"history row: {column} must be a number or None, got {type(value).__name__}"
        ) from None
    return repr(number)  # the shortest text that reads back to the same float


def append_history(
    path: str | os.PathLike, row: Mapping[str, Any], *, resume_from: int | None = None
) -> None:
    """Add the row of an epoch to ``history.csv``, rewriting the file atomically.

    The new file holds the existing rows whose epoch is below ``row["epoch"]``, then ``row``:
    a resumed run that redoes an epoch replaces that epoch's row and drops any later ones
    (written by the run that died after its last checkpoint), so the file never holds an
    epoch twice. Floats are written with ``repr`` and read back bit for bit.

    Args:
        path: the CSV file; created with its header when missing.
        row: ``epoch`` (an int >= 1, required) and any of the other :data:`HISTORY_COLUMNS`;
            missing keys and ``None`` are written as empty cells.
        resume_from: optional: drop the rows with ``epoch > resume_from`` first (the epoch
            a checkpoint holds). The rule above already removes every row at or after
            ``row["epoch"]``, so a resumed run needs this only to cut rows that the new row's
            epoch would not (a resume to an epoch below ``row["epoch"] - 1``).

    Raises:
        ValueError: an unknown key, a missing or invalid epoch, or an existing file with
            another header (a foreign CSV is never overwritten).
    """
    unknown = sorted(set(row) - set(HISTORY_COLUMNS))
    if unknown:
        raise ValueError(
            f"history row has unknown keys {unknown}; expected a subset of {list(HISTORY_COLUMNS)}"
        )
    if row.get("epoch") is None:
        raise ValueError("history row: 'epoch' is required")
    cells = [_format_cell(row.get(c), c) for c in HISTORY_COLUMNS]
    epoch = int(row["epoch"])
    path = Path(path)
    kept = read_history(path)  # raises for a foreign file before anything is written
    if resume_from is not None:
        kept = [r for r in kept if r["epoch"] <= resume_from]
    kept = [r for r in kept if r["epoch"] < epoch]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for r in kept:
        writer.writerow([_format_cell(r[c], c) for c in HISTORY_COLUMNS])
    writer.writerow(cells)
    atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------- figures


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    def write(f: IO[bytes]) -> None:
        fig.savefig(f, format="png", dpi=120)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows where ``key`` holds a finite number."""
    xs, ys = [], []
    for r in rows:
        value = r.get(key)
        if value is None or r.get("epoch") is None:
            continue
        value = float(value)
        if math.isfinite(value):
            xs.append(float(r["epoch"]))
            ys.append(value)
    return xs, ys


def plot_training(rows: Sequence[Mapping], path: str | os.PathLike) -> bool:
    """``training.png``: the training curves of :func:`read_history`'s rows.

    Left panel: loss and NLL per epoch on the left axis, the KL term on a second (right)
    axis: the KL of a mean-field posterior is a sum over all weights, usually orders of
    magnitude above the NLL, and would flatten the other curves on a shared axis. Right
    panel: validation accuracy and ECE per epoch (both in [0, 1]); a note instead where no
    row has validation values. Missing (``None``) values are skipped.

    Returns:
        ``True`` when the file was written; ``False`` (nothing written) when ``rows`` is
        empty or matplotlib is not installed.
    """
    if not rows:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    handles = []
    for key, label in (("loss", "loss"), ("nll", "NLL")):
        xs, ys = _series(rows, key)
        if xs:
            handles += left.plot(xs, ys, marker=".", label=label)
    xs, ys = _series(rows, "kl")
    if xs:
        kl_axis = left.twinx()
        handles += kl_axis.plot(xs, ys, marker=".", color="tab:red", label="KL (right axis)")
        kl_axis.set_ylabel("KL")
    left.set(xlabel="epoch", ylabel="loss / NLL", title="Training")
    if handles:
        left.legend(handles=handles, loc="upper right")
    plotted = False
    for key, label in (("val_accuracy", "accuracy"), ("val_ece", "ECE")):
        xs, ys = _series(rows, key)
        if xs:
            right.plot(xs, ys, marker=".", label=label)
            plotted = True
    right.set(xlabel="epoch", title="Validation")
    if plotted:
        right.set_ylim(0, 1)
        right.legend(loc="center right")
    else:
        right.text(0.5, 0.5, "no validation set", ha="center", va="center",
                   transform=right.transAxes)  # fmt: skip
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def plot_reliability(rel: metrics.ECEResult, ece: float, path: str | os.PathLike) -> bool:
    """A reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration, the ECE in the title.

    Args:
        rel: :func:`spar.metrics.reliability`'s bins.
        ece: the expected calibration error shown in the title.
        path: the PNG to write.

    Returns:
        ``True`` when written, ``False`` (nothing written) without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return False
    edges = rel.bin_edges.detach().cpu().double().tolist()
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    accuracy = rel.bin_accuracy.detach().cpu().double().nan_to_num(0.0).tolist()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, accuracy, width=edges[1] - edges[0], edgecolor="k", alpha=0.7,
           label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (ECE {float(ece):.3f})")  # fmt: skip
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def plot_uncertainty(
    mi_in: Tensor,
    mi_out: Tensor | None,
    auroc: float | None,
    path: str | os.PathLike,
    *,
    in_label: str,
    out_label: str | None,
) -> bool:
    """Histograms (densities) of the mutual information (epistemic uncertainty) of
    in-distribution inputs and, where given, of out-of-distribution inputs.

    Args:
        mi_in: ``(N,)`` mutual information of the in-distribution inputs, nats.
        mi_out: ``(M,)`` of the OOD inputs, or ``None`` (no OOD set: one histogram).
        auroc: the OOD AUROC shown in the title; ``None`` leaves it out.
        path: the PNG to write.
        in_label: legend label of ``mi_in``, e.g. ``"digits 0-7 (test)"``.
        out_label: legend label of ``mi_out``, e.g. ``"held-out classes 8, 9 (OOD)"``;
            ``"OOD"`` when ``None``.

    Returns:
        ``True`` when written, ``False`` (nothing written) without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return False
    values_in = torch.as_tensor(mi_in).detach().cpu().double().flatten()
    values_out = None
    if mi_out is not None:
        values_out = torch.as_tensor(mi_out).detach().cpu().double().flatten()
    top = max(float(v.max()) for v in (values_in, values_out) if v is not None and v.numel())
    bins = torch.linspace(0, top or 1e-6, 31).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.hist(values_in.tolist(), bins=bins, alpha=0.6, density=True, label=in_label)
    if values_out is not None:
        ax.hist(values_out.tolist(), bins=bins, alpha=0.6, density=True,
                label=out_label or "OOD")  # fmt: skip
    title = "Epistemic uncertainty"
    if values_out is not None and auroc is not None:
        title += f" (OOD AUROC {float(auroc):.3f})"
    ax.set(xlabel="mutual information (nats)", ylabel="density", title=title)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- predictions


PREDICTION_FIELDS = (
    "split",
    "index",
    "label",
    "predicted",
    "probs",
    "confidence",
    "entropy",
    "mutual_information",
)
"""The arrays of :func:`save_predictions`' file, in order."""


def save_predictions(
    path: str | os.PathLike, splits: Mapping[str, tuple[Tensor, Tensor | None]]
) -> int:
    """Write the per-example predictions of one or more splits to one ``.npz`` file.

    Each example is a row; the arrays run over the splits in the order given:

    * ``split``: the split's name (fixed-width unicode), ``index``: position in its split;
    * ``label``: int64, ``-1`` where unknown (e.g. OOD inputs);
    * ``predicted``: int64, the argmax of ``probs``;
    * ``probs``: float32 ``(N, C)``, the predictive (mean over the ``S`` samples) class
      probabilities (:func:`spar.metrics.predictive_probs`); ``confidence`` its maximum;
    * ``entropy``: predictive entropy, ``mutual_information``: mutual information between
      label and weights (float32, nats; :func:`spar.metrics.predictive_entropy`,
      :func:`spar.metrics.mutual_information`).

    Read it with ``np.load(path)`` (no ``allow_pickle``); ``pandas.DataFrame({k: d[k] for k
    in d.files if k != "probs"})`` gives a table.

    Args:
        path: the file to write (atomically; the name is used as given, no ``.npz`` added).
        splits: ``{name: (logits, labels)}``; ``logits`` ``(S, N, C)`` with the same ``C``
            in every split, ``labels`` ``(N,)`` integer class labels or ``None``.

    Returns:
        The number of rows written.
    """
    import numpy as np

    if not splits:
        raise ValueError("splits is empty: expected at least one {name: (logits, labels)}")
    columns: dict[str, list] = {k: [] for k in PREDICTION_FIELDS}
    classes = None
    for name, pair in splits.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"splits[{name!r}] must be a (logits, labels) tuple")
        logits, labels = pair
        where = f"splits[{name!r}]"
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"{where} logits must be a tensor (S, N, C), got {shape}")
        if classes is not None and logits.shape[2] != classes:
            raise ValueError(f"{where} logits have {logits.shape[2]} classes, expected {classes}")
        classes = logits.shape[2]
        n = logits.shape[1]
        if labels is None:
            label = np.full(n, -1, dtype=np.int64)
        else:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
                raise ValueError(
                    f"{where} labels must be integers of shape ({n},), got "
                    f"{labels.dtype} {tuple(labels.shape)}"
                )
            label = labels.detach().cpu().numpy().astype(np.int64)
            if n and (label.min() < 0 or label.max() >= logits.shape[2]):
                raise ValueError(f"{where} labels must lie in [0, {logits.shape[2]})")
        with torch.no_grad():
            logits = logits.detach().cpu()
            probs = metrics.predictive_probs(logits)
            confidence, predicted = probs.max(-1)
            entropy = metrics.predictive_entropy(logits)
            mi = metrics.mutual_information(logits)
        columns["split"].append(np.full(n, name))
        columns["index"].append(np.arange(n, dtype=np.int64))
        columns["label"].append(label)
        columns["predicted"].append(predicted.numpy().astype(np.int64))
        columns["probs"].append(probs.float().numpy())
        columns["confidence"].append(confidence.float().numpy())
        columns["entropy"].append(entropy.float().numpy())
        columns["mutual_information"].append(mi.float().numpy())
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    width = max(len(str(name)) for name in splits)
    arrays["split"] = arrays["split"].astype(f"<U{max(width, 1)}")

    def write(f: IO[bytes]) -> None:
        np.savez(f, **arrays)

    atomic_write(path, write)
    return int(arrays["index"].shape[0])
