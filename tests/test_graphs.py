"""CUDA graphs of eager SplitFFN calls (ffnsplit/graphs.py): when a call is graphed, that the
replay equals the eager call, and that stale graphs are never replayed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ffnsplit import graphs
from ffnsplit.eval.bench import random_llama, random_plan, split_model_
from ffnsplit.modules import SplitFFN
from ffnsplit.plan import LightFormat

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")


def split_ffn_modules(device: str, dtype: torch.dtype, count: int = 1) -> list[SplitFFN]:
    """The first `count` SplitFFNs of a SmolLM2-shaped model (random weights, 5% heavy, int4
    g128)."""
    model = random_llama("smollm2-135m", torch.device("cpu"), torch.float32, max_positions=64)
    model.model.layers = model.model.layers[:count]
    split_model_(model, random_plan(model, heavy_fraction=0.05, light=LightFormat(bits=4)))
    return [layer.mlp.to(device, dtype) for layer in model.model.layers]


def split_ffn_module(device: str, dtype: torch.dtype) -> SplitFFN:
    return split_ffn_modules(device, dtype)[0]


def recorded(module: SplitFFN) -> int:
    """Graphs the module recorded (a failed capture leaves None: the call ran eagerly)."""
    calls = module.__dict__.get("_graphs")
    return 0 if calls is None else sum(g is not None for g in calls.graphs.values())


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("a CUDA graph cannot be copied")


def test_graphs_are_dropped_on_copy_and_on_reassignment() -> None:
    """Graphs are per module object: deepcopy and pickle leave them out, and reassigning a
    tensor or moving the module drops them (their addresses would be stale)."""
    module = split_ffn_module("cpu", torch.float32)
    x = torch.randn(2, module.hidden_size)
    calls = graphs.GraphedCalls(module._forward, module._graph_tensors)
    module.__dict__["_graphs"] = calls
    calls.graphs["key"] = _Unpicklable()
    clone = copy.deepcopy(module)
    assert clone.__dict__.get("_graphs") is None
    assert pickle.loads(pickle.dumps(module)).__dict__.get("_graphs") is None
    torch.testing.assert_close(clone(x), module(x))
    module.down_bias = torch.zeros(module.hidden_size)
    assert not calls.graphs
    calls.graphs["key"] = None
    module.to(torch.float64)
    assert not calls.graphs
    calls.graphs["key"] = None
    module.load_state_dict(module.state_dict())  # copies into the same tensors: graphs stay
    assert calls.graphs
    module.load_state_dict(copy.deepcopy(module.state_dict()), assign=True)  # new tensors
    assert not calls.graphs


def test_cpu_calls_are_never_graphed() -> None:
    module = split_ffn_module("cpu", torch.float32)
    calls = graphs.GraphedCalls(module._forward, module._graph_tensors)
    x = torch.randn(1, 3, module.hidden_size)
    assert not calls.eligible(x)
    torch.testing.assert_close(calls(x), module._forward(x))
    assert not calls.graphs
    assert len(module._graph_tensors()) == len(list(module.buffers()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graphed_calls_match_eager_calls(dtype) -> None:
    """1 and 3 tokens (GEMV and tensor-core decode paths): the replay equals the eager call on
    fresh inputs every time, outputs are not aliased, and a reassigned bias is picked up."""
    module = split_ffn_module("cuda", dtype)
    calls = []
    for shape in ((1, 1, module.hidden_size), (3, module.hidden_size)):
        for _ in range(3):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            with torch.no_grad():
                out = module(x)
                ref = module._forward(x)  # eager
            torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
            calls.append(out)
    assert recorded(module) == 2  # recorded once per bucket (1 and 4 rows)
    assert calls[0].data_ptr() != calls[1].data_ptr()
    x = torch.randn(3, module.hidden_size, device="cuda", dtype=dtype)
    with torch.no_grad():
        before = module(x)
        module(x)  # graphed
        module.down_bias = torch.ones(module.hidden_size, device="cuda", dtype=dtype)
        after = module(x)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # the bias moves outputs across roundings
    torch.testing.assert_close(after, before + 1, rtol=tol, atol=tol)


def test_shared_buffers_outlive_inference_mode() -> None:
    """A buffer first made under torch.inference_mode() takes in-place copies outside it (the
    graphs' inputs are refilled on every call, whatever mode the caller is in)."""
    with torch.inference_mode():
        buf = graphs._shared_buffer("in", 3, 5, torch.float32, torch.device("cpu"))
    assert not buf.is_inference()
    buf[:2].copy_(torch.ones(2, 5))
    with torch.inference_mode():
        buf.copy_(torch.zeros(3, 5))


def test_bucket_rows() -> None:
    rows = (1, 2, 3, 5, 33, 64, 65, 128, 129, 1000)
    assert [graphs.bucket_rows(r) for r in rows] == [1, 2, 4, 8, 64, 64, 128, 128, 256, 1024]


@needs_cuda
def test_bucketed_graphs_of_two_modules() -> None:
    """Prefill sizes (padded to graphs.BUCKET rows, inputs and outputs in buffers every module
    shares): two modules called in turn on 70- and 200-row inputs each match their eager call;
    outputs are not aliased to the shared buffers."""
    first, second = split_ffn_modules("cuda", torch.float16, count=2)
    outs = []
    for rows in (70, 200, 70):
        for module in (first, second):
            x = torch.randn(1, rows, module.hidden_size, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                out, ref = module(x), module._forward(x)
            assert out.shape == ref.shape == x.shape
            torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
            outs.append((out, out.clone()))
    assert recorded(first) == recorded(second) == 2
    for out, kept in outs:
        assert torch.equal(out, kept)  # later replays did not overwrite earlier outputs


@needs_cuda
def test_graphs_recorded_in_inference_mode_replay_outside_it() -> None:
    """Recorded under torch.inference_mode() (as HF pipelines call), replayed under no_grad and
    with grad mode on (x not requiring grad): same results, no inference-tensor errors."""
    module = split_ffn_module("cuda", torch.float16)
    x = torch.randn(3, module.hidden_size, device="cuda", dtype=torch.float16)
    big = torch.randn(70, module.hidden_size, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        first, first_big = module(x), module(big)
    with torch.no_grad():
        torch.testing.assert_close(module(x), first)
        torch.testing.assert_close(module(big), first_big)
    torch.testing.assert_close(module(x), first)
    assert recorded(module) == 2


@needs_cuda
def test_moved_tensors_are_recorded_again_then_left_eager() -> None:
    """A tensor swapped behind the module's back (as an offloading hook does) is seen at the
    next replay: recorded again with the new tensor, and after graphs.MAX_MOVES moves the module
    stays eager."""
    module = split_ffn_module("cuda", torch.float16)
    x = torch.randn(1, module.hidden_size, device="cuda", dtype=torch.float16)
    module.down_bias = torch.zeros(module.hidden_size, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        base = module(x)
        for step in range(graphs.MAX_MOVES + 2):
            module._buffers["down_bias"] = torch.full_like(module.down_bias, float(step + 1))
            out = module(x)
            torch.testing.assert_close(out, base + step + 1, rtol=2e-3, atol=2e-3)
    assert module._graphs.max_rows == 0 and not module._graphs.graphs


@needs_cuda
def test_ineligible_cuda_calls_run_eagerly() -> None:
    """Inside a caller's own graph capture, above graphs.MAX_ROWS rows, or with autograd
    recording, the kernels run eagerly (nothing is recorded)."""
    module = split_ffn_module("cuda", torch.float16)
    big = torch.randn(graphs.MAX_ROWS + 1, module.hidden_size, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        module(big)
    x = torch.randn(2, module.hidden_size, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        module(x)  # eager warm-up, then recorded by the module
    assert recorded(module) == 1
    module._graphs.clear()
    outer = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), torch.cuda.graph(outer, stream=side):
        out = module(x)
    torch.cuda.current_stream().wait_stream(side)
    assert not module._graphs.graphs
    outer.replay()
    with torch.no_grad():
        module.cuda_graphs = False
        torch.testing.assert_close(out, module(x), rtol=2e-3, atol=2e-3)
    module.cuda_graphs = True
    module(x.requires_grad_())
    assert not module._graphs.graphs


@needs_cuda
def test_first_cuda_call_pads_the_heavy_part() -> None:
    """SmolLM2's 5% heavy count (77) is not a multiple of 8: the first CUDA call pads the heavy
    part to 80 neurons (format.pad_heavy; the buffers become views of the padded tensors, same
    values), before any graph is recorded, and the output still matches an eager call with
    the unpadded part."""
    module = split_ffn_module("cuda", torch.float16)
    original = module.heavy_down.clone()
    assert original.shape[1] % 8 and module.heavy_down.stride(0) % 8
    x = torch.randn(2, module.hidden_size, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = module(x)
    assert module.heavy_down.stride(0) % 8 == 0 and torch.equal(module.heavy_down, original)
    assert module._padded_split().n_heavy % 8 == 0
    assert recorded(module) == 1
    module.cuda_graphs = False
    module.heavy_down = original  # a new tensor: the padded layout is dropped
    assert module._padded_split().n_heavy == original.shape[1]
    with torch.no_grad():
        unpadded = module._forward(x)
        torch.testing.assert_close(unpadded, out, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(module(x), out, rtol=2e-3, atol=2e-3)
    assert module._padded_split().n_heavy % 8 == 0
