"""What ``spar train`` and ``spar eval`` share: the data and model of a config, the full
predictive and its metrics, the files of a report, and small helpers of a rank.

Both jobs take the dataset and the model from the same options (``dataset``, ``data_dir``,
``ood_classes``, ``ood``, ``val_fraction``, ``model``, ``init_sigma``; see
:class:`spar.train.TrainConfig`), so a checkpoint's stored config rebuilds exactly what it
was trained on. Nothing here starts processes; the jobs live in :mod:`spar.train` and
:mod:`spar.evaluation`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spar import datasets, metrics, models
from spar import report as rep
from spar._fs import atomic_write
from spar.telemetry import Telemetry

# sample-examples one forward pass of the evaluation holds (examples per chunk times local
# samples): bounds the activations of a full-predictive pass over a large test set
EVAL_CHUNK = 4096


class SetupError(ValueError):
    """A problem found before training or evaluation starts (an option, the data, the model,
    the output folder, the checkpoint, memory, ranks that disagree): the command line prints
    it as one line, exit 2."""


def flag(name: str) -> str:
    """The command-line spelling of option ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """``--ood-classes`` ("8,9"; "none" or "" for none) as class ids; ``None`` when unset
    (the dataset's default)."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SetupError(
            f"--ood-classes must be class ids separated by commas (e.g. 8,9) or none; got {text!r}"
        ) from None
    if len(set(ids)) != len(ids):
        raise SetupError(f"--ood-classes lists a class twice: {text!r}")
    return ids


def held_out_classes(cfg: Any) -> tuple[int, ...]:
    """The classes ``cfg`` holds out of training (``--ood-classes``, else the dataset's
    default), sorted: what a checkpoint records and ``--resume`` compares."""
    held = parse_classes(cfg.ood_classes)
    return datasets.default_ood_classes(cfg.dataset) if held is None else tuple(sorted(held))


def format_classes(held: tuple[int, ...]) -> str:
    """``(8, 9)`` -> ``"8,9"``; ``()`` -> ``"none"`` (the ``--ood-classes`` spelling)."""
    return ",".join(map(str, held)) or "none"


def load_data(cfg: Any, *, hint: str = "") -> datasets.Splits:
    """The dataset of ``cfg`` (a :class:`spar.train.TrainConfig`); :class:`SetupError` with the
    loader's one line for anything wrong with the folder, file or arrays (and ``hint``)."""
    try:
        return datasets.load(
            cfg.dataset, cfg.data_dir, seed=cfg.seed, ood_classes=held_out_classes(cfg),
            ood=cfg.ood, val_fraction=cfg.val_fraction,
        )  # fmt: skip
    except (datasets.DatasetError, ValueError) as e:
        raise SetupError(f"{e}{hint}") from None


def build_model(cfg: Any, splits: datasets.Splits) -> nn.Module:
    """The Bayesian model of ``cfg`` for the shapes of ``splits``; :class:`SetupError` for an
    unknown model or one that cannot take these inputs."""
    try:
        return models.build(
            cfg.model, splits.input_shape, splits.num_classes, init_sigma=cfg.init_sigma
        )
    except (models.ModelError, ValueError) as e:
        message = str(e)
        prefix = f"--model {cfg.model}"
        message = message if message.startswith(prefix) else f"{prefix}: {message}"
        raise SetupError(message) from None


# ----------------------------------------------------------------------------- ranks


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_object(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def dist_backend(device: str) -> str:
    """The ``torch.distributed`` backend for ranks on ``device``: NCCL for CUDA, gloo for the
    CPU (not "NCCL whenever CUDA is available": a CPU run on a GPU machine stays on the CPU)."""
    return "nccl" if device == "cuda" else "gloo"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: through pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def peak_memory(device: torch.device, tel: Telemetry) -> tuple[float, str]:
    """(peak bytes of this rank, what was measured)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda allocator"
    return float(tel.summary().peak_rss), "resident set"


@contextlib.contextmanager
def reason_for_os_errors(what: str, note: str = "the last complete checkpoint is intact"):
    """Re-raise an ``OSError`` (a full disk, a folder gone read-only) as one that says what
    could not be written (and ``note``: by default, that the last complete checkpoint is
    intact)."""
    try:
        yield
    except OSError as e:
        message = f"{what}: {e.strerror}" + (f"; {note}" if note else "")
        raise OSError(e.errno, message) from e


# ----------------------------------------------------------------------------- predictive


def predictive(sp, x: torch.Tensor, progress=None) -> torch.Tensor:
    """All ``S`` samples of the predictive of ``x``: ``(S, N, C)`` float32 on the CPU, on
    every rank (``x`` must not be empty).

    :meth:`SampleParallel.predict` (eval mode; every module's mode restored after) for a whole
    evaluation set: the examples are split over the data axis (data rank ``j``
    takes the ``j``-th contiguous block) and gathered back, the samples over the sample axis;
    each rank runs its block in chunks that keep about :data:`EVAL_CHUNK` sample-examples per
    pass. Per-example noise (``lrt``, ``flipout``) is keyed by the example's index in ``x``,
    so the result depends neither on the chunking nor on the grid. Every rank must call it
    with the same ``x``. ``progress``: an object whose ``advance(done)`` is called after each
    chunk with this rank's examples done (:class:`spar.report.TaskProgress`)."""
    grid = sp.grid
    split = 1 < grid.data <= len(x)  # fewer examples than data ranks: each rank does all
    bounds = [len(x) * j // grid.data for j in range(grid.data + 1)] if split else [0, len(x)]
    lo, hi = (bounds[grid.data_rank], bounds[grid.data_rank + 1]) if split else (0, len(x))
    chunk = max(1, EVAL_CHUNK // max(1, sp.num_samples // grid.sample))
    parts = []
    for start in range(lo, hi, chunk):
        parts.append(sp._predict(to_device(x[start : min(hi, start + chunk)], grid.device), start))
        if progress is not None:  # this rank's share, scaled to the whole set
            progress.advance((min(hi, start + chunk) - lo) * len(x) // (hi - lo))
    mine = torch.cat(parts, dim=1)
    if split:
        with torch.no_grad():
            mine = _gather_examples(mine, bounds, grid)
    return mine.float().cpu()


def _gather_examples(mine: torch.Tensor, bounds: list[int], grid) -> torch.Tensor:
    """The ``(S, n_j, C)`` blocks of every data rank, concatenated in data-rank order (padded
    to the largest block for the collective: ``all_gather`` wants equal shapes)."""
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    width = max(sizes)
    padded = torch.zeros(mine.shape[0], width, *mine.shape[2:], dtype=mine.dtype,
                         device=mine.device)  # fmt: skip
    padded[:, : mine.shape[1]] = mine
    blocks = [torch.empty_like(padded) for _ in range(grid.data)]
    dist.all_gather(blocks, padded, group=grid.data_group)
    return torch.cat([b[:, :size] for b, size in zip(blocks, sizes, strict=True)], dim=1)


def validation(sp, splits: datasets.Splits) -> dict[str, float | None]:
    """Accuracy, NLL and ECE of the full predictive on the validation split (``None`` each
    without one); leaves the model in the mode it found it in."""
    if splits.x_val is None or len(splits.x_val) == 0:
        return {"val_accuracy": None, "val_nll": None, "val_ece": None}
    logits = predictive(sp, splits.x_val)
    return {
        "val_accuracy": float(metrics.accuracy(logits, splits.y_val)),
        "val_nll": float(metrics.nll(logits, splits.y_val)),
        "val_ece": float(metrics.ece(logits, splits.y_val)),
    }


def evaluate(sp, splits: datasets.Splits, progress=None) -> dict:
    """Metrics of the full predictive (all S samples gathered) on the test set and, where
    the data has one, the OOD set. Private entries (``_``-prefixed) carry what the plots
    and the predictions file need. ``progress(split, examples)``: a context manager shown
    while a split is evaluated (:class:`spar.report.TaskProgress`), or None."""

    def run(name: str, x: torch.Tensor) -> torch.Tensor:
        if progress is None:
            return predictive(sp, x)
        with progress(name, len(x)) as shown:
            return predictive(sp, x, shown)

    sp.eval()
    logits = run("test", splits.x_test)
    y = splits.y_test
    rel = metrics.reliability(logits, y)
    out = {
        "accuracy": float(metrics.accuracy(logits, y)),
        "nll": float(metrics.nll(logits, y)),
        "ece": float(rel.ece),
        "brier": float(metrics.brier(logits, y)),
        "ood_auroc_mutual_information": None,
        "ood_auroc_predictive_entropy": None,
        "_reliability": rel,
        "_logits": {"test": (logits, y)},
        "_mi": (metrics.mutual_information(logits), None),
    }
    if splits.x_ood is not None and len(splits.x_ood):
        logits_ood = run("OOD", splits.x_ood)
        mi_in, mi_out = out["_mi"][0], metrics.mutual_information(logits_ood)
        pe_in, pe_out = metrics.predictive_entropy(logits), metrics.predictive_entropy(logits_ood)
        out["ood_auroc_mutual_information"] = float(metrics.ood_auroc(mi_in, mi_out))
        out["ood_auroc_predictive_entropy"] = float(metrics.ood_auroc(pe_in, pe_out))
        out["_mi"] = (mi_in, mi_out)
        out["_logits"]["ood"] = (logits_ood, None)
    return out


def _fixed(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def report_rows(report: Mapping) -> list[tuple[str, str]]:
    """The rows of the printed report: test metrics, OOD AUROC where there is an OOD set,
    then whatever timing and memory figures ``report`` holds."""
    rows = [
        ("test accuracy", _fixed(report["accuracy"], ".4f")),
        ("test NLL", _fixed(report["nll"], ".4f")),
        ("test ECE", _fixed(report["ece"], ".4f")),
        ("test Brier", _fixed(report["brier"], ".4f")),
    ]
    if report.get("ood_auroc_mutual_information") is not None:
        for key, words in (("mutual_information", "mutual information"),
                           ("predictive_entropy", "predictive entropy")):  # fmt: skip
            rows.append((f"OOD AUROC ({words})", _fixed(report[f"ood_auroc_{key}"], ".4f")))
    if "seconds_per_epoch" in report:
        rows += [
            ("time per epoch (excl. warm-up)", _seconds(report["seconds_per_epoch"])),
            ("first epoch (incl. warm-up)", _seconds(report["seconds_first_epoch"])),
        ]
    rows += [
        (f"peak memory rank {r}", f"{mb:.0f} MiB")
        for r, mb in enumerate(report.get("peak_memory_mib", []))
    ]
    return rows


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def print_report(report: Mapping, *, title: str | None = None) -> None:
    """The report table on stdout: rich's table on a terminal, ASCII in a log."""
    plain = not sys.stdout.isatty()
    print(rep.render_table(report_rows(report), title=title, plain=plain), flush=True)


def write_report(out: Path, report: dict, splits: datasets.Splits) -> list[str]:
    """The reliability and uncertainty figures and ``metrics.json`` (the public entries of
    ``report``) in ``out``; returns the names written, ``metrics.json`` last. No figures
    (a note on stderr) where matplotlib is not installed."""
    files = []
    if rep.plot_reliability(report["_reliability"], report["ece"], out / "reliability.png"):
        files.append("reliability.png")
    mi_in, mi_out = report["_mi"]
    names = splits.class_names
    in_label = f"{splits.name} {names[0]}-{names[-1]} (test)" if names else "test"
    if rep.plot_uncertainty(
        mi_in, mi_out, report["ood_auroc_mutual_information"], out / "uncertainty.png",
        in_label=in_label, out_label=None if mi_out is None else f"{splits.ood_name} (OOD)",
    ):  # fmt: skip
        files.append("uncertainty.png")
    if not files:
        print("matplotlib is not installed: no plots", file=sys.stderr)
    return files


def write_metrics(out: Path, public: dict) -> None:
    atomic_write(out / "metrics.json", json.dumps(public, indent=2) + "\n")


def public(report: Mapping) -> dict:
    """``report`` without its private (``_``-prefixed) entries."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
