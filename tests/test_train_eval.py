"""`spar train` on CIFAR-10 batches and .npz arrays with the built-in models, `spar eval`
of its checkpoint (the same metrics on another grid), history.csv, and the one-line errors.

The data are small files written here in the real formats (no internet): a CIFAR-10 folder
of python pickles and an .npz file."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spar.cli import main
from spar.evaluation import EvalConfig
from spar.evaluation import launch as launch_eval
from spar.train import TrainConfig, launch

METRICS = (
    "accuracy", "nll", "ece", "brier",
    "ood_auroc_mutual_information", "ood_auroc_predictive_entropy",
)  # fmt: skip


def _cifar_folder(root: Path, per_batch: int = 8, n_test: int = 16) -> Path:
    """A CIFAR-10 python-batches folder (cifar-10-batches-py) with random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int) -> dict:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return {b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    return root


def _spar(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("SPAR_RNG", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "spar", *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


def _same_metrics(a: dict, b: dict) -> None:
    for key in METRICS:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def _train_cifar10(tmp_path: Path, *options: str, **folder) -> tuple[Path, dict, str]:
    """``spar train`` on 2 ranks on a CIFAR-10 folder written here: (out, metrics, logs)."""
    data = _cifar_folder(tmp_path / "data", **folder)
    out = tmp_path / "run"
    r = _spar(
        "train", "--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1",
        "--samples", "2", "--out", str(out), "--no-progress", *options,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "metrics.json").read_text()), r.stdout + r.stderr


@pytest.mark.slow
def test_cifar10_resnet20_two_ranks_then_eval_reproduces_metrics(tmp_path):
    out, trained, logs = _train_cifar10(
        tmp_path, "--model", "resnet20", "--ood-classes", "8,9", "--batch-size", "8"
    )
    assert trained["grid"] == {"sample": 2, "data": 1, "mode": "sp"}
    assert trained["config"]["model"] == "resnet20"
    # no log line carries terminal codes or redraws (stdout/stderr are pipes)
    assert "\x1b" not in logs and "\r" not in logs
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [row["epoch"] for row in rows] == ["1"]
    assert float(rows[0]["samples_per_s"]) > 0 and rows[0]["val_accuracy"] != ""
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one process, the checkpoint's config only: the same predictive
    r = _spar("eval", "--checkpoint", str(out / "checkpoint.pt"))
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    _same_metrics(trained, evaluated)
    assert evaluated["grid"]["sample"] == 1
    preds = np.load(out / "eval" / "predictions.npz")
    n_test = int((preds["split"] == "test").sum())
    assert n_test == len(preds["label"][preds["split"] == "test"]) > 0
    assert preds["probs"].shape[1] == 8  # classes 8 and 9 held out
    accuracy = (preds["predicted"] == preds["label"])[preds["split"] == "test"].mean()
    assert accuracy == pytest.approx(trained["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_vit_tiny_on_the_data_axis_then_eval_in_one_process(tmp_path):
    out, trained, _ = _train_cifar10(
        tmp_path, "--model", "vit-tiny", "--mode", "ddp", "--batch-size", "16",
        per_batch=4, n_test=8,
    )  # fmt: skip
    assert trained["grid"] == {"sample": 1, "data": 2, "mode": "ddp"}
    assert trained["ood_auroc_mutual_information"] is None  # cifar10: no OOD set by default
    evaluated = launch_eval(EvalConfig(checkpoint=str(out / "checkpoint.pt")))
    _same_metrics(trained, evaluated)


@pytest.mark.slow
def test_npz_in_one_process_then_eval_on_two_ranks_and_other_samples(tmp_path):
    """The CNN on an .npz of the user's with its own OOD set; `spar eval` on a 2x1 grid
    reproduces the metrics, and another S gives another predictive with every file."""
    rng = np.random.default_rng(1)
    path = tmp_path / "mine.npz"
    np.savez(
        path, x_train=rng.random((40, 1, 12, 12), dtype=np.float32),
        y_train=rng.integers(0, 3, 40), x_test=rng.random((12, 1, 12, 12), dtype=np.float32),
        y_test=rng.integers(0, 3, 12), x_ood=rng.random((6, 1, 12, 12), dtype=np.float32),
    )  # fmt: skip
    out = tmp_path / "run"
    cfg = TrainConfig(
        dataset="npz", data_dir=str(path), mode="local", epochs=1, samples=2, batch_size=16,
        out=str(out), progress=False, val_fraction=0.25,
    )  # fmt: skip
    trained = launch(cfg)
    assert trained["ood_auroc_mutual_information"] is not None  # the .npz's x_ood
    ckpt = str(out / "checkpoint.pt")
    evaluated = launch_eval(EvalConfig(checkpoint=ckpt, nproc=2, out=str(tmp_path / "e2")))
    assert evaluated["grid"] == {"sample": 2, "data": 1, "mode": "sp"}
    _same_metrics(trained, evaluated)
    # the test set split over a data axis of 2 (6 + 6 examples), gathered back
    evaluated = launch_eval(
        EvalConfig(checkpoint=ckpt, nproc=2, mode="ddp", out=str(tmp_path / "d2"))
    )
    assert evaluated["grid"] == {"sample": 1, "data": 2, "mode": "ddp"}
    _same_metrics(trained, evaluated)
    by_data = np.load(tmp_path / "d2" / "predictions.npz")["probs"]
    by_sample = np.load(tmp_path / "e2" / "predictions.npz")["probs"]
    np.testing.assert_allclose(by_data, by_sample, rtol=1e-5, atol=1e-6)  # example by example
    more = launch_eval(EvalConfig(checkpoint=ckpt, samples=4, out=str(tmp_path / "e4")))
    assert more["samples"] == 4 and (tmp_path / "e4" / "predictions.npz").is_file()
    assert more["nll"] != trained["nll"]


def _one_line_exit_2(capsys, argv: list[str], words: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert words in err and err.count("\n") == 1, err


def test_bad_data_models_and_checkpoints_are_one_line_exit_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    _one_line_exit_2(capsys, ["train", "--dataset", "cifar10", *out], "cifar-10-python.tar.gz")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(
        capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), *out],
        "data_batch_1",
    )  # fmt: skip
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 3)), y_train=np.zeros(4, dtype=int), x_test=np.zeros((2, 3)))
    _one_line_exit_2(capsys, ["train", "--dataset", "npz", "--data-dir", str(bad), *out], "y_test")
    _one_line_exit_2(capsys, ["train", "--model", "resnet99", *out], "unknown model 'resnet99'")
    # digits are 8x8: ViT-Tiny's patch 4 fits, a patch of 16 would not; the MLP takes anything
    _one_line_exit_2(capsys, ["train", "--ood-classes", "8,x", *out], "--ood-classes")
    _one_line_exit_2(capsys, ["train", "--ood-classes", "3,12", *out], "12")
    _one_line_exit_2(capsys, ["eval", "--checkpoint", str(tmp_path / "none.pt")], "no checkpoint")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    _one_line_exit_2(capsys, ["eval", "--checkpoint", str(junk)], "not a readable checkpoint")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A 1-epoch digits run in one process (default held-out classes 8 and 9)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    launch(TrainConfig(mode="local", epochs=1, samples=2, batch_size=256, out=str(out),
                       progress=False))  # fmt: skip
    return out


def test_eval_refuses_a_checkpoint_of_another_model(tmp_path, capsys, digits_run):
    import torch

    from spar.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(digits_run / "checkpoint.pt")
    assert state["config"]["ood_classes"] == "8,9"  # recorded as resolved
    state["config"]["model"] = "mlp"  # the stored config no longer matches the weights
    save_checkpoint(tmp_path / "other.pt", state, keep_previous=False)
    other = ["eval", "--checkpoint", str(tmp_path / "other.pt")]
    _one_line_exit_2(capsys, other, "not a checkpoint of this model")
    for key, value, words in [
        ("future_option", 1, "future_option"),
        ("samples", "8", "samples='8', expected int"),
        ("seed", 1.5, "seed=1.5, expected int"),
        ("model", 5, "model=5, expected str"),
    ]:
        state = load_checkpoint(digits_run / "checkpoint.pt")
        state["config"][key] = value
        save_checkpoint(tmp_path / "edited.pt", state, keep_previous=False)
        _one_line_exit_2(capsys, ["eval", "--checkpoint", str(tmp_path / "edited.pt")], words)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    _one_line_exit_2(capsys, ["eval", "--checkpoint", str(tmp_path / "foreign.pt")], "not a spar")


def test_eval_with_another_ood_set_and_failures_are_one_line(tmp_path, capsys, digits_run):
    ckpt = str(digits_run / "checkpoint.pt")
    # another OOD set for a digits run: the classes 8 and 9 still stay out of the test set
    noise = tmp_path / "noise.npz"
    np.savez(noise, x_ood=np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32))
    report = launch_eval(EvalConfig(checkpoint=ckpt, ood=str(noise), out=str(tmp_path / "e")))
    trained = json.loads((digits_run / "metrics.json").read_text())
    assert report["accuracy"] == trained["accuracy"]  # the same test set
    assert report["ood_auroc_mutual_information"] != trained["ood_auroc_mutual_information"]
    # a report that cannot be written: one line, exit 1, no traceback
    (tmp_path / "busy" / "predictions.npz").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "busy")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("evaluating ")]
    assert e.value.code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "could not write the report" in err and "checkpoint is intact" not in err


def test_train_refuses_a_foreign_history_and_resume_takes_equal_classes(tmp_path, capsys):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "history.csv").write_text("a,b\n1,2\n")
    _one_line_exit_2(capsys, ["train", "--out", str(tmp_path / "h")], "history.csv")
    out = str(tmp_path / "r")
    base = ["train", "--mode", "local", "--samples", "2", "--batch-size", "512", "--out", out]
    assert main([*base, "--epochs", "1", "--no-progress", "--ood-classes", "9,8"]) == 0
    # the same classes spelled differently, or left to the default, continue the run
    assert main([*base, "--epochs", "2", "--no-progress", "--resume"]) == 0
    _one_line_exit_2(capsys, [*base, "--epochs", "3", "--resume", "--ood-classes", "7"],
                     "trained with --ood-classes 8,9")  # fmt: skip


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_predictive_does_not_depend_on_the_chunks(monkeypatch, estimator):
    """Per-example noise is keyed by the example's index in the evaluated set: chunked
    evaluation equals one pass (SampleParallel.predict), and leaves the modes as they were."""
    import torch
    from torch import nn

    import spar
    from spar import _job

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    net = spar.nn.bayesianize(net, init_sigma=0.3, estimator=estimator)
    sp = spar.distributed.SampleParallel(net, 4, spar.distributed.Grid.local(), seed=3)
    x = torch.randn(10, 6)
    whole = sp.predict(x)
    monkeypatch.setattr(_job, "EVAL_CHUNK", 4 * 3)  # 3 examples per pass
    assert sp.training
    torch.testing.assert_close(_job.predictive(sp, x), whole, rtol=1e-5, atol=1e-6)
    assert sp.training and all(m.training for m in sp.modules())
