"""CUDA graphs of a module's forward for eager calls with few rows (decode steps).

A split FFN at decode size launches 3-5 Triton kernels whose Python launch path (argument
binding, specialization, our own grid and tuner bookkeeping) costs far more host time than the
kernels take on the GPU: one eager SplitFFN call at M = 1 took 516 us of host time on the H200
machine against ~45 us of GPU time (benchmarks/RESULTS.md, session 12), so an eager decode loop
(HF `generate` without a compiled or graphed model) ran slower than the dense model it was meant
to beat. `GraphedCalls` records the call once per input shape as a CUDA graph (after warm-up
calls that compile and tune outside the capture) and replays it: the host cost of a call becomes
one copy of the input, the replay and one copy of the output.

A call runs eagerly (and is never captured) when: it is not on a CUDA device; a graph capture is
already under way (the caller is recording its own graph, as `ffnsplit bench`'s StaticDecoder
does: the kernels go into that graph); torch.compile is tracing; autograd would record it; it has
more than `max_rows` rows; or the shape's capture failed once (then it stays eager). Graphs are
recorded on one side stream per device into one memory pool per device shared by every module
(only the graphs' inputs and outputs stay allocated between calls) and replayed on the current
stream; their outputs are copied out, so a later replay never overwrites a tensor the caller
holds. The owner must call `clear()` when its tensors are replaced (moved, cast, loaded, or an
attribute reassigned); a replay also checks that the tensors the graph read still live at the
same addresses. Two graphs must not be replayed concurrently on different streams: like the
eager kernels, they share per-device scratch counters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# rows (tokens) up to which eager calls are graphed; 0 or FFNSPLIT_CUDA_GRAPHS=0: never
MAX_ROWS = 64
ENABLED = os.environ.get("FFNSPLIT_CUDA_GRAPHS", "1") != "0"

_pools: dict[torch.device, tuple] = {}
_streams: dict[torch.device, torch.cuda.Stream] = {}


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


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    addresses: tuple[int, ...]  # data pointers of the tensors the graph reads, at capture


class GraphedCalls:
    """Replays `fn(x)` from CUDA graphs, one per (shape, strides, dtype, device) of x.

    `tensors()` lists the tensors `fn` reads besides x (weights, biases); a graph whose tensors
    moved is dropped and recorded again. `warmup` eager calls precede each capture (the first
    call compiles the kernels and tunes their configs, which cannot happen inside a capture).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        tensors: Callable[[], Sequence[Tensor]],
        max_rows: int = MAX_ROWS,
        warmup: int = 2,
    ) -> None:
        self.fn, self.tensors = fn, tensors
        self.max_rows, self.warmup = max_rows, warmup
        self.graphs: dict[tuple, _Graph | None] = {}  # None: capture failed, stay eager

    def clear(self) -> None:
        """Drop every graph (the owner's tensors changed)."""
        self.graphs.clear()

    def eligible(self, x: Tensor) -> bool:
        """Whether a call on x may be served from a graph (see the module docstring)."""
        if not (x.is_cuda and self.max_rows > 0):
            return False
        if x.dim() == 0 or x.numel() // max(x.shape[-1], 1) > self.max_rows:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return not (_compiling() or torch.cuda.is_current_stream_capturing())

    def __call__(self, x: Tensor) -> Tensor:
        if not self.eligible(x):
            return self.fn(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self.graphs.get(key, False)
        if entry is None:  # its capture failed: eager
            return self.fn(x)
        if entry is not False:
            if entry.addresses == self._addresses():
                entry.static_in.copy_(x)
                entry.graph.replay()
                return entry.static_out.clone()
            del self.graphs[key]  # the tensors moved: record again
        entry = self.graphs[key] = self._capture(x)
        if entry is None:
            return self.fn(x)
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out.clone()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.tensors())

    def _capture(self, x: Tensor) -> _Graph | None:
        """Warm-up calls then the capture, both on the device's side stream; None if any of it
        fails (the call then runs eagerly, now and for this shape from then on)."""
        device = x.device
        side = _stream(device)
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        static_in.copy_(x)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
                with torch.cuda.graph(graph, pool=_pool(device), stream=side):
                    static_out = self.fn(static_in)
        except Exception:  # noqa: BLE001 (any failure: eager; a real error recurs there)
            torch.cuda.current_stream(device).wait_stream(side)
            return None
        torch.cuda.current_stream(device).wait_stream(side)
        return _Graph(graph, static_in, static_out, self._addresses())
