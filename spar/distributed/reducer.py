"""Bucketed gradient all-reduce that overlaps with backward (spar's own, not DDP's).

How a step goes
---------------
1. Every parameter that requires grad gets a ``register_post_accumulate_grad_hook``. When
   autograd has finished accumulating its gradient, the hook copies it, pre-scaled by
   ``1 / world``, into its slot of a flat bucket buffer (gloo has no AVG, so we average as
   pre-scale + SUM; pre-scaling also keeps fp16 communication away from overflow).
2. Buckets are filled in reverse parameter order (roughly the order backward produces
   gradients); the first bucket is small (``first_bucket_mb``) so the first all-reduce
   starts as early as possible, the rest are capped at ``bucket_mb``, and the last one is
   small again (its communication cannot overlap anything). After the first
   synchronized step the buckets are rebuilt once from the *observed* ready order (rank 0's
   order, broadcast, so every rank buckets identically).
3. A full bucket is launched with ``async_op=True`` as soon as all buckets before it have
   been launched: launching strictly in bucket order keeps the sequence of collectives the
   same on every rank, which is what makes asynchronous collectives safe.
4. The first hook of a backward queues a callback on the autograd engine; it runs when
   backward finishes, waits for the outstanding buckets and writes the averaged gradients
   back into ``param.grad`` (as views of the bucket buffers when dtypes allow, so no copy
   out). ``loss.backward()`` returns with synchronized gradients: ``optimizer.step()``
   needs no extra call.

Why averaging over the whole world is right
-------------------------------------------
Every rank's loss is the loss of its slice (its S/a samples on its B/b examples) with the
full KL term. The single-process objective is the mean over all S samples and all B
examples plus the KL, i.e. the *mean of the rank losses* over the ``a * b`` ranks (all
slices have equal size; the KL is the same on every rank). So the exact gradient is the
world mean of the rank gradients, for the sample axis and the data axis alike. For the
mixture likelihood every rank of a sample group holds the same loss value, and the
differentiable all-gather's reduce-scatter backward sums ``a`` identical copies; the
``1 / (a * b)`` of the average removes that factor (see :mod:`spar.distributed.collectives`).

Failure modes made loud
-----------------------
* A parameter that received no gradient in a synchronized backward raises a
  ``RuntimeError`` naming it. Before raising, its bucket is still all-reduced (with zeros)
  so that ranks which did produce the gradient are not left waiting in a collective.
* A wait that exceeds ``timeout`` (or the process group's timeout) raises naming the
  bucket, instead of hanging when another rank died or skipped backward.

Timings (``reducer.last_timings``) are host wall-clock times: exact on CPU/gloo, the
launch-side view of the GPU work with NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Reducer", "StepTimings"]

_MB = 2**20
_FLOAT_COMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class StepTimings:
    """Wall-clock accounting of one synchronized backward (seconds).

    Attributes:
        backward_s: backward compute, from the first gradient reaching the wrapped module's
            output (or the first parameter gradient) to the end of autograd's work.
        comm_s: time during which at least one bucket's all-reduce was in flight.
        exposed_s: time the end of backward waited for communication (the part of
            ``comm_s`` that overlap did not hide).
        finalize_s: the whole end-of-backward callback: waiting plus writing gradients back.
        num_buckets: buckets all-reduced this step.
        comm_bytes: bytes all-reduced (per rank).
        launched_before_end: buckets whose all-reduce started before backward compute ended.
        first_launch_s: time from backward start to the first launch.
    """

    backward_s: float
    comm_s: float
    exposed_s: float
    finalize_s: float
    num_buckets: int
    comm_bytes: int
    launched_before_end: int
    first_launch_s: float

    @property
    def exposed_fraction(self) -> float:
        """``exposed_s / comm_s`` (0 when nothing was communicated)."""
        return self.exposed_s / self.comm_s if self.comm_s > 0 else 0.0


class _Bucket:
    """A flat buffer holding the (pre-scaled) gradients of a run of parameters."""

    __slots__ = ("index", "params", "buffer", "views", "pending", "work", "launch_t", "done_t")

    def __init__(self, index: int, params: list[int], buffer: Tensor, views: list[Tensor]):
        self.index = index
        self.params = params  # parameter indices, in slot order
        self.buffer = buffer  # (sum of numels,) in the communication dtype
        self.views = views  # views[j]: buffer slot of params[j], shaped like the parameter
        self.pending = len(params)
        self.work: Any = None
        self.launch_t = 0.0
        self.done_t = 0.0


def _comm_dtype(p: Tensor, comm_dtype: torch.dtype | None) -> torch.dtype:
    return comm_dtype if comm_dtype is not None and p.is_floating_point() else p.dtype


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class Reducer:
    """Average gradients over ``group`` with bucketed all-reduces overlapped with backward.

    Args:
        module: an ``nn.Module`` (its parameters that require grad, shared ones once), or an
            iterable of parameters or of ``(name, parameter)`` pairs.
        group: the process group to average over; default the whole world.
        bucket_mb: cap of a bucket in MiB (of the communication dtype).
        first_bucket_mb: cap of the first bucket, small so communication starts early.
        comm_dtype: e.g. ``torch.bfloat16`` or ``torch.float16`` to halve the traffic;
            gradients are converted back to the parameter dtype after the all-reduce.
        find_unused_parameters: reduce zeros (or a gradient accumulated under
            :meth:`no_sync`) for parameters that got no gradient, instead of raising.
        gradient_as_bucket_view: after a step, ``param.grad`` is a view of the bucket buffer
            (no copy back, no second copy of the gradients); ignored when ``comm_dtype``
            differs from the parameter dtype.
        small_last_bucket: give the last-ready parameters (at most ``first_bucket_mb``, at
            least one parameter) a bucket of their own. The last bucket can only be sent
            after backward, so all of its communication is exposed; this keeps it short.
        timeout: seconds (or ``timedelta``) to wait for a bucket before raising; default
            the process group's timeout.
        keep_timings: how many steps of :class:`StepTimings` to keep in :attr:`timings`.

    With a one-rank group (or without ``torch.distributed``) the reducer installs nothing.
    """

    def __init__(
        self,
        module: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        group: Any = None,
        *,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        comm_dtype: torch.dtype | None = None,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True,
        small_last_bucket: bool = True,
        timeout: float | datetime.timedelta | None = None,
        keep_timings: int = 100,
    ) -> None:
        for name, value in (("bucket_mb", bucket_mb), ("first_bucket_mb", first_bucket_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of MiB, got {value!r}")
        if comm_dtype is not None and comm_dtype not in _FLOAT_COMM_DTYPES:
            raise ValueError(
                f"comm_dtype must be one of {_FLOAT_COMM_DTYPES} or None, got {comm_dtype}"
            )
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, got {timeout}")
            timeout = datetime.timedelta(seconds=float(timeout))
        self.timeout: datetime.timedelta | None = timeout
        self.bucket_bytes = int(bucket_mb * _MB)
        self.first_bucket_bytes = min(int(first_bucket_mb * _MB), self.bucket_bytes)
        self.comm_dtype = comm_dtype
        self.find_unused_parameters = bool(find_unused_parameters)
        self.gradient_as_bucket_view = bool(gradient_as_bucket_view)
        self.small_last_bucket = bool(small_last_bucket)
        self.timings: deque[StepTimings] = deque(maxlen=keep_timings)

        named = self._collect(module)
        self.names = [n for n, _ in named]
        self.params: list[Tensor] = [p for _, p in named]
        initialized = dist.is_available() and dist.is_initialized()
        self.group = group if group is not None else (dist.group.WORLD if initialized else None)
        self.world_size = dist.get_world_size(self.group) if initialized else 1
        self.rank = dist.get_rank(self.group) if initialized else 0
        self.enabled = self.world_size > 1 and len(self.params) > 0
        self._scale = 1.0 / self.world_size
        self._sync = True
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._rebuilt = False
        self.buckets: list[_Bucket] = []
        self._slot: list[tuple[int, int]] = []  # param index -> (bucket index, slot)
        self._reset_step()
        if not self.enabled:
            return
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must be on one device, found {sorted(map(str, devices))}"
            )
        self._assign(list(range(len(self.params)))[::-1])
        for i, p in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
        if isinstance(module, nn.Module):
            self._handles.append(module.register_forward_pre_hook(self._on_forward_pre))
            self._handles.append(module.register_forward_hook(self._on_forward))

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _collect(module) -> list[tuple[str, Tensor]]:
        if isinstance(module, nn.Module):
            items = list(module.named_parameters())
        else:
            items = []
            for k, item in enumerate(module):
                if isinstance(item, tuple):
                    items.append((str(item[0]), item[1]))
                else:
                    items.append((f"param{k}", item))
        seen: set[int] = set()
        out = []
        for name, p in items:
            if not isinstance(p, Tensor):
                raise TypeError(f"{name} is not a tensor: {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    def _assign(self, order: list[int]) -> None:
        """Lay the parameters out in buckets, in ``order`` (parameter indices)."""
        groups: list[list[int]] = []
        key = None
        size = 0
        for i in order:
            p = self.params[i]
            dt = _comm_dtype(p, self.comm_dtype)
            nbytes = p.numel() * dt.itemsize
            cap = self.first_bucket_bytes if len(groups) <= 1 else self.bucket_bytes
            if not groups or (dt, p.device) != key or (size + nbytes > cap and size > 0):
                groups.append([])
                key, size = (dt, p.device), 0
            groups[-1].append(i)
            size += nbytes
        if self.small_last_bucket and len(groups) > 1 and len(groups[-1]) > 1:
            # The last bucket can only be sent once backward is over, so all of its
            # communication is exposed: keep it to the last-ready parameters (at most
            # first_bucket_mb, at least one parameter) and send the rest one bucket earlier.
            tail: list[int] = []
            tail_bytes = 0
            for i in reversed(groups[-1]):
                nbytes = (
                    self.params[i].numel() * _comm_dtype(self.params[i], self.comm_dtype).itemsize
                )
                if tail and tail_bytes + nbytes > self.first_bucket_bytes:
                    break
                tail.insert(0, i)
                tail_bytes += nbytes
            if len(tail) < len(groups[-1]):
                groups[-1] = groups[-1][: len(groups[-1]) - len(tail)]
                groups.append(tail)
        self.buckets = []
        self._slot = [(0, 0)] * len(self.params)
        for b, idx in enumerate(groups):
            p0 = self.params[idx[0]]
            dt = _comm_dtype(p0, self.comm_dtype)
            buffer = torch.zeros(
                sum(self.params[i].numel() for i in idx), dtype=dt, device=p0.device
            )
            views, offset = [], 0
            for j, i in enumerate(idx):
                n = self.params[i].numel()
                views.append(buffer[offset : offset + n].view(self.params[i].shape))
                self._slot[i] = (b, j)
                offset += n
            self.buckets.append(_Bucket(b, idx, buffer, views))

    def remove(self) -> None:
        """Remove every hook: the module trains unsynchronized afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.enabled = False

    def bucket_names(self) -> list[list[str]]:
        """Parameter names per bucket, in launch order."""
        return [[self.names[i] for i in b.params] for b in self.buckets]

    @property
    def last_timings(self) -> StepTimings | None:
        """Timings of the latest synchronized backward, or ``None`` before the first."""
        return self.timings[-1] if self.timings else None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside the context; the first
        synchronized backward after it all-reduces the accumulated sum."""
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    # ------------------------------------------------------------------ per step

    def _reset_step(self) -> None:
        self._active = False
        self._ready = [False] * len(self.params)
        self._observed: list[int] = []
        self._next_launch = 0
        self._bwd_start: float | None = None
        for b in self.buckets:
            b.pending = len(b.params)
            b.work = None
            b.launch_t = b.done_t = 0.0

    def _on_forward_pre(self, module, args) -> None:
        if self._active:
            # a previous backward died before its end-of-backward callback: start clean
            self._reset_step()

    def _on_forward(self, module, args, output) -> None:
        if not (self._sync and torch.is_grad_enabled()):
            return
        # the first gradient to reach the output marks the start of backward compute
        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: Tensor) -> None:
        if self._bwd_start is None:
            self._bwd_start = time.perf_counter()

    def _make_hook(self, i: int):
        def hook(p: Tensor) -> None:
            if self._sync:
                self._on_ready(i, p)

        return hook

    def _on_ready(self, i: int, p: Tensor) -> None:
        with self._lock:
            now = time.perf_counter()
            if not self._active:
                self._active = True
                if self._bwd_start is None:
                    self._bwd_start = now
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            if self._ready[i]:
                raise RuntimeError(
                    f"spar Reducer: parameter {self.names[i]} received a second gradient in "
                    "the same backward pass (reentrant or repeated backward without "
                    "no_sync()); its bucket was already sent"
                )
            self._ready[i] = True
            if not self._rebuilt:
                self._observed.append(i)
            b_idx, slot = self._slot[i]
            bucket = self.buckets[b_idx]
            view = bucket.views[slot]
            self._fill(p, view)
            if (
                self.gradient_as_bucket_view
                and view.dtype == p.dtype
                and p.grad is not None
                and p.grad.data_ptr() != view.data_ptr()
            ):
                # The bucket holds the gradient now; free autograd's copy at once (it becomes
                # the bucket view at the end of backward). Backward then keeps one transient
                # gradient alive instead of all of them, and the allocator hands the freed
                # block to the next layer's gradient instead of mapping fresh pages.
                p.grad = None
            bucket.pending -= 1
            self._launch_ready()

    def _fill(self, p: Tensor, view: Tensor) -> None:
        grad = p.grad
        if grad is None:
            view.zero_()
        elif grad.data_ptr() == view.data_ptr() and grad.dtype == view.dtype:
            grad.mul_(self._scale)  # the gradient already lives in the bucket
        else:
            torch.mul(grad, self._scale, out=view)

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending:
                return
            bucket.launch_t = time.perf_counter()
            bucket.done_t = 0.0
            bucket.work = dist.all_reduce(
                bucket.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
            fut = bucket.work.get_future()
            fut.add_done_callback(lambda _f, b=bucket: setattr(b, "done_t", time.perf_counter()))
            self._next_launch += 1

    def _finalize(self) -> None:
        compute_end = time.perf_counter()
        try:
            missing = [i for i, r in enumerate(self._ready) if not r]
            with self._lock:
                for i in missing:
                    # still send the bucket (zeros, or a no_sync-accumulated gradient when
                    # allowed) so ranks that did produce this gradient are not left waiting
                    b_idx, slot = self._slot[i]
                    view = self.buckets[b_idx].views[slot]
                    if self.find_unused_parameters:
                        self._fill(self.params[i], view)
                    else:
                        view.zero_()
                    self.buckets[b_idx].pending -= 1
                self._launch_ready()
            for bucket in self.buckets:
                self._wait(bucket)
            waited = time.perf_counter()
            self._write_back(missing)
            end = time.perf_counter()
            self._record(compute_end, waited, end)
            if not self._rebuilt:
                # a collective: every rank must get here, whatever it raises below
                self._rebuild()
            if missing and not self.find_unused_parameters:
                names = ", ".join(self.names[i] for i in missing)
                raise RuntimeError(
                    f"spar Reducer: {len(missing)} parameter(s) received no gradient in this "
                    f"backward pass on rank {self.rank}: {names}. Every parameter that "
                    "requires grad must contribute to the loss on every rank, or the ranks "
                    "would wait on each other forever. Freeze them (requires_grad=False), "
                    "or pass find_unused_parameters=True to all-reduce zeros for them."
                )
        finally:
            self._reset_step()

    def _wait(self, bucket: _Bucket) -> None:
        try:
            if self.timeout is not None:
                bucket.work.wait(self.timeout)
            else:
                bucket.work.wait()
        except Exception as exc:
            names = [self.names[i] for i in bucket.params]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise RuntimeError(
                f"spar Reducer: the all-reduce of bucket {bucket.index} ({shown}) failed or "
                f"timed out on rank {self.rank} of {self.world_size}: another rank probably "
                f"raised, died or skipped backward. Cause: {exc}"
            ) from exc
        if bucket.done_t < bucket.launch_t:  # the completion callback has not run yet
            bucket.done_t = time.perf_counter()

    def _write_back(self, missing: list[int]) -> None:
        skip = set() if self.find_unused_parameters else set(missing)
        for bucket in self.buckets:
            for i, view in zip(bucket.params, bucket.views, strict=True):
                if i in skip:
                    continue  # it got no gradient and will be reported: leave .grad alone
                p = self.params[i]
                grad = p.grad
                if self.gradient_as_bucket_view and view.dtype == p.dtype:
                    if grad is None or grad.data_ptr() != view.data_ptr():
                        p.grad = view
                elif grad is None:
                    p.grad = view.to(p.dtype)
                else:
                    grad.copy_(view)

    def _record(self, compute_end: float, waited: float, end: float) -> None:
        launches = [b.launch_t for b in self.buckets]
        start = self._bwd_start if self._bwd_start is not None else compute_end
        self.timings.append(
            StepTimings(
                backward_s=compute_end - start,
                comm_s=_union_length(
                    [(b.launch_t, max(b.done_t, b.launch_t)) for b in self.buckets]
                ),
                exposed_s=waited - compute_end,
                finalize_s=end - compute_end,
                num_buckets=len(self.buckets),
                comm_bytes=sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets),
                launched_before_end=sum(t < compute_end for t in launches),
                first_launch_s=min(launches) - start,
            )
        )

    def _rebuild(self) -> None:
        """Rebuild the buckets once from the observed ready order (rank 0's, broadcast)."""
        self._rebuilt = True
        seen = set(self._observed)
        order = self._observed + [i for i in reversed(range(len(self.params))) if i not in seen]
        device = self.params[0].device
        t = torch.tensor(order, dtype=torch.int64, device=device)
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0), group=self.group)
        order = t.tolist()
        current = [i for b in self.buckets for i in b.params]
        if order == current:
            return
        old_grads = [p.grad for p in self.params]
        self._assign(order)
        for i, p in enumerate(self.params):
            b_idx, slot = self._slot[i]
            view = self.buckets[b_idx].views[slot]
            if old_grads[i] is not None and self.gradient_as_bucket_view and view.dtype == p.dtype:
                view.copy_(old_grads[i])
                p.grad = view


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
