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

  * Up to EXACT_ROWS rows (decode): one graph per input shape, with its own input and output.
  * Up to MAX_ROWS rows (prompts): the rows are padded to a multiple of BUCKET, one graph per
    bucket, whose input and output live in buffers shared by every module (rows of an FFN are
    independent; the padding rows are computed and dropped).

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

# Eager calls of up to EXACT_ROWS rows (tokens) get one graph per exact input shape (decode);
# larger ones up to MAX_ROWS (prefill) are padded to a multiple of BUCKET rows, a graph per
# bucket, its input and output in buffers shared by every module (rows are independent in an
# FFN: the padding rows are computed and dropped). FFNSPLIT_CUDA_GRAPHS=0: never.
EXACT_ROWS = 64
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
        buf = _shared[key] = torch.zeros((rows, cols), dtype=dtype, device=device)
    return buf


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def bucket_rows(rows: int) -> int:
    """The rows a call of `rows` rows is recorded with: itself up to EXACT_ROWS, else rounded up
    to a multiple of BUCKET."""
    return rows if rows <= EXACT_ROWS else -(-rows // BUCKET) * BUCKET


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    addresses: tuple[int, ...]  # data pointers of the tensors the graph reads, at capture


class GraphedCalls:
    """Replays `fn(x)` from CUDA graphs: one per (shape, dtype, device) of x up to
    EXACT_ROWS rows, one per (padded rows, features, dtype, device) up to `max_rows`.

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
        self.warmup = warmup
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
        rows = x.numel() // x.shape[-1]
        exact = rows <= EXACT_ROWS
        padded = rows if exact else bucket_rows(rows)
        if exact:
            key = (tuple(x.shape), x.dtype, x.device)
        else:
            key = (padded, x.shape[-1], x.dtype, x.device)
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
            entry = self.graphs[key] = self._capture(x, None if exact else padded)
            if entry is None:
                return self.fn(x)
        if exact:
            entry.static_in.copy_(x)
            entry.graph.replay()
            return entry.static_out.clone()
        entry.static_in[:rows].copy_(x.reshape(rows, x.shape[-1]))
        entry.graph.replay()
        out = entry.static_out[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1]).clone()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.tensors())

    def _capture(self, x: Tensor, padded: int | None) -> _Graph | None:
        """Warm-up calls then the capture, both on the device's side stream; None if any of it
        fails (the call then runs eagerly, now and for this shape from then on). `padded`: the
        bucketed form, through the shared [padded, features] buffers."""
        device = x.device
        side = _stream(device)
        if padded is None:
            static_in = torch.empty(x.shape, dtype=x.dtype, device=device)
            static_in.copy_(x)
        else:
            static_in = _shared_buffer("in", padded, x.shape[-1], x.dtype, device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    out = self.fn(static_in)
                static_out = None
                if padded is not None:
                    static_out = _shared_buffer("out", padded, out.shape[-1], out.dtype, device)
                with torch.cuda.graph(graph, pool=_pool(device), stream=side):
                    out = self.fn(static_in)
                    if static_out is not None:
                        static_out.copy_(out)
                if static_out is None:
                    static_out = out
        except Exception:  # noqa: BLE001 (any failure: eager; a real error recurs there)
            torch.cuda.current_stream(device).wait_stream(side)
            return None
        torch.cuda.current_stream(device).wait_stream(side)
        return _Graph(graph, static_in, static_out, self._addresses())
