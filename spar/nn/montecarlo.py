"""``MonteCarlo``: run a Bayesian model on S weight samples at once."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from spar.nn.layers import BayesModule, NoiseModule, _check_estimator, assign_noise_names
from spar.nn.norm import SAMPLE_BATCH_NORMS
from spar.nn.sampling import sampling
from spar.rng import check_seed

# chunk="auto": the largest chunk of c samples whose module outputs (measured on one
# sample) hold at most this many elements: 2**23 fp32 = 32 MiB, the L3 cache of the 2-core
# machine it was tuned on (see MonteCarlo)
AUTO_CHUNK_ELEMENTS = 2**23

_SHAPE_WORDS = ("size", "shape")


def _check_chunk(chunk: int | str | None) -> int | str | None:
    if chunk is None or chunk == "auto":
        return chunk
    if isinstance(chunk, str):
        raise ValueError(f"chunk must be None, 'auto' or an int >= 1, got {chunk!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk must be None, 'auto' or an int, got {type(chunk).__name__}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (samples per chunk), got {chunk}")
    return chunk


def _add_hint(err: Exception, hint: str) -> None:
    if hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(hint)
    else:  # pragma: no cover - Python 3.10
        err.args = (f"{err.args[0] if err.args else ''}\n{hint}", *err.args[1:])


class _ChunkedRunningStats:
    """One running-statistics update per step for the sample-wise BatchNorms of a model run
    in chunks of samples: every chunk starts from the statistics before the step, and the
    step ends with the mean of the chunks' results weighted by their share of the samples.
    The update is linear in the batch statistics, so this is the one-pass update exactly
    (the counters of tracked batches advance once in all)."""

    @classmethod
    def of(cls, model: nn.Module) -> _ChunkedRunningStats | None:
        """The tracker of ``model``'s sample-wise BatchNorms that update running statistics
        now, or ``None`` when there are none."""
        norms = [
            m for m in model.modules()
            if isinstance(m, SAMPLE_BATCH_NORMS) and m.training and m.track_running_stats
        ]  # fmt: skip
        return cls(norms) if norms else None

    def __init__(self, norms: list[nn.Module]) -> None:
        self.norms = norms
        self.before = [
            (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in self.norms
        ]
        self.sums = [(torch.zeros_like(rm), torch.zeros_like(rv)) for rm, rv, _ in self.before]

    def chunk_done(self, weight: float) -> None:
        """Add the chunk's statistics with ``weight`` (its share of the samples); restore."""
        with torch.no_grad():
            for m, before, (sm, sv) in zip(self.norms, self.before, self.sums, strict=True):
                rm, rv, count = before
                sm.add_(m.running_mean, alpha=weight)
                sv.add_(m.running_var, alpha=weight)
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(count)

    def finish(self) -> None:
        """Set the statistics to the weighted sum of the chunks'; advance the counters."""
        with torch.no_grad():
            for m, (_, _, count), (sm, sv) in zip(self.norms, self.before, self.sums, strict=True):
                m.running_mean.copy_(sm)
                m.running_var.copy_(sv)
                m.num_batches_tracked.copy_(count + 1)


class MonteCarlo(nn.Module):
    """Evaluate ``model`` on ``num_samples`` posterior samples in one pass.

    ``forward(x)``: x ``(B, ...)``; the model runs inside :func:`spar.sampling` and its
    output comes back as ``(S, B, ...)``. In training mode every forward advances the step
    counter, so each step draws fresh noise; in eval mode the step stays put and repeated
    predictions are identical. The step counter is a buffer: it is saved and restored with
    ``state_dict``, which makes a resumed run draw exactly the noise of the uninterrupted
    one. Construction names every Bayesian layer's noise after its qualified name
    (:func:`spar.nn.assign_noise_names`), so distinct layers draw independent noise.

    Shared input (the default). The model receives ``x`` itself, not ``S`` copies of it:
    the sampling context carries ``batch_size=B``, and a Bayesian layer whose input has B
    rows treats it as shared by all samples (its GEMMs run on B rows; ``lrt`` and
    ``flipout`` first layers gain the most) and returns the folded ``(S*B, ...)``
    activations the rest of the model sees. Deterministic layers in front of the first
    Bayesian layer (a stem: flatten, conv, normalisation) run once on B rows. A model
    output of B rows (no Bayesian layer on its path) is expanded to ``(S, B, ...)``. The
    result equals the folded copy's within fp32 rounding, with these differences for torch's
    own modules in the stem: ``nn.Dropout`` draws one mask for all samples, and
    ``nn.BatchNorm`` updates its running variance with the unbiased factor of B rows instead
    of S*B. :class:`spar.nn.Dropout` and the sample-wise :class:`spar.nn.BatchNorm2d` (etc.)
    give the same result either way: a sample-wise Dropout expands the shared input to the
    folded batch, one mask per sample.

    fold_input: ``True`` gives every layer the folded ``(S*B, ...)`` copy of ``x`` (the
        behaviour before shared input). Needed when the model mixes a tensor computed
        before the first Bayesian layer with one computed after it: a residual connection
        around the first Bayesian layer (``stem -> block(conv_bayes(h)) + h``), or a reshape
        that reads the batch size from the model's input. Such models fail with a shape
        error, to which MonteCarlo adds a note naming this option. ``S == 1`` is the same
        either way.
    chunk: ``None`` (default) runs all S samples in one pass; an int ``c`` runs the model
        on chunks of ``c`` samples (global sample indices ``[first_sample + lo, ... + hi)``,
        the same seed and step, hence the same noise as one pass) and concatenates the
        outputs. The autograd graph is then per chunk, so backward visits one chunk at a
        time: activations stay in cache on memory-bound CNNs (max-pool, relu and copies
        over the whole ``S*B`` batch otherwise stream through memory). The outputs and
        gradients equal the one-pass ones within fp32 rounding, unless the model mixes
        samples across the batch (torch's ``nn.BatchNorm`` in training mode after the first
        Bayesian layer then sees per-chunk statistics, and every chunk updates the running
        stats: a warning says so). The sample-wise :class:`spar.nn.BatchNorm2d` (etc.) is
        exact: its statistics are per sample anyway, and the running statistics get one
        update per step, the sample-weighted mean of the chunks' updates. The layers in
        front of the first Bayesian layer run once per chunk. ``"auto"``: the first call
        for an input shape runs sample 0 alone and counts the elements of every module's
        output (distinct tensors); ``c`` is the largest chunk whose outputs fit
        :data:`AUTO_CHUNK_ELEMENTS` (``2**23``, 32 MiB of fp32, a last-level cache), at
        least 1 and at most S, and is kept for that shape (:meth:`chunk_size`). Tuned on a
        CIFAR-shaped CNN (two 3x3 convs with max-pool, B=32, S=8, ELBO forward + backward on
        2 CPU cores with a 32 MiB L3: ``c=2``, about 1.3x faster than one pass); an MLP gets
        ``c=S`` (chunking costs a little there).
        Under ``torch.compile`` ``"auto"`` uses the chunk an eager call measured for the
        shape, else one pass. Default ``None``: chunking changes torch BatchNorm statistics
        and is a CPU cache optimisation, so it is opt-in.
    estimator: ``None`` leaves every Bayesian layer's estimator as it is; ``"reparam"``,
        ``"lrt"`` or ``"flipout"`` sets it on all of them (their noise names are kept).
    first_sample: global index of local sample 0 (sampling parallelism splits S this way).
    data_offset: global index of the first example of the local batch (per-example noise).

    ``torch.compile(MonteCarlo(model, S), fullgraph=True)`` works: the step reaches the
    Bayesian ops as a tensor (the buffer), so advancing it does not recompile. The backend
    (``SPAR_BACKEND``) is chosen when the model is traced.
    """

    def __init__(
        self,
        model: nn.Module,
        num_samples: int,
        *,
        seed: int = 0,
        first_sample: int = 0,
        estimator: str | None = None,
        chunk: int | str | None = None,
        fold_input: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 0:
            raise ValueError(f"first_sample must be an int >= 0, got {first_sample!r}")
        if estimator is not None:
            _check_estimator(estimator)
        if not isinstance(fold_input, bool):
            raise TypeError(f"fold_input must be a bool, got {type(fold_input).__name__}")
        self.model = model
        self.num_samples = num_samples
        self.seed = check_seed(seed)
        self.first_sample = first_sample
        self.data_offset = 0
        self.chunk = _check_chunk(chunk)
        self.fold_input = fold_input
        self._auto_chunks: dict[tuple, int] = {}  # chunk="auto": input shape -> chunk
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64))
        assign_noise_names(model)
        if estimator is not None:
            for m in model.modules():
                if isinstance(m, BayesModule):
                    m.estimator = estimator
        if not any(isinstance(m, NoiseModule) for m in model.modules()):
            warnings.warn(
                "MonteCarlo wraps a model without Bayesian layers (or spar.nn.Dropout): all "
                "samples are identical (use spar.nn.bayesianize or spar.nn.Bayes* layers)",
                stacklevel=2,
            )
        if chunk is not None and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SAMPLE_BATCH_NORMS)
            for m in model.modules()
        ):
            warnings.warn(
                "MonteCarlo(chunk=...) with torch's BatchNorm: in training mode a BatchNorm "
                "after the first Bayesian layer normalises each chunk of samples by its own "
                "statistics, and every chunk updates the running statistics (the sample-wise "
                "spar.nn.BatchNorm1d/2d/3d, which spar.nn.bayesianize swaps in, are exact)",
                UserWarning,
                stacklevel=2,
            )

    @property
    def step(self) -> int:
        return int(self._step)

    @step.setter
    def step(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"step must be >= 0, got {value}")
        self._step.fill_(value)

    def chunk_size(self, x: Tensor) -> int | None:
        """Samples per chunk for input ``x`` (``num_samples``: one pass); ``None`` for
        ``chunk="auto"`` before a call with this input shape has measured it."""
        S, chunk = self.num_samples, self.chunk
        if chunk is None:
            return S
        if chunk == "auto":
            return self._auto_chunks.get((tuple(x.shape), x.dtype))
        return min(S, chunk)

    def _measure_chunk(self, x: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, int]:
        """Run sample 0 alone, counting the elements of the distinct module outputs; return
        its output and the chunk size that fits AUTO_CHUNK_ELEMENTS."""
        # the tensors are kept until the count: a freed output's memory could otherwise be
        # reused by a later one and be taken for the same tensor
        seen: dict[tuple[int, int], Tensor] = {}

        def count(module, inputs, output) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, Tensor):
                    seen[(t.data_ptr(), t.numel())] = t

        # hooks on this model's modules only (a global hook would also count other threads')
        handles = [m.register_forward_hook(count) for m in self.model.modules()]
        try:
            out = self._run(x, 1, self.first_sample, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        per_sample = max(1, sum(n for _, n in seen))
        seen.clear()
        c = max(1, min(self.num_samples, AUTO_CHUNK_ELEMENTS // per_sample))
        self._auto_chunks[(tuple(x.shape), x.dtype)] = c
        return out, c

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError("MonteCarlo expects a batched tensor input (B, ...)")
        S = self.num_samples
        c = self.chunk_size(x)
        if c is None and torch.compiler.is_compiling():
            c = S
        stats = None if c == S else _ChunkedRunningStats.of(self.model)
        outs, start = [], 0
        if c is None:  # chunk="auto", first call for this shape
            out, c = self._measure_chunk(x, args, kwargs)
            outs, start = [out], 1
            if stats is not None:
                stats.chunk_done(1 / S)
        for lo in range(start, S, c):
            n = min(c, S - lo)
            outs.append(self._run(x, n, self.first_sample + lo, args, kwargs))
            if stats is not None:
                stats.chunk_done(n / S)
        if stats is not None:
            stats.finish()
        if self.training:
            # a new tensor, not an in-place add: inductor (torch 2.13) may recompute the
            # sampling state's copy of the step from the buffer for backward, after the add
            self._step = self._step + 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, x: Tensor, n: int, first: int, args: tuple, kwargs: dict) -> Tensor:
        """The model on local samples ``[first, first + n)``: ``(n, B, ...)``."""
        B = x.shape[0]
        shared = not self.fold_input and n > 1
        inp = x if shared else x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:])
        # the step buffer itself, not int(step): under torch.compile it stays data
        with sampling(
            n, seed=self.seed, step=self._step, first_sample=first,
            data_offset=self.data_offset, batch_size=B if shared else None,
        ):  # fmt: skip
            if shared and not torch.compiler.is_compiling():
                try:
                    out = self.model(inp, *args, **kwargs)
                except (RuntimeError, ValueError) as err:
                    if not isinstance(err, torch.OutOfMemoryError) and any(
                        w in str(err) for w in _SHAPE_WORDS
                    ):
                        _add_hint(
                            err,
                            f"note: spar.nn.MonteCarlo gave the model its input un-expanded "
                            f"(B={B} rows; layers after the first Bayesian layer see {n}*B "
                            "rows). A model that mixes tensors from before and after the "
                            "first Bayesian layer (a residual connection around it) or "
                            "reshapes by the input's batch size needs "
                            "MonteCarlo(..., fold_input=True).",
                        )
                    raise
            else:
                out = self.model(inp, *args, **kwargs)
        if isinstance(out, Tensor) and out.dim() > 0:
            if out.shape[0] == n * B:
                return out.unflatten(0, (n, B))
            if shared and out.shape[0] == B:
                # no Bayesian layer on the output's path: the same for every sample
                return out.unsqueeze(0).expand(n, *out.shape)
        raise ValueError(
            "the wrapped model must return a tensor whose first dimension is the folded "
            f"batch (samples x B) = {n}*{B} = {n * B}"
            + (f" (or B={B} when no Bayesian layer is on its path)" if shared else "")
            + "; got "
            + (f"{tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__)
        )

    def extra_repr(self) -> str:
        extra = f", chunk={self.chunk!r}" if self.chunk is not None else ""
        extra += ", fold_input=True" if self.fold_input else ""
        return (
            f"num_samples={self.num_samples}, seed={self.seed}, "
            f"first_sample={self.first_sample}{extra}"
        )
