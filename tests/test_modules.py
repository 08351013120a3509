"""SplitFFN and compress_model: exactness of the split, quantized and low-rank light parts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ffnsplit.apply import build_split_ffn, check_plan, compress_model, ffn_geometry
from ffnsplit.arch import get_ffn_blocks
from ffnsplit.errors import CheckpointError, NumericalError, OptionError
from ffnsplit.kernels.ops import split_ffn
from ffnsplit.modules import SplitFFN
from ffnsplit.plan import LayerPlan, LightFormat, make_plan
from ffnsplit.profile import profile_model
from tests.tiny_models import tiny_input_ids, tiny_model

FAMILIES = ["llama", "gpt2", "bert", "opt", "phi3"]


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_layer_plan(size: int, n_heavy: int, light: LightFormat, seed: int = 0, n_pruned=0):
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    light_idx = sorted(perm[n_heavy : size - n_pruned])
    return LayerPlan(
        layer=0,
        heavy_idx=perm[:n_heavy],
        light_idx=light_idx,
        pruned_idx=sorted(perm[size - n_pruned :]),
        light=light,
        heavy_dtype="float32",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_permutation_and_dense_split_leave_the_function_unchanged(family):
    model = tiny_model(family)
    ids = tiny_input_ids(model)
    reference = outputs(model, ids)
    profile = profile_model(model, ids, batch_size=2)
    plan = make_plan(
        profile,
        geometry=ffn_geometry(model),
        light=LightFormat(kind="dense"),
        heavy_fraction=0.1,
        selection="random",
        heavy_dtype="float32",
    )
    assert any(layer.permutation().tolist() != sorted(layer.heavy_idx + layer.light_idx)
               for layer in plan.layers)  # fmt: skip
    compress_model(model, plan)
    assert sum(isinstance(m, SplitFFN) for m in model.modules()) == len(plan.layers)
    assert (outputs(model, ids) - reference).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("family", "light", "n_heavy"),
    [
        ("llama", LightFormat(bits=4, group_size=32), 17),  # 143 light -> padded to 160
        ("llama", LightFormat(bits=3, group_size=64, symmetric=True), 0),
        ("gpt2", LightFormat(bits=2, group_size=-1), 40),
        ("opt", LightFormat(bits=8, group_size=128), 5),
    ],
)
def test_quantized_split_equals_the_dense_ffn_of_its_dequantized_weights(family, light, n_heavy):
    model = tiny_model(family)
    parts = get_ffn_blocks(model)[0].parts()
    layer = random_layer_plan(parts.intermediate_size, n_heavy, light, n_pruned=3)
    module = build_split_ffn(parts, layer)
    w = module.split_weights()
    assert w.n_light % 32 == 0 and w.n_light >= layer.n_light

    def join(heavy, qw, dim):
        pieces = [t for t in (heavy, qw.dequantize()) if t is not None]
        return torch.cat(pieces, dim=dim)

    dense = type(parts)(
        up=join(w.heavy_up, w.light_up, 0),
        gate=None if not w.gated else join(w.heavy_gate, w.light_gate, 0),
        down=join(w.heavy_down, w.light_down, 1),
        up_bias=w.up_bias,
        gate_bias=w.gate_bias,
        down_bias=w.down_bias,
        activation=parts.activation,
    )
    x = torch.randn(3, 7, parts.hidden_size)
    assert (module(x) - dense.forward(x)).abs().max() < 1e-5
    # Heavy and light rows are the original neurons in plan order, light ones within half a step.
    perm = layer.permutation()[: layer.n_heavy + layer.n_light]
    original = parts.up[perm]
    restored = dense.up[: perm.numel()]
    half_step = (
        original.abs().max() / (2 ** (light.bits - 1) - 1) / 2
    )  # the coarser, symmetric grid
    assert (restored - original).abs().max() <= half_step * 1.01


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_heavy_tier_equals_its_dequantized_ffn(family):
    model = tiny_model(family)
    parts = get_ffn_blocks(model)[0].parts()
    layer = random_layer_plan(160, 20, LightFormat(bits=3, group_size=32), n_pruned=4)
    layer.heavy_dtype = "int8"
    module = build_split_ffn(parts, layer)
    assert module.heavy_kind == "int8" and module.n_heavy == 20
    assert module.qheavy_up.weight().shape == (32, parts.hidden_size)  # 20 padded to 32
    light, heavy = module.split_weights(), module._tiers()[1]
    order = [*layer.heavy_idx, *layer.light_idx]

    def rows(name: str, dim: int = 0) -> torch.Tensor:
        tiers = (getattr(heavy, f"light_{name}"), getattr(light, f"light_{name}"))
        full = [t.dequantize() for t in tiers if t is not None]
        kept = [f.narrow(dim, 0, n) for f, n in zip(full, (20, layer.n_light), strict=True)]
        return torch.cat(kept, dim=dim)

    def biases(name: str) -> torch.Tensor | None:
        pair = (getattr(heavy, name), getattr(light, name))
        if pair[0] is None:
            return None
        return torch.cat([pair[0][:20].float(), pair[1][: layer.n_light].float()])

    dense = type(parts)(
        up=rows("up"),
        gate=rows("gate") if parts.gated else None,
        down=rows("down", 1),
        up_bias=biases("up_bias"),
        gate_bias=biases("gate_bias"),
        down_bias=None if parts.down_bias is None else parts.down_bias.half().float(),
        activation=parts.activation,
    )
    x = torch.randn(2, 9, parts.hidden_size)
    assert (module(x) - dense.forward(x)).abs().max() < 1e-4
    # The per-tier path (the GPU's) agrees with the dense CPU cache.
    tiers = module._tiers()
    by_tier = sum(split_ffn(x, tier, backend="torch") for tier in tiers)
    assert (by_tier - module(x)).abs().max() < 1e-4
    # int8 heavy rows are close to the originals: much closer than the 3-bit light rows.
    heavy_error = (dense.up[:20] - parts.up[order[:20]]).abs().max()
    light_error = (dense.up[20:] - parts.up[order[20:]]).abs().max()
    assert heavy_error < light_error / 8


def test_lowrank_light_part_matches_its_factors():
    model = tiny_model("llama")
    parts = get_ffn_blocks(model)[1].parts()
    full_rank = LightFormat(kind="lowrank", rank_fraction=1.0)
    layer = random_layer_plan(parts.intermediate_size, 12, full_rank)
    module = build_split_ffn(parts, layer)
    x = torch.randn(2, 5, parts.hidden_size)
    # Full rank reproduces the permuted FFN to fp32 rounding (factors stored in float32).
    assert (module(x) - parts.forward(x)).abs().max() < 1e-4
    low = build_split_ffn(
        parts, random_layer_plan(parts.intermediate_size, 12, LightFormat(kind="lowrank", rank=4))
    )
    assert low.lowrank_up.lowrank_a.shape == (148, 4)
    assert (low(x) - parts.forward(x)).abs().max() > 1e-3


def test_meta_round_trip_gives_an_identical_skeleton():
    model = tiny_model("llama")  # mlp_bias=True: every bias is present
    parts = get_ffn_blocks(model)[0].parts()
    for light in (LightFormat(bits=3, group_size=32), LightFormat(kind="lowrank", rank=6)):
        module = build_split_ffn(parts, random_layer_plan(160, 9, light))
        meta = json.loads(json.dumps(module.meta()))
        skeleton = SplitFFN.from_meta(meta)
        expected = {k: (v.dtype, v.shape) for k, v in module.state_dict().items()}
        assert {k: (v.dtype, v.shape) for k, v in skeleton.state_dict().items()} == expected
        assert all(t.is_meta for t in skeleton.state_dict().values())
        assert skeleton.meta() == meta
        skeleton.load_state_dict(module.state_dict(), assign=True, strict=True)
        x = torch.randn(4, parts.hidden_size)
        assert torch.equal(skeleton(x), module(x))
    with pytest.raises(CheckpointError):
        SplitFFN.from_meta({**meta, "dtype": "float99"})
    with pytest.raises(CheckpointError):
        SplitFFN.from_meta({k: v for k, v in meta.items() if k != "light"})


def test_gptq_and_weighted_lowrank_use_calibration():
    model = tiny_model("llama")
    ids = tiny_input_ids(model, batch=4, seq=16)
    reference = outputs(model, ids)
    profile = profile_model(model, ids, batch_size=2)
    errors = {}
    for method in ("rtn", "gptq"):
        light = LightFormat(bits=2, group_size=32, method=method)
        plan = make_plan(profile, geometry=ffn_geometry(model), light=light, heavy_fraction=0.05)
        fresh = tiny_model("llama")
        if method == "gptq":
            with pytest.raises(OptionError, match="calibration"):
                compress_model(fresh, plan)
        compress_model(fresh, plan, calib_ids=ids, batch_size=3)
        errors[method] = float((outputs(fresh, ids) - reference).square().mean())
    assert errors["gptq"] < errors["rtn"]


def test_compress_refuses_another_models_plan_and_non_finite_weights():
    model = tiny_model("llama")
    ids = tiny_input_ids(model)
    profile = profile_model(model, ids, batch_size=2)
    plan = make_plan(profile, geometry=ffn_geometry(model), light=LightFormat(), heavy_fraction=0.1)
    other = tiny_model("llama", seed=1)
    with pytest.raises(CheckpointError, match="another model") as info:
        compress_model(other, plan)
    assert "\n" not in str(info.value)
    check_plan(plan, model)
    parts = get_ffn_blocks(model)[1].parts()
    parts.down[3, 5] = float("nan")
    with pytest.raises(NumericalError, match="layer 1"):
        build_split_ffn(parts, plan.layers[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_whole_smollm2_shape_model_triton_matches_reference(dtype, tol) -> None:
    """A whole SmolLM2-135M-shaped model (random weights: the packaged GGUF cannot travel to the
    GPU machine), every FFN split (5% heavy: even layers fp16, odd layers int8; int4 g128 light),
    run on CUDA through the Triton kernels at one token (GEMV path) and at 2 x 33 tokens (tensor
    cores), against the same compressed model on the CPU in fp32 (the torch reference path)."""
    from ffnsplit.eval.bench import random_llama, random_plan, split_model_

    torch.manual_seed(0)
    model = random_llama("smollm2-135m", torch.device("cpu"), torch.float32, max_positions=128)
    plan = random_plan(model, heavy_fraction=0.05, light=LightFormat(bits=4, group_size=128))
    for layer in plan.layers[1::2]:
        layer.heavy_dtype = "int8"
    split_model_(model, plan)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    # the reference holds the same (cast) weights and scales, exactly, in fp32 on the CPU
    reference = copy.deepcopy(gpu).to("cpu", torch.float32)
    for ids in (torch.randint(0, 49152, (1, 1)), torch.randint(0, 49152, (2, 33))):
        with torch.no_grad():
            ref = reference(input_ids=ids, use_cache=False).logits.double()
            out = gpu(input_ids=ids.cuda(), use_cache=False).logits.double().cpu()
        assert ((out - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_aligned_rows_keeps_values_and_pads_the_row_stride(dtype) -> None:
    """heavy_down [H, h] with h not a multiple of 8 (ceil(5% of I)): the kernels get the same
    values with rows 16-byte aligned, as a view (no second copy); aligned input is returned as
    is; the pad is zero and saving writes the view contiguously."""
    from ffnsplit.kernels.format import aligned_rows

    t = torch.randn(48, 717).to(dtype)
    a = aligned_rows(t)
    assert a.shape == t.shape and a.stride() == (720, 1) and torch.equal(a, t)
    assert a.untyped_storage().nbytes() == 48 * 720 * t.element_size()
    assert torch.count_nonzero(a.as_strided((48, 3), (720, 1), 717)) == 0
    assert aligned_rows(a) is a
    even = torch.randn(16, 64).to(dtype)
    assert aligned_rows(even) is even
    assert aligned_rows(even.T).stride() == (16, 1)  # column-major: re-laid row-major
    assert torch.equal(aligned_rows(even.T), even.T)
    with torch.inference_mode():  # a module's first call may run under inference mode
        b = aligned_rows(torch.randn(8, 37).to(dtype))
    assert not b.is_inference() and b.stride() == (40, 1)
