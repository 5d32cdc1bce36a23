"""Fault injection (issue 14): every fault that used to lose data, give a silently wrong
result, hang or end in a traceback, injected and checked on CPU with gloo.

In-process tests cover the checkpoint file (flipped bytes, the previous good file, a full
disk), the output folder (lock, stale temporaries, unwritable), the pre-flight checks of
``spar train`` (checkpoint structure, experiment options, non-finite values, TOML types,
memory) and "nothing left to do". The ``slow`` tests start real 2-rank jobs and stop,
kill or freeze their ranks; each subprocess has a hard timeout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spar.distributed as sd
import spar.models
from spar import cli
from spar._fs import OutputBusyError, OutputLock, atomic_write, check_writable, remove_stale_temps
from spar._watch import StallWatch
from spar.checkpoint import (
    CheckpointError,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from spar.train import (
    SetupError,
    TrainConfig,
    _agree_across_ranks,
    _checkpoint_state,
    check_resume,
    preflight,
    resume_checkpoint,
    run,
)

# a distinctive tensor whose bytes can be found in the file
MARK = torch.arange(4096, dtype=torch.float32) + 0.25


def _flip(path: Path, at: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str):
    """A small tmpfs at ``path`` (root with mount(8) only: skipped elsewhere)."""
    path.mkdir()
    opts = ",".join((f"size={size}", *options))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


# ----------------------------------------------------------------------------- checkpoint


def test_flipped_bytes_are_refused_and_the_previous_file_is_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": MARK, "epoch": 1})
    save_checkpoint(path, {"w": MARK * 2, "epoch": 2})
    assert load_checkpoint(previous_path(path))["epoch"] == 1  # the replaced one, kept
    at = path.read_bytes().find((MARK * 2).numpy().tobytes())
    assert at > 0
    _flip(path, at + 1000)  # 64 bytes inside the tensor data: still a valid zip and pickle
    with pytest.raises(CheckpointError, match="damaged: its content does not match"):
        load_checkpoint(path)
    used, state, note = resume_checkpoint(tmp_path)
    assert used == previous_path(path) and state["epoch"] == 1
    assert torch.equal(state["w"], MARK) and "resuming from the previous checkpoint" in note
    # a write after a fallback must not push the good previous file out
    save_checkpoint(path, {"w": MARK, "epoch": 3}, keep_previous=False)
    assert load_checkpoint(previous_path(path))["epoch"] == 1
    _flip(previous_path(path), 200)
    _flip(path, 200)
    with pytest.raises(CheckpointError):
        resume_checkpoint(tmp_path)


def test_full_disk_keeps_the_old_files(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old")

    def half_then_enospc(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_enospc)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_full_tmpfs_keeps_the_last_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "small", "64k") as disk:
        path = disk / "checkpoint.pt"
        save_checkpoint(path, {"w": torch.zeros(1000), "epoch": 1})
        with pytest.raises(OSError) as info:
            save_checkpoint(path, {"w": torch.zeros(20000), "epoch": 2})  # 80 kB > 64 kB
        assert info.value.errno == errno.ENOSPC
        assert load_checkpoint(path)["epoch"] == 1
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- output folder


def test_lock_names_the_holder_and_stale_temps_go(tmp_path):
    (tmp_path / ".metrics.json.x1y2.tmp").write_text("half")
    with OutputLock(tmp_path):
        busy = rf"in use by another run \(process {os.getpid()}: "
        with pytest.raises(OutputBusyError, match=busy):
            OutputLock(tmp_path).acquire()
        assert remove_stale_temps(tmp_path) == [".metrics.json.x1y2.tmp"]
    with OutputLock(tmp_path):  # released: free again
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spar.lock"]


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OSError, match="is not writable"):
        check_writable(afile / "run")
    _train_exit(["--out", str(afile / "run")], capsys, 2, "--out")
    with _tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        err = _train_exit(["--out", str(ro / "run")], capsys, 2, "Read-only file system")
        assert "is not writable" in err


# ----------------------------------------------------------------------------- pre-flight

LOCAL = TrainConfig(mode="local", samples=2, batch_size=512, epochs=1, progress=False)


def _cfg(tmp_path, **kw) -> TrainConfig:
    values = {**LOCAL.__dict__, "out": str(tmp_path), **kw}
    return TrainConfig(**values)


def _state(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    net = spar.models.build("cnn", (1, 8, 8), 8, init_sigma=cfg.init_sigma)
    sp = sd.SampleParallel(net, cfg.samples, sd.Grid.local(), seed=cfg.seed, augment=cfg.augment)
    opt = torch.optim.Adam(sp.parameters(), lr=cfg.lr)
    return _checkpoint_state(sp, opt, 1, cfg)


def _train_exit(argv, capsys, code: int, message: str) -> str:
    """``spar train argv`` in this process: it exits with ``code`` and one line."""
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert info.value.code == code, err
    assert message in err and err.count("\n") == 1, err
    return err


def test_resume_refuses_what_changes_the_experiment(tmp_path):
    cfg = _cfg(tmp_path)
    state = _state(cfg)
    path = tmp_path / "checkpoint.pt"
    check_resume(state, cfg, path)
    # more epochs and another grid shape are the same experiment
    check_resume(state, _cfg(tmp_path, epochs=5, mode="sp", nproc=2), path)
    for field, value in [("seed", 1), ("samples", 4), ("loss", "mixture"), ("init_sigma", 0.1)]:
        flag = "--" + field.replace("_", "-")
        with pytest.raises(SetupError, match=f"trained with {flag} {getattr(cfg, field)}, "):
            check_resume(state, _cfg(tmp_path, **{field: value}), path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("optimizer"), "has no optimizer"),
        (lambda s: s.pop("augment_states"), "has no augment_states"),
        (lambda s: s["model"].update({"model.0.weight_mu": torch.zeros(3, 3)}), "has shape (3, 3)"),
        (lambda s: s["model"].pop("model.6.bias_rho"), "has no 'model.6.bias_rho'"),
        (lambda s: s["model"].update({"extra": torch.zeros(1)}), "unknown entry 'extra'"),
        (
            lambda s: s["model"]["model.6.weight_mu"].view(-1)[:3].fill_(float("nan")),
            "'model.6.weight_mu' holds 3 non-finite values",
        ),  # fmt: skip
        (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "optimizer state"),
        (lambda s: s["augment_states"].append(None), "holds 2 states for a 1x1 grid"),
        (lambda s: s["model"].update({"model.0.weight_mu": [1.0]}), "is a list, not a tensor"),
    ],
)
def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, damage, message):
    cfg = _cfg(tmp_path)
    state = _state(cfg)
    damage(state)
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_resume(state, cfg, tmp_path / "checkpoint.pt")


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    state = _state(cfg)
    state["model"]["model.0.bias_mu"][0] = float("inf")
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    common = ["--mode", "local", "--samples", "2", "--batch-size", "512", "--out", str(tmp_path)]
    _train_exit([*common, "--resume"], capsys, 2, "non-finite values")
    _train_exit([*common, "--resume", "--seed", "7"], capsys, 2, "trained with --seed 0")
    weights = state["model"]["model.6.weight_mu"].numpy().tobytes()
    _flip(tmp_path / "checkpoint.pt", (tmp_path / "checkpoint.pt").read_bytes().find(weights))
    _train_exit([*common, "--resume"], capsys, 2, "is damaged")


@pytest.mark.parametrize(
    "text, message",
    [
        ('epochs = "2.5"', "epochs: expected a whole number >= 1, got '2.5'"),
        ("epochs = 2.5", "epochs: expected a whole number >= 1, got '2.5'"),
        ("epochs = 0", "epochs: expected a whole number >= 1"),
        ('lr = "fast"', "lr: expected a number, got 'fast'"),
        ("resume = 1", "resume must be true or false, got 1"),
        ('mode = "pipeline"', "mode must be one of sp, ddp, hybrid, local; got 'pipeline'"),
        ("samples = [2]", "samples: expected a single value"),
        ("seed = 1.5", "seed: expected an integer, got 1.5"),
        ("out = 5", "out: expected a string, got 5"),
    ],
)
def test_toml_values_follow_the_command_line_rules(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text + "\n")
    _train_exit(["--config", str(cfg)], capsys, 2, message)


def test_where_to_resume_names_the_file_resume_would_take(tmp_path):
    cfg = _cfg(tmp_path)
    assert cli._where_to_resume(cfg) == "no checkpoint was written yet"
    state = _state(cfg)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    save_checkpoint(tmp_path / "checkpoint.pt", {**state, "epoch": 2})
    assert "checkpoint.pt (epoch 2)" in cli._where_to_resume(cfg)
    weights = state["model"]["model.6.weight_mu"].numpy().tobytes()
    _flip(tmp_path / "checkpoint.pt", (tmp_path / "checkpoint.pt").read_bytes().find(weights))
    # damaged: the previous file, which --resume falls back to
    assert f"{previous_path(tmp_path / 'checkpoint.pt')} (epoch 1)" in cli._where_to_resume(cfg)


def test_sigterm_is_not_an_exception():
    # a BaseException, so no `except Exception` on the main thread swallows it
    assert not issubclass(cli._Terminated, Exception)


def test_toml_values_parse_like_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('epochs = "3"\nsamples = 4.0\nlr = 1e-3\nprogress = false\ntimeout = 30\n')
    values = cli._load_config_file(cfg)
    assert values == {"epochs": 3, "samples": 4, "lr": 1e-3, "progress": False, "timeout": 30.0}
    assert all(type(values[k]) is int for k in ("epochs", "samples"))


def test_memory_estimate_refuses_a_million_samples(tmp_path, capsys):
    err = _train_exit(["--mode", "local", "--samples", "1e6", "--out", str(tmp_path)],
                      capsys, 2, "a step needs about")  # fmt: skip
    assert "GiB per rank" in err and "--no-memory-check" in err
    preflight(_cfg(tmp_path, samples=10**6, memory_check=False))  # forced: no error
    preflight(_cfg(tmp_path))  # the default job fits


def test_nothing_left_to_do_says_so_and_writes_no_checkpoint(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    save_checkpoint(tmp_path / "checkpoint.pt", _state(cfg))  # epoch 1 = --epochs 1
    before = (tmp_path / "checkpoint.pt").read_bytes()
    report = run(_cfg(tmp_path, resume=True))
    out = capsys.readouterr().out
    assert "already holds 1 epochs (--epochs 1): nothing to train" in out
    assert "checkpoint.pt" not in report["files"] and report["epochs_run"] == 0
    assert "checkpoint.pt" not in out.splitlines()[-1]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not previous_path(tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["seconds_per_epoch"] is None


def test_stall_limit_comes_from_measured_steps(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    watch = StallWatch(0, None, startup=300.0, factor=20.0, min_limit=1.0)
    watch.beat(0, -1, allow=300.0)
    assert watch.limit() == 300.0  # nothing measured yet: the first step warms up
    for step, seconds in enumerate([0.2, 0.1, 0.3, 0.1]):
        watch.beat(0, step, 0)
        clock[0] += 0.01
        watch.beat(0, step, 1)
        clock[0] += seconds - 0.01
    watch.beat(0, 4, 0)
    assert watch.limit() == pytest.approx(20 * 0.3)  # the slowest step, not the last
    assert watch.deadline == pytest.approx(clock[0] + 6.0)
    watch.beat(1, -1, allow=300.0)  # an epoch end is not a step
    clock[0] += 100.0
    watch.beat(1, 0, 0)
    assert watch.limit() == pytest.approx(6.0)
    assert StallWatch(0, 2.5, startup=300.0).limit() == 300.0  # --timeout: after a step
    fixed = StallWatch(0, 2.5, startup=300.0)
    fixed.slowest = 0.1
    assert fixed.limit() == 2.5


# ----------------------------------------------------------------------------- two ranks


def _ranks_disagree(seed_of_rank_1: int):
    """Each rank's options differ only in the seed on rank 1; return what it raised and a
    tensor (spawn must bring tensors back)."""
    grid = sd.init(sample=2, timeout=60)
    cfg = TrainConfig(seed=seed_of_rank_1 if grid.rank == 1 else 0)
    try:
        _agree_across_ranks(cfg)
        message = None
    except SetupError as e:
        message = str(e)
    finally:
        sd.shutdown()
    return message, torch.full((3,), float(grid.rank))


@pytest.mark.slow
def test_ranks_must_agree_and_spawn_returns_tensors():
    t0 = time.monotonic()
    results = sd.spawn(_ranks_disagree, 2, args=(5,), timeout=120)
    assert time.monotonic() - t0 < 100  # not the whole timeout
    for rank, (message, tensor) in enumerate(results):
        assert "--seed is 0 on rank 0 but 5 on rank 1" in message
        assert torch.equal(tensor, torch.full((3,), float(rank)))
    with pytest.raises(RuntimeError, match="cannot be sent back"):
        sd.spawn(eval, 1, args=("lambda: 0",), timeout=120)


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SPAR_RNG")}
    return subprocess.Popen(
        [sys.executable, "-m", "spar", "train", "--samples", "2", "--batch-size", "128",
         "--no-progress", "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def _wait_for_epoch(out: Path, proc: subprocess.Popen, epoch: int, timeout: float = 180) -> None:
    path, deadline = out / "checkpoint.pt", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(CheckpointError, KeyError):
            if path.is_file() and load_checkpoint(path)["epoch"] >= epoch:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint of epoch {epoch}: {proc.communicate()[1][-2000:]}")


def _rank_pids(proc: subprocess.Popen) -> list[int]:
    """The ranks spar's launcher started (its spawned children, in start order)."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = []
    for pid in map(int, kids.stdout.split()):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                pids.append(pid)
    return sorted(pids)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"did not end within {timeout} s: {err[-2000:]}") from None
    return proc.returncode, out, err


@pytest.mark.slow
def test_dead_and_stopped_ranks_restart_and_end_bit_identical(tmp_path):
    """kill -9 of rank 1 in the middle of epoch 2, then SIGSTOP of rank 1 in epoch 3: the
    stall is named (rank, epoch, step) within --timeout, and with --max-restarts the
    launcher starts the group again from the last checkpoint each time; the result equals
    an uninterrupted run's bit for bit."""
    ref, faulted = tmp_path / "ref", tmp_path / "faulted"
    reference = _start(ref, "--epochs", "4")
    job = _start(faulted, "--epochs", "4", "--max-restarts", "2", "--timeout", "6")
    _wait_for_epoch(faulted, job, 1)
    os.kill(_rank_pids(job)[1], signal.SIGKILL)
    _wait_for_epoch(faulted, job, 2)
    stopped = _rank_pids(job)[1]
    os.kill(stopped, signal.SIGSTOP)
    rc, _, err = _finish(job)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stopped, signal.SIGKILL)
    assert rc == 0, err
    assert "restart 1: continuing from" in err and "(epoch 1)" in err, err
    assert "rank 1 stopped in epoch 3, step" in err and "(limit 6 s, --timeout)" in err, err
    assert "restart 2: continuing from" in err and "(epoch 2)" in err, err
    assert "Traceback" not in err, err
    rc, _, err = _finish(reference)
    assert rc == 0, err
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(faulted / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, faulted))
    assert ma["accuracy"] == mb["accuracy"] and ma["nll"] == mb["nll"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code, mode", [(signal.SIGINT, 130, "sp"), (signal.SIGTERM, 143, "local")]
)
def test_busy_out_and_interrupts(tmp_path, sig, code, mode):
    """A second run on the same folder is refused, naming the first; ^C (the whole process
    group, 2 ranks) and SIGTERM (one process) end in one line that says where to resume."""
    job = _start(tmp_path, "--epochs", "50", "--mode", mode)
    _wait_for_epoch(tmp_path, job, 1)
    if sig == signal.SIGINT:
        second = _start(tmp_path, "--epochs", "1")
        rc, _, err = _finish(second)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"in use by another run (process {job.pid}:" in err
        os.killpg(job.pid, sig)
    else:
        os.kill(job.pid, sig)
    rc, _, err = _finish(job, timeout=60)
    assert rc == code, err
    assert err.count("\n") == 1 and f"stopped by {signal.Signals(sig).name}" in err, err
    assert f"{tmp_path / 'checkpoint.pt'} (epoch" in err and "add --resume" in err
    with OutputLock(tmp_path):  # released
        pass
