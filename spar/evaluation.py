"""``spar eval``: the full predictive of a saved checkpoint, without training.

A ``spar train`` checkpoint carries its config (dataset, model, seed, S, ...), so
``spar eval --checkpoint DIR/checkpoint.pt`` rebuilds the model and the data from it alone
and evaluates all ``S`` weight samples of the posterior (or another ``samples``) at the
checkpoint's noise step: with the same ``S`` it reproduces the test metrics the training
run wrote to ``metrics.json``, on any grid (the noise of sample ``s`` is keyed by its
global index, invariant I1). Where the data lies (``data_dir``, ``ood``) may be given anew;
the dataset itself, the held-out classes and the model come from the checkpoint.

Outputs, in ``out`` (default: an ``eval`` folder beside the checkpoint): ``metrics.json``,
the reliability and uncertainty plots, and ``predictions.npz`` with one row per test (and
OOD) example: predicted class, mean predictive probabilities, predictive entropy and
mutual information (:func:`spar.report.save_predictions`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import spar
from spar import report as rep
from spar._fs import OutputBusyError, OutputLock, check_writable, remove_stale_temps
from spar._job import (
    SetupError,
    build_model,
    evaluate,
    load_data,
    print_report,
    public,
    rank,
    reason_for_os_errors,
    write_metrics,
    write_report,
)
from spar.checkpoint import CheckpointError, load_checkpoint
from spar.distributed import SampleParallel
from spar.train import (
    TrainConfig,
    check_config_types,
    check_model_state,
    init_grid,
    setup_rank,
    start,
    with_legacy_defaults,
)

PREDICTIONS = "predictions.npz"
# after a data error: the checkpoint records where the data lay when it was trained
_DATA_HINT = " (the checkpoint's; give --data-dir / --ood where the data lie now)"


@dataclass
class EvalConfig:
    """The options of ``spar eval``; ``None`` takes the checkpoint's value."""

    checkpoint: str
    data_dir: str | None = None
    ood: str | None = None
    samples: int | None = None
    nproc: int = 1
    mode: str | None = None
    sample_axis: int | None = None
    data_axis: int | None = None
    device: str = "cpu"
    out: str | None = None


def read_checkpoint(path: str | Path) -> tuple[dict, TrainConfig]:
    """``(state, config)`` of a ``spar train`` checkpoint; :class:`SetupError` with one line
    for a missing, damaged or foreign file, or a config this version cannot read."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise SetupError(f"--checkpoint: {e}") from None
    stored = state.get("config")
    if "model" not in state or not isinstance(stored, dict):
        raise SetupError(f"--checkpoint {path} has no model and config: not written by spar train")
    stored = with_legacy_defaults(stored)
    check_config_types(stored, f"--checkpoint {path}")
    return state, TrainConfig(**stored)


def job_config(ecfg: EvalConfig, stored: TrainConfig) -> TrainConfig:
    """The training config of the checkpoint with this evaluation's grid, device, ``S``,
    data locations and output folder; validated (:class:`SetupError`)."""
    out = ecfg.out or str(Path(ecfg.checkpoint).resolve().parent / "eval")
    nproc = ecfg.nproc
    mode = ecfg.mode or ("local" if nproc == 1 else "sp")
    cfg = replace(
        stored, nproc=nproc, mode=mode, sample_axis=ecfg.sample_axis, data_axis=ecfg.data_axis,
        device=ecfg.device, out=out, resume=False, progress=False, max_restarts=0,
        samples=ecfg.samples or stored.samples,
        data_dir=ecfg.data_dir if ecfg.data_dir is not None else stored.data_dir,
        ood=ecfg.ood if ecfg.ood is not None else stored.ood,
    )  # fmt: skip
    try:
        # the training batch plays no part: every data rank evaluates everything; keep it
        # divisible by the data axis for validate()
        b = cfg.grid_axes()[1]
        cfg = replace(cfg, batch_size=b * max(1, cfg.batch_size // b))
        cfg.validate()
    except ValueError as e:
        raise SetupError(str(e)) from None
    return cfg


def preflight(ecfg: EvalConfig) -> TrainConfig:
    """Everything that can fail before the ranks start: the checkpoint (readable, written by
    ``spar train``, fitting the model of its config), the options, the data, a writable
    ``out``. Returns the job's config."""
    state, stored = read_checkpoint(ecfg.checkpoint)
    cfg = job_config(ecfg, stored)
    splits = load_data(cfg, hint=_DATA_HINT)
    sp = SampleParallel(build_model(cfg, splits), cfg.samples, spar.distributed.Grid.local())
    check_model_state(state, sp.module, Path(ecfg.checkpoint))
    try:
        check_writable(cfg.out)
    except OSError as e:
        raise SetupError(f"--out {e.strerror}") from None
    return cfg


def launch(ecfg: EvalConfig) -> dict | None:
    """Run ``spar eval``: :func:`preflight`, lock ``out``, evaluate on the grid of ``ecfg``
    (one process by default); returns rank 0's report."""
    cfg = preflight(ecfg)
    with contextlib.ExitStack() as stack:
        if spar.distributed.detect_launch_env().rank == 0:
            try:
                stack.enter_context(OutputLock(cfg.out))
            except OutputBusyError as e:
                raise SetupError(str(e)) from None
            remove_stale_temps(cfg.out)
        return start(cfg, _EvalJob(ecfg.checkpoint), command="spar eval")


@dataclass(frozen=True)
class _EvalJob:
    """``run_eval`` bound to a checkpoint: what each rank runs (picklable)."""

    checkpoint: str

    def __call__(self, cfg: TrainConfig) -> dict | None:
        return run_eval(cfg, self.checkpoint)


def run_eval(cfg: TrainConfig, checkpoint: str | Path) -> dict | None:
    """Evaluate ``checkpoint`` on this rank's part of ``cfg``'s grid; rank 0 writes the
    outputs to ``cfg.out``, prints the report table and returns the report."""
    grid = init_grid(cfg)
    out = Path(cfg.out)
    try:
        setup_rank(cfg, grid)
        state, _ = read_checkpoint(checkpoint)
        splits = load_data(cfg)
        model = build_model(cfg, splits).to(grid.device)
        sp = SampleParallel(model, cfg.samples, grid, seed=cfg.seed)
        sp.module.load_state_dict(state["model"])

        def shown(split: str, examples: int) -> rep.TaskProgress:
            what = f"evaluating {split} ({examples:,} examples, S={cfg.samples})"
            return rep.TaskProgress(rank() == 0, what, examples)

        report = evaluate(sp, splits, progress=shown)
        if rank() != 0:
            return None
        report["checkpoint"] = str(checkpoint)
        report["checkpoint_epoch"] = state.get("epoch")
        report["samples"] = cfg.samples
        report["grid"] = {"sample": grid.sample, "data": grid.data, "mode": grid.mode}
        report["config"] = asdict(cfg)
        result = public(report)
        with reason_for_os_errors(f"could not write the report to {out}", note=""):
            files = write_report(out, report, splits)
            rows = rep.save_predictions(out / PREDICTIONS, report["_logits"])
            result["predictions"] = rows
            result["files"] = [*files, PREDICTIONS, "metrics.json"]
            write_metrics(out, result)
        print_report(report, title=f"{checkpoint} (epoch {state.get('epoch')}, S={cfg.samples})")
        print(f"wrote {', '.join(result['files'])} to {out}", flush=True)
        return result
    finally:
        if cfg.mode != "local":
            spar.distributed.shutdown()
