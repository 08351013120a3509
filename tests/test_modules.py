"""SplitFFN and compress_model: exactness of the split, quantized and low-rank light parts."""

from __future__ import annotations

import copy
import json
import os

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


# Original prose (no dataset on the GPU machine): enough tokens for every kernel tier's M.
_PROSE = (
    "The river town woke slowly in the autumn of that year. Fishermen pulled their boats onto the "
    "gravel before dawn, and the bakers on the square lit their ovens while the streets were "
    "still dark. By seven the market was full: farmers from the valley sold apples, cabbages and "
    "late plums, a cooper mended barrels by the fountain, and children ran between the stalls "
    "with bread still warm in their hands. The mayor, a careful man who kept the accounts "
    "himself, walked the length of the square every morning and wrote down the prices in a small "
    "black notebook. Nobody knew why he did it. Some said he wanted to catch the merchants who "
    "raised their prices in bad weather; others believed he was writing a history of the town, "
    "one day at a time. In the afternoon the wind turned to the west and the first rain of the "
    "season crossed the hills. The ferry stopped running at four, and the travellers who had "
    "hoped to reach the city that night took rooms at the inn by the bridge. There, around a "
    "long table, a teacher, two wool merchants, a surveyor and a young doctor argued about the "
    "new railway. The surveyor said the line would reach the valley within three years and that "
    "the town would double in size. The merchants doubted it: the hills were steep, the banks "
    "cautious, and the government had promised the same thing twice before. The doctor listened "
    "and said little, but when the teacher asked her opinion she answered that a railway would "
    "bring the hospital closer, and that alone was worth the noise of the trains. Outside, the "
    "river rose a hand's width in an hour, and the lamps along the quay swung in the wind. Late "
    "that night the innkeeper counted the rooms, the guests and the bottles, found that the "
    "numbers did not agree, and decided, as he did every autumn, that the error was his own."
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")
@pytest.mark.skipif(
    not os.environ.get("FFNSPLIT_SMOLLM2_DIR"),
    reason="FFNSPLIT_SMOLLM2_DIR names no compressed SmolLM2-135M folder (ffnsplit demo's "
    "compressed/; gpu_checks.sh smol24 reassembles one carried in parts)",
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_whole_compressed_smollm2_triton_matches_reference(dtype, tol) -> None:
    """The real compressed SmolLM2-135M (the packaged weights, profiled, split and saved by
    `ffnsplit demo` on the CPU, loaded from its folder) on CUDA through ffnsplit's kernels at
    M = 1 (decode tier), 17 (two row tiles), 2 x 40 (tensor-core tiers) and 340 (the dequantize +
    cuBLAS path) on real text, against the same loaded model on the CPU in fp32 (the torch
    reference path): relative error of the logits and agreement of the next-token picks."""
    from ffnsplit.io import load_compressed

    model, tokenizer = load_compressed(os.environ["FFNSPLIT_SMOLLM2_DIR"])
    ids = tokenizer(_PROSE, return_tensors="pt").input_ids
    assert ids.shape[1] >= 340
    gpu = copy.deepcopy(model).to("cuda", dtype)
    # the reference holds the same (cast) weights and scales, exactly, in fp32 on the CPU
    reference = copy.deepcopy(gpu).to("cpu", torch.float32)
    for batch in (ids[:, :1], ids[:, :17], torch.cat([ids[:, :40], ids[:, 40:80]]), ids[:, :340]):
        with torch.no_grad():
            ref = reference(input_ids=batch, use_cache=False).logits.double()
            out = gpu(input_ids=batch.cuda(), use_cache=False).logits.double().cpu()
        err = ((out - ref).norm() / ref.norm()).item()
        agree = (out.argmax(-1) == ref.argmax(-1)).double().mean().item()
        print(
            f"SmolLM2 {dtype} {tuple(batch.shape)}: rel. error {err:.2e}, top-1 agree {agree:.3f}"
        )
        assert err < tol and agree >= 0.9, (tuple(batch.shape), err, agree)


def test_pad_heavy_appends_zero_neurons() -> None:
    """format.pad_heavy: 17 heavy neurons become 24 (zero up/gate rows, down columns, and zero
    bias entries between the heavy and light ones); a multiple of 8 comes back as is; padded
    under inference mode, the tensors are still usable outside it."""
    from ffnsplit.kernels.format import pad_heavy
    from tests.test_kernels import random_split_weights

    w = random_split_weights(64, 17, 96, "silu", True, True, torch.float16, device="cpu")
    with torch.inference_mode():
        p = pad_heavy(w)
    assert p.n_heavy == 24 and p.heavy_down.shape == (64, 24) and p.heavy_down.is_contiguous()
    for name in ("heavy_up", "heavy_gate"):
        assert torch.equal(getattr(p, name)[:17], getattr(w, name))
        assert not getattr(p, name)[17:].any() and not getattr(p, name).is_inference()
    assert torch.equal(p.heavy_down[:, :17], w.heavy_down) and not p.heavy_down[:, 17:].any()
    for name in ("up_bias", "gate_bias"):
        b, pb = getattr(w, name), getattr(p, name)
        assert torch.equal(pb, torch.cat([b[:17], torch.zeros(7, dtype=b.dtype), b[17:]]))
    assert p.light_up is w.light_up and p.down_bias is w.down_bias
    assert pad_heavy(p) is p and pad_heavy(w, multiple=1) is w


def test_split_ffn_module_pads_its_heavy_part_in_place() -> None:
    """What a SplitFFN's first CUDA call does (`_pad_heavy`, run here on CPU): its heavy
    buffers become views of the padded tensors (same values and shapes, one copy), the
    kernels get the padded part, the output is unchanged, saving writes the unpadded values;
    reassigning a buffer, a load or a move drop the padded layout."""
    import safetensors.torch

    model = tiny_model("opt")  # biases on up (fc1) and down
    parts = get_ffn_blocks(model)[0].parts()
    layer = random_layer_plan(parts.intermediate_size, 13, LightFormat(bits=4, group_size=32))
    module = build_split_ffn(parts, layer)
    x = torch.randn(3, module.hidden_size)
    with torch.no_grad():
        before = module(x)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module._pad_heavy()
    p = module._padded_split()
    assert p.n_heavy == 16 and p.up_bias.shape[0] == 16 + module.light_up.weight().shape[0]
    assert module.heavy_up.shape[0] == 13 and module.heavy_up.data_ptr() == p.heavy_up.data_ptr()
    assert module.heavy_down.stride() == (16, 1)
    with torch.no_grad():
        torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-5)
    saved = safetensors.torch.load(safetensors.torch.save(
        {k: v.contiguous() for k, v in module.state_dict().items()}))  # fmt: skip
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    module._pad_heavy()  # once per placement
    assert module._padded_split().heavy_up is p.heavy_up
    module.load_state_dict(state)
    assert module._padded_split().n_heavy == 13
    module._pad_heavy()
    module.up_bias = module.up_bias.clone()
    assert module._padded_split().n_heavy == 13
    module._pad_heavy()
    assert copy.deepcopy(module)._padded_split().n_heavy == 13
    module.to(torch.float64)
    assert module._padded_split().n_heavy == 13
    from ffnsplit import graphs

    # an offloading hook swapping the buffers: padded again up to MAX_MOVES times, then not
    for moves in range(graphs.MAX_MOVES + 2):
        module._pad_heavy()
        assert module._padded_split().n_heavy == (16 if moves <= graphs.MAX_MOVES else 13)
        module._buffers["heavy_up"] = module.heavy_up.clone()
    module._pad_heavy()
    assert module.__dict__.get("_padded") is None  # no padded copy kept after the last move
