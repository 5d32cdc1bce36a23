"""spar.report: progress output, tables, history.csv, figures and the predictions file."""

from __future__ import annotations

import io
import sys
import threading

import numpy as np
import pytest
import torch

from spar import metrics
from spar.report import (
    HISTORY_COLUMNS,
    EpochProgress,
    append_history,
    epoch_line,
    plot_reliability,
    plot_training,
    plot_uncertainty,
    read_history,
    render_table,
    save_predictions,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SUMMARY = {
    "loss": 0.4123,
    "acc": 0.912,
    "val_accuracy": 0.905,
    "val_ece": 0.031,
    "seconds": 1.1,
    "rate": 1234.0,
}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _rich_threads() -> list[threading.Thread]:
    from rich.live import _RefreshThread

    return [t for t in threading.enumerate() if isinstance(t, _RefreshThread) and t.is_alive()]


def _run_epochs(progress: EpochProgress, epochs: int, steps: int = 4) -> None:
    for epoch in range(1, epochs + 1):
        progress.start_epoch(epoch, steps)
        for done in range(1, steps + 1):
            progress.step(done, {"loss": 1.0 / done, "acc": 0.5, "rate": 100.0 * done})
        progress.end_epoch(dict(SUMMARY, loss=SUMMARY["loss"] + epoch))


# ----------------------------------------------------------------------------- progress


def test_epoch_line_format():
    assert epoch_line(3, 12, SUMMARY) == (
        "epoch   3/12  loss 0.4123  acc 0.912  val acc 0.905  val ECE 0.031  1.10 s  1,234 ex/s"
    )
    no_val = dict(SUMMARY, val_accuracy=None, val_ece=None)
    assert epoch_line(3, 12, no_val) == "epoch   3/12  loss 0.4123  acc 0.912  1.10 s  1,234 ex/s"


def test_progress_not_a_tty_one_plain_line_per_epoch():
    stream = io.StringIO()
    with EpochProgress(True, 3, stream=stream) as progress:
        _run_epochs(progress, 3)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.isascii()
    lines = text.splitlines()
    assert lines == [epoch_line(e, 3, dict(SUMMARY, loss=SUMMARY["loss"] + e)) for e in (1, 2, 3)]
    assert text.endswith("\n")
    assert progress._progress is None  # rich never started


def test_progress_disabled_prints_nothing():
    for stream in (io.StringIO(), FakeTTY()):
        with EpochProgress(False, 2, stream=stream) as progress:
            _run_epochs(progress, 2)
        assert stream.getvalue() == ""
    assert not _rich_threads()


def test_progress_default_stream_is_stderr(capsys):
    with EpochProgress(True, 1) as progress:
        _run_epochs(progress, 1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [epoch_line(1, 1, dict(SUMMARY, loss=SUMMARY["loss"] + 1))]


def test_progress_tty_shows_bar_and_summary_lines():
    stream = FakeTTY()
    with EpochProgress(True, 2, stream=stream) as progress:
        assert progress._progress is not None and progress._progress.live.is_started
        _run_epochs(progress, 2)
    assert not progress._progress.live.is_started
    assert not _rich_threads()
    text = stream.getvalue()
    for epoch in (1, 2):
        assert epoch_line(epoch, 2, dict(SUMMARY, loss=SUMMARY["loss"] + epoch)) in text
    assert "\x1b" in text  # the live bar: redrawn in place with terminal control codes
    assert "/4" in text  # steps done/total (the epoch lines read "/2")


def test_progress_tty_stops_on_exception():
    stream = FakeTTY()
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="boom"):
        with EpochProgress(True, 5, stream=stream) as progress:
            progress.start_epoch(1, 10)
            progress.step(3, {"loss": 0.5, "acc": 0.5, "rate": 10.0})
            assert _rich_threads()
            raise RuntimeError("boom")
    assert not progress._progress.live.is_started
    assert not _rich_threads()
    assert (sys.stdout, sys.stderr) == (stdout, stderr)  # rich's redirection undone
    # a later call after the display stopped does not raise or restart a thread for nothing
    progress.close()
    assert not _rich_threads()


# ----------------------------------------------------------------------------- tables

ROWS = [
    ("test accuracy", "0.9123"),
    ("OOD AUROC (mutual information)", "0.8765"),
    ("peak memory rank 0", "123 MiB"),
]


def test_render_table_plain_is_ascii_with_every_cell(monkeypatch):
    text = render_table(ROWS, title="spar train", plain=True)
    assert text.isascii()
    assert "\x1b" not in text
    assert "spar train" in text
    lines = text.splitlines()
    for name, value in ROWS:
        (line,) = [ln for ln in lines if name in ln]
        assert line.rstrip(" |").endswith(value)  # right-aligned value column
    assert lines[1].startswith("+") and lines[-1].startswith("+")
    # the width is the content's, not the terminal's
    for columns in ("20", "300"):
        monkeypatch.setenv("COLUMNS", columns)
        assert render_table(ROWS, title="spar train", plain=True) == text
    widths = {len(ln) for ln in lines[1:]}
    assert len(widths) == 1 and widths.pop() < 80


def test_render_table_rich_and_long_title(monkeypatch):
    fancy = render_table(ROWS, title="spar train")
    for name, value in ROWS:
        assert name in fancy and value in fancy
    monkeypatch.setenv("COLUMNS", "10")
    assert render_table(ROWS, title="spar train") == fancy
    title = "a title much longer than the table under it"
    text = render_table([("a", "1")], title=title, plain=True)
    assert title in text.splitlines()[0]


# ----------------------------------------------------------------------------- history.csv


def _row(epoch: int, scale: float = 1.0) -> dict:
    return {
        "epoch": epoch,
        "loss": scale * (1 / 3 + epoch),
        "nll": scale * 0.1234567890123456789 * epoch,
        "kl": scale * 12345.678901234567,
        "val_accuracy": 0.9 + 1e-12 * epoch,
        "val_nll": 0.25,
        "val_ece": 0.0123456789,
        "seconds": 1.0000000001,
        "samples_per_s": 1234.5,
        "peak_memory_mib": 321.0,
    }


def test_history_round_trip_and_resume(tmp_path):
    path = tmp_path / "history.csv"
    assert read_history(path) == []
    for epoch in (1, 2, 3):
        append_history(path, _row(epoch))
    rows = read_history(path)
    assert rows == [_row(e) for e in (1, 2, 3)]  # floats read back bit for bit
    assert all(type(r["epoch"]) is int for r in rows)
    assert path.read_text().splitlines()[0] == ",".join(HISTORY_COLUMNS)

    append_history(path, _row(2, scale=2.0))  # a resumed run redoes epoch 2
    assert read_history(path) == [_row(1), _row(2, scale=2.0)]
    assert len(path.read_text().splitlines()) == 3

    append_history(path, _row(3), resume_from=1)  # epoch 2 dropped as well
    assert [r["epoch"] for r in read_history(path)] == [1, 3]
    assert not list(tmp_path.glob(".*.tmp"))


def test_history_none_cells_and_missing_keys(tmp_path):
    path = tmp_path / "history.csv"
    append_history(path, {"epoch": 1, "loss": 0.5, "val_accuracy": None, "kl": np.float32(2.5)})
    append_history(path, {"epoch": 2, "loss": torch.tensor(0.25)})
    (first, second) = read_history(path)
    assert first["loss"] == 0.5 and first["kl"] == 2.5
    assert first["val_accuracy"] is None and first["val_ece"] is None
    assert second == {c: None for c in HISTORY_COLUMNS} | {"epoch": 2, "loss": 0.25}
    assert path.read_text().splitlines()[2] == "2,0.25" + "," * (len(HISTORY_COLUMNS) - 2)


def test_history_rejects_bad_rows_and_foreign_files(tmp_path):
    path = tmp_path / "history.csv"
    with pytest.raises(ValueError, match="unknown keys \\['accuracy'\\]"):
        append_history(path, {"epoch": 1, "accuracy": 0.5})
    with pytest.raises(ValueError, match="epoch"):
        append_history(path, {"loss": 0.5})
    with pytest.raises(ValueError, match="epoch must be an int"):
        append_history(path, {"epoch": 0, "loss": 0.5})
    with pytest.raises(TypeError, match="loss must be a number"):
        append_history(path, {"epoch": 1, "loss": "low"})
    assert not path.exists()

    foreign = tmp_path / "results.csv"
    foreign.write_text("name,score\nalice,3\n")
    with pytest.raises(ValueError, match="results.csv is not a spar history file"):
        append_history(foreign, _row(1))
    with pytest.raises(ValueError, match="results.csv"):
        read_history(foreign)
    assert foreign.read_text() == "name,score\nalice,3\n"  # untouched


# ----------------------------------------------------------------------------- figures


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_training(tmp_path):
    path = tmp_path / "training.png"
    rows = [_row(e) for e in (1, 2, 3)]
    rows[0]["val_ece"] = None
    assert plot_training(rows, path) is True and _is_png(path)
    no_val = [{"epoch": e, "loss": 1.0 / e, "nll": None, "kl": None} for e in (1, 2)]
    other = tmp_path / "no_val.png"
    assert plot_training(no_val, other) is True and _is_png(other)
    empty = tmp_path / "empty.png"
    assert plot_training([], empty) is False
    assert not empty.exists()


def test_plots_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    path = tmp_path / "training.png"
    assert plot_training([_row(1)], path) is False
    assert plot_uncertainty(torch.rand(5), None, None, path, in_label="in", out_label=None) is False
    assert not path.exists()


def test_plot_reliability_and_uncertainty(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, 5, generator=g)
    target = torch.randint(0, 5, (64,), generator=g)
    rel = metrics.reliability(logits, target, n_bins=10)
    path = tmp_path / "reliability.png"
    assert plot_reliability(rel, float(rel.ece), path) is True and _is_png(path)

    mi_in = metrics.mutual_information(logits)
    mi_out = metrics.mutual_information(3 * torch.randn(4, 32, 5, generator=g))
    auroc = metrics.ood_auroc(mi_in, mi_out)
    both = tmp_path / "uncertainty.png"
    assert plot_uncertainty(
        mi_in, mi_out, auroc, both, in_label="digits 0-7 (test)", out_label="held-out 8, 9"
    )
    assert _is_png(both)
    alone = tmp_path / "uncertainty_in.png"
    assert plot_uncertainty(mi_in, None, None, alone, in_label="test", out_label=None)
    assert _is_png(alone)
    zeros = tmp_path / "zeros.png"  # every sample agrees: all MI 0, still a figure
    assert plot_uncertainty(torch.zeros(8), None, None, zeros, in_label="test", out_label=None)
    assert _is_png(zeros)


# ----------------------------------------------------------------------------- predictions


def test_save_predictions(tmp_path):
    g = torch.Generator().manual_seed(1)
    test_logits = torch.randn(6, 10, 4, generator=g)
    test_labels = torch.randint(0, 4, (10,), generator=g)
    ood_logits = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    path = tmp_path / "predictions.npz"
    n = save_predictions(path, {"test": (test_logits, test_labels), "ood": (ood_logits, None)})
    assert n == 13
    with np.load(path) as data:  # no allow_pickle: no object arrays in the file
        d = {k: data[k] for k in data.files}
    assert set(d) == {
        "split", "index", "label", "predicted", "probs", "confidence", "entropy",
        "mutual_information",
    }  # fmt: skip
    assert d["split"].dtype.kind == "U"
    assert d["split"].tolist() == ["test"] * 10 + ["ood"] * 3
    assert d["index"].tolist() == list(range(10)) + list(range(3))
    assert d["label"].dtype == np.int64 and d["predicted"].dtype == np.int64
    assert d["label"].tolist() == test_labels.tolist() + [-1] * 3
    for key in ("probs", "confidence", "entropy", "mutual_information"):
        assert d[key].dtype == np.float32
    assert d["probs"].shape == (13, 4)

    rows = {"test": slice(0, 10), "ood": slice(10, 13)}
    for name, logits in (("test", test_logits), ("ood", ood_logits)):
        r = rows[name]
        probs = metrics.predictive_probs(logits)
        np.testing.assert_allclose(d["probs"][r], probs.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(d["predicted"][r], probs.argmax(-1).numpy())
        np.testing.assert_allclose(d["confidence"][r], probs.max(-1).values.numpy(), rtol=1e-6)
        entropy = metrics.predictive_entropy(logits).numpy()
        np.testing.assert_allclose(d["entropy"][r], entropy, rtol=1e-5, atol=1e-7)
        mi = metrics.mutual_information(logits).numpy()
        np.testing.assert_allclose(d["mutual_information"][r], mi, rtol=1e-5, atol=1e-6)
    # the predicted class matches spar.metrics.accuracy on the labelled split
    accuracy = (d["predicted"][:10] == test_labels.numpy()).mean()
    assert accuracy == pytest.approx(float(metrics.accuracy(test_logits, test_labels)))
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_predictions_rejects_bad_input(tmp_path):
    path = tmp_path / "p.npz"
    logits = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="splits is empty"):
        save_predictions(path, {})
    with pytest.raises(ValueError, match=r"splits\['test'\] labels must be integers of shape"):
        save_predictions(path, {"test": (logits, torch.zeros(4, dtype=torch.long))})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        save_predictions(path, {"test": (logits, torch.full((5,), 3))})
    with pytest.raises(ValueError, match=r"splits\['ood'\] logits have 4 classes, expected 3"):
        save_predictions(path, {"test": (logits, None), "ood": (torch.randn(2, 5, 4), None)})
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        save_predictions(path, {"test": (torch.randn(5, 3), None)})
    assert not path.exists()


def test_task_progress_is_one_line_at_the_end_off_a_terminal():
    from spar.report import TaskProgress

    out = io.StringIO()
    with TaskProgress(True, "evaluating test (12 examples, S=4)", 12, stream=out) as p:
        p.advance(6)
        assert out.getvalue() == ""  # nothing while it runs
        p.advance(12)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluating test (12 examples, S=4): 12 done")
    out = io.StringIO()
    with pytest.raises(RuntimeError), TaskProgress(True, "x", 3, stream=out):
        raise RuntimeError("boom")
    assert out.getvalue() == ""  # a failed task claims nothing
    out = io.StringIO()
    with TaskProgress(False, "x", 3, stream=out) as p:
        p.advance(3)
    assert out.getvalue() == ""
