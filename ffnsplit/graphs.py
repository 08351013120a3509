"""CUDA graphs of a module's forward for eager calls (decode steps and prompts up to 1,024 rows).

A split FFN launches 3-11 kernels a call, and their Python launch path (argument binding and
specialization in Triton, our own grid and tuner bookkeeping) costs more host time than the
kernels take on the GPU at decode sizes: one eager SplitFFN call of the Llama-3-8B shape took
~300 us of host time at M = 1 on the H200 machine against ~45 us of GPU time, and ~630 us at
M = 256-512 against 270-460 (benchmarks/RESULTS.md, session 12). An eager loop (HF `generate`
without a compiled or graphed model) then decoded slower than the dense model it was meant to
beat. `GraphedCalls` records the call as a CUDA graph (after warm-up calls that compile and tune
outside the capture) and replays it: the host cost of a call becomes a copy of the input, the
replay and a copy of the output.

The rows of a call are padded to a bucket (a power of two up to POW2_ROWS = 64, decode
batches; a multiple of BUCKET = 128 up to MAX_ROWS = 1,024, prompts), one graph per bucket, whose
input and output live in buffers shared by every module (rows of an FFN are independent: the
padding rows are computed and dropped), so a module holds graphs, not activations.

A call runs eagerly (and is never captured) when: it is not on a CUDA device; a graph capture is
already under way (the caller is recording its own graph, as `ffnsplit bench`'s StaticDecoder
does: the kernels go into that graph); torch.compile is tracing; autograd would record it; it has
more than MAX_ROWS rows; or the shape's capture failed once (then it stays eager). Graphs are
recorded on one side stream per device into one memory pool per device shared by every module
and replayed on the current stream; their outputs are copied out, so a later replay never
overwrites a tensor the caller holds. The owner calls `clear()` when its tensors are replaced
(moved, cast, loaded, an attribute reassigned); a replay also checks that the tensors the graph
reads still live at the addresses it recorded, and records again if not, at most MAX_MOVES
times (a module whose weights a hook moves before every call, as accelerate's CPU offloading
does, then stays eager). Two graphs must not be replayed concurrently on different streams: like
the eager kernels, they share per-device scratch counters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# An eager call's rows (tokens) are padded to a bucket: a power of two up to POW2_ROWS (decode
# batches), a multiple of BUCKET above (prompts), at most MAX_ROWS; one graph per bucket, its
# input and output in buffers shared by every module (rows are independent in an FFN: the padding
# rows are computed and dropped). FFNSPLIT_CUDA_GRAPHS=0: never.
POW2_ROWS = 64
BUCKET = 128
MAX_ROWS = 1024
ENABLED = os.environ.get("FFNSPLIT_CUDA_GRAPHS", "1") != "0"
MAX_MOVES = 2  # after this many re-recordings for moved tensors a module stays eager

_pools: dict[torch.device, tuple] = {}
_streams: dict[torch.device, torch.cuda.Stream] = {}
_shared: dict[tuple, Tensor] = {}  # the bucketed graphs' inputs and outputs


def _pool(device: torch.device) -> tuple:
    pool = _pools.get(device)
    if pool is None:
        pool = _pools[device] = torch.cuda.graph_pool_handle()
    return pool


def _stream(device: torch.device) -> torch.cuda.Stream:
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device=device)
    return stream


def _shared_buffer(role: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    """The [rows, cols] input or output buffer of every bucketed graph of that size (zeros at
    first: padding rows always hold finite values)."""
    key = (role, rows, cols, dtype, device)
    buf = _shared.get(key)
    if buf is None:
        # a normal tensor even when the first call runs under torch.inference_mode(): later
        # calls outside it copy into the buffer in place, which an inference tensor refuses
        with torch.inference_mode(False):
            buf = _shared[key] = torch.zeros((rows, cols), dtype=dtype, device=device)
    return buf


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def bucket_rows(rows: int) -> int:
    """The rows a call of `rows` rows is recorded with: the next power of two up to POW2_ROWS,
    else the next multiple of BUCKET."""
    if rows <= POW2_ROWS:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // BUCKET) * BUCKET


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    addresses: tuple[int, ...]  # data pointers of the tensors the graph reads, at capture


class GraphedCalls:
    """Replays `fn(x)` from CUDA graphs, one per (padded rows, features, dtype, device) of x up
    to `max_rows` rows.

    `tensors()` lists the tensors `fn` reads besides x (weights, biases); a graph whose tensors
    moved is dropped and recorded again. `warmup` eager calls precede each capture (the first
    call compiles the kernels and tunes their configs, which cannot happen inside a capture).
    `fn` must treat rows independently (the bucketed graphs compute padding rows).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        tensors: Callable[[], Sequence[Tensor]],
        max_rows: int | None = None,
        warmup: int = 2,
    ) -> None:
        self.fn, self.tensors = fn, tensors
        self.max_rows = MAX_ROWS if max_rows is None else max_rows
        self.warmup = max(1, warmup)  # at least one: it gives the output's shape
        self.graphs: dict[tuple, _Graph | None] = {}  # None: capture failed, stay eager
        self.moves = 0  # graphs dropped because the tensors had moved since their capture

    def clear(self) -> None:
        """Drop every graph (the owner's tensors changed)."""
        self.graphs.clear()

    def eligible(self, x: Tensor) -> bool:
        """Whether a call on x may be served from a graph (see the module docstring)."""
        if not (x.is_cuda and self.max_rows > 0) or x.dim() == 0:
            return False
        if x.numel() // max(x.shape[-1], 1) > self.max_rows:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return not (_compiling() or torch.cuda.is_current_stream_capturing())

    def __call__(self, x: Tensor) -> Tensor:
        if not self.eligible(x):
            return self.fn(x)
        features = x.shape[-1]
        rows = x.numel() // features
        padded = bucket_rows(rows)
        key = (padded, features, x.dtype, x.device)
        entry = self.graphs.get(key, False)
        if entry is None:  # its capture failed: eager
            return self.fn(x)
        if entry is not False and entry.addresses != self._addresses():
            # the tensors moved (a hook that loads them before each call, as accelerate's
            # offloading does, moves them every time): record again, at most MAX_MOVES times
            self.moves += 1
            if self.moves > MAX_MOVES:
                self.max_rows = 0
                self.graphs.clear()
                return self.fn(x)
            entry = False
        if entry is False:
            entry = self.graphs[key] = self._capture(x, padded)
            if entry is None:
                return self.fn(x)
        entry.static_in[:rows].copy_(x.reshape(rows, features))
        entry.graph.replay()
        out = entry.static_out[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1]).clone()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.tensors())

    def _capture(self, x: Tensor, padded: int) -> _Graph | None:
        """Warm-up calls then the capture, both on the device's side stream, through the shared
        [padded, features] buffers; None if any of it fails (the call then runs eagerly, now and
        for this bucket from then on)."""
        device = x.device
        side = _stream(device)
        # the warm-ups and the capture run on whatever the buffer holds (finite values); the
        # caller copies x in before the replay
        static_in = _shared_buffer("in", padded, x.shape[-1], x.dtype, device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    out = self.fn(static_in)
                static_out = _shared_buffer("out", padded, out.shape[-1], out.dtype, device)
                # thread_local: a capture must not make other threads' CUDA calls fail
                with torch.cuda.graph(graph, pool=_pool(device), stream=side,
                                      capture_error_mode="thread_local"):  # fmt: skip
                    static_out.copy_(self.fn(static_in))
        except Exception:  # noqa: BLE001 (any failure: eager; a real error recurs there)
            torch.cuda.current_stream(device).wait_stream(side)
            return None
        torch.cuda.current_stream(device).wait_stream(side)
        return _Graph(graph, static_in, static_out, self._addresses())
