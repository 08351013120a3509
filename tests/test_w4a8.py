"""W4A8 split FFN (kernels/w4a8.py) against its torch definition, stage by stage.

Kernel A is checked on its own against `reference_activations` and kernel B against
`reference_down` of kernel A's actual output (same a, same row maxima: an fp32 rounding
difference in a cannot move an int8 code across a rounding boundary between the two sides),
the row quantizer bit for bit; the whole FFN against `reference_split_ffn` with a bound that
leaves room for such moves, and against the unquantized FFN for the size of the int8 error.
On CPU under TRITON_INTERPRET=1 (conftest), compiled on a GPU (plus bf16 there). Weights come
from the project's own RTN quantizer (integer zero points), shapes off every block size.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ffnsplit.compress.quant import quantize_rtn
from ffnsplit.kernels import reference, w4a8
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights, pack_planes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
PER_CHANNEL = 1 << 20
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def weights(hidden: int, h: int, light: int, *, bits: int = 4, group: int = 32,
            symmetric: bool = False, gated: bool = True, activation: str = "silu",
            biases: bool = True, dtype: torch.dtype = torch.float16,
            seed: int = 0) -> SplitFFNWeights:  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def dense(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) / cols**0.5).to(DEVICE, dtype)

    def packed(n: int, k: int) -> QuantizedWeight:
        return quantize_rtn(torch.randn(n, k, generator=g) / k**0.5, bits, group,
                            symmetric).to(DEVICE)  # fmt: skip

    def vec(n: int) -> torch.Tensor | None:
        return (torch.randn(n, generator=g) * 0.1).to(DEVICE) if biases else None

    return SplitFFNWeights(
        activation=activation, gated=gated,
        heavy_up=dense(h, hidden) if h else None,
        heavy_gate=dense(h, hidden) if h and gated else None,
        heavy_down=dense(hidden, h) if h else None,
        light_up=packed(light, hidden), light_gate=packed(light, hidden) if gated else None,
        light_down=packed(hidden, light), up_bias=vec(h + light),
        gate_bias=vec(h + light) if gated else None, down_bias=vec(hidden),
    )  # fmt: skip


def rows(m: int, hidden: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=g)
    x[:, 3] *= 20.0  # an outlier channel, as real FFN inputs have
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 32), (5, 70), (9, 257)])
def test_quantize_rows_matches_reference(dtype, m, k) -> None:
    x = rows(m, k, dtype)
    x[m // 2] = 0.0  # a zero row: zero codes, zero scale
    q, s = w4a8.quantize_rows(x)
    rq, rs = w4a8.quantize_rows_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.abs().max() <= 127 and (q[m // 2] == 0).all() and s[m // 2] == 0
    if ON_GPU:  # the GPU's division may round 127 / absmax differently: a code moves by one
        assert (q.int() - rq.int()).abs().max() <= 1
        assert (q != rq).float().mean() < 1e-3 and torch.allclose(s, rs)
    else:
        assert torch.equal(q, rq) and torch.equal(s, rs)
    # per-row error at most half a step of the row's scale
    assert ((q.float() * s[:, None] - x.float()).abs() <= 0.5 * s[:, None] * (1 + 1e-5)).all()


# (bits, group, symmetric, gated, activation, heavy, light, hidden, m, config)
CASES = [
    (4, 32, False, True, "silu", 5, 96, 160, 7, None),
    (4, 64, True, True, "gelu_tanh", 0, 64, 128, 19, None),
    (4, 128, False, False, "relu", 9, 96, 256, 3, None),
    (4, PER_CHANNEL, False, True, "gelu", 3, 64, 96, 5, None),
    (3, 32, False, True, "silu", 6, 64, 96, 4, None),
    (2, 64, False, True, "silu", 2, 128, 192, 6, None),
    (8, 32, True, True, "silu", 4, 64, 96, 5, None),
    (4, 64, False, True, "silu", 13, 96, 160, 21, (16, 64, 64, 32, 4, 1)),  # N, K off blocks
    (4, 32, False, True, "silu", 7, 160, 96, 33, (32, 64, 32, 64, 4, 1)),
]


def _case(i: int, dtype: torch.dtype):
    bits, group, sym, gated, act, h, light, hidden, m, config = CASES[i]
    w = weights(hidden, h, light, bits=bits, group=group, symmetric=sym, gated=gated,
                activation=act, biases=i % 2 == 0, dtype=dtype, seed=i)  # fmt: skip
    return w, rows(m, hidden, dtype, seed=100 + i), config


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernels_match_reference(poison, dtype, i) -> None:
    w, x, config = _case(i, dtype)
    assert w4a8.unsupported(x, w) is None
    a, amax = w4a8.split_activations(x, w, config=config)
    ref_a = w4a8.reference_activations(x, w)
    assert a.dtype == dtype and rel_err(a, ref_a) < TOL[dtype]
    light_max = a[:, w.n_heavy :].float().abs().amax(1)
    assert torch.equal(amax.view(torch.float32), light_max)  # the stored values' row maxima
    y = w4a8.down_projection(a, amax, w, config=config)
    assert y.dtype == dtype and rel_err(y, w4a8.reference_down(a, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i", [0, 2, 5])
def test_split_ffn_end_to_end(poison, dtype, i) -> None:
    w, x, config = _case(i, dtype)
    x3 = x.reshape(1, *x.shape)  # leading dims
    y = w4a8.split_ffn(x3, w, config=config)
    assert y.shape == x3.shape
    ref = w4a8.reference_split_ffn(x3, w)
    # a code of a may move by one between the two sides where a differs by an ulp
    assert rel_err(y, ref) < max(TOL[dtype], 2e-3)
    # the int8 activations' own error: small against the unquantized FFN, but not zero
    plain = reference.split_ffn(x3.double(), _as64(w))
    assert 1e-4 < rel_err(y, plain) < 6e-2  # an outlier channel 20x: steps of ~1/6 of |x|


def _as64(w: SplitFFNWeights) -> SplitFFNWeights:
    fields = ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias")
    changes = {f: getattr(w, f).double() for f in fields if getattr(w, f) is not None}
    return SplitFFNWeights(**{**w.__dict__, **changes})


def test_unsupported_reasons() -> None:
    w = weights(96, 4, 64)
    x = rows(3, 96, torch.float16)
    assert w4a8.unsupported(x, w) is None
    assert "activations" in w4a8.unsupported(x.to(torch.float64), w)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (64, 96), generator=g)
    asym8 = QuantizedWeight(pack_planes(q, 8), torch.rand(3, 64).half(), torch.rand(3, 64).half(),
                            8, 32, (64, 96)).to(DEVICE)  # fmt: skip
    assert "int8" in w4a8.unsupported(x, SplitFFNWeights(**{**w.__dict__, "light_up": asym8}))
    frac = w.light_up.zeros.clone()
    frac[0, 0] += 0.25  # fractional zero points are valid in the format, not here
    fq = QuantizedWeight(w.light_up.planes, w.light_up.scales, frac, 4, 32, (64, 96))
    assert "fractional" in w4a8.unsupported(x, SplitFFNWeights(**{**w.__dict__, "light_up": fq}))
    assert "light" in w4a8.unsupported(x, SplitFFNWeights(**{**w.__dict__, "light_up": None}))


def test_integer_zeros_is_remembered_per_version() -> None:
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert w4a8.integer_zeros(z)
    z[0, 0] = 1.5  # an in-place write bumps the version: checked again
    assert not w4a8.integer_zeros(z)


# ---- the module switch: SplitFFN.light_act, set_light_act, the checkpoint, `ffnsplit eval`


def _split_module(light, n_heavy: int = 17, seed: int = 0):
    from ffnsplit.apply import build_split_ffn
    from ffnsplit.arch import get_ffn_blocks
    from tests.test_modules import random_layer_plan
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    parts = get_ffn_blocks(model)[0].parts()
    return build_split_ffn(parts, random_layer_plan(parts.intermediate_size, n_heavy, light, seed))


def test_split_ffn_module_runs_its_definition_when_set() -> None:
    from ffnsplit.modules import set_light_act
    from ffnsplit.plan import LightFormat

    module = _split_module(LightFormat(bits=4, group_size=32))
    model = torch.nn.Sequential(module)
    x = torch.randn(2, 5, module.hidden_size)
    plain = module(x)
    assert set_light_act(model, "int8") == 1 and module.light_act == "int8"
    y = module(x)
    assert torch.equal(y, w4a8.reference_split_ffn(x, module.split_weights()))
    assert 1e-4 < rel_err(y, plain) < 5e-2
    if ON_GPU:  # the kernels, from the module, on the GPU
        gpu = module.to(DEVICE, torch.float16)
        xg = x.to(DEVICE, torch.float16)
        ref = w4a8.reference_split_ffn(xg, gpu.split_weights())
        assert rel_err(gpu(xg), ref) < 2e-3
        module = gpu.cpu().float()
    set_light_act(model, "none")
    assert torch.allclose(module(x), plain, atol=1e-5)


def test_light_act_round_trips_through_the_meta() -> None:
    import json

    from ffnsplit.errors import CheckpointError
    from ffnsplit.modules import SplitFFN, set_light_act
    from ffnsplit.plan import LightFormat

    module = _split_module(LightFormat(bits=4, group_size=32))
    assert "light_act" not in module.meta()  # checkpoints without it read as before
    set_light_act(module, "int8")
    meta = json.loads(json.dumps(module.meta()))
    assert meta["light_act"] == "int8"
    skeleton = SplitFFN.from_meta(meta)
    assert skeleton.light_act == "int8"
    skeleton.load_state_dict(module.state_dict(), assign=True, strict=True)
    x = torch.randn(3, module.hidden_size)
    assert torch.equal(skeleton(x), module(x))
    with pytest.raises(CheckpointError, match="light activations"):
        SplitFFN.from_meta({**meta, "light_act": "int4"})


def test_set_light_act_refuses_what_it_cannot_run() -> None:
    from ffnsplit.errors import OptionError
    from ffnsplit.modules import set_light_act
    from ffnsplit.plan import LightFormat
    from tests.tiny_models import tiny_model

    with pytest.raises(OptionError, match="choose one of"):
        set_light_act(_split_module(LightFormat(bits=4, group_size=32)), "fp8")
    with pytest.raises(OptionError, match="has none"):
        set_light_act(tiny_model("llama"), "int8")
    assert set_light_act(tiny_model("llama"), "none") == 0
    lowrank = _split_module(LightFormat(kind="lowrank", rank=4))
    ok = _split_module(LightFormat(bits=4, group_size=32))
    model = torch.nn.Sequential(ok, lowrank)
    with pytest.raises(OptionError, match="split FFN 1 .*lowrank"):
        set_light_act(model, "int8")
    assert ok.light_act == "none"  # nothing changed when one FFN cannot
    asym8 = _split_module(LightFormat(bits=8, group_size=32))
    with pytest.raises(OptionError, match="asymmetric int8"):
        set_light_act(asym8, "int8")


def test_eval_light_act_on_a_dense_model_is_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from ffnsplit.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--light-act", "int8"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--light-act int8 applies to a compressed model" in lines[0]
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--light-act", "int4"])
    assert result.exit_code != 0 and "choose one of none, int8" in result.output


# ---- the Hopper kernel for kernel A's light tiles (w4a8_hopper.py: int8 wgmma, opt-in)


def test_hopper_fragments_hold_the_codes_minus_zero_in_slot_order() -> None:
    """The A operand `_fragments8` builds (emulated with the kernel's layout facts) holds, at
    k-slot 32 b + s of a step, code q - z of k = 32 b + X8_PERM[s]: the order x8 is permuted to."""
    from ffnsplit.kernels import w4a8_hopper as hop
    from ffnsplit.kernels.format import pack_planes

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 128), generator=g)  # [neurons, k] of one 128-k step
    zeros = torch.randint(0, 16, (64,), generator=g)
    words = pack_planes(codes, 4)[0]  # [16 word rows, 64 neurons]: rows 4 b + t hold k 8 (4b+t)..
    frag = hop.emulate_fragments(words, zeros)
    slot_k = torch.tensor([32 * (s // 32) + hop.X8_PERM[s % 32] for s in range(128)])
    assert sorted(hop.X8_PERM) == list(range(32))
    assert torch.equal(frag.long(), codes[:, slot_k] - zeros[:, None])
    x8 = torch.randint(-127, 128, (5, 256), generator=g, dtype=torch.int8)
    xp = hop.permute_x8(x8)
    assert torch.equal(xp.view(5, 8, 32), x8.view(5, 8, 32)[:, :, hop.X8_PERM])


@pytest.mark.parametrize(("kernel", "fold"), [("aot_compile", "magic"), ("aot_compile", "i2f"),
                                              ("aot_compile_down", "magic")])  # fmt: skip
def test_hopper_kernel_compiles_for_sm90_without_serialized_wgmmas(kernel, fold) -> None:
    """The kernel compiles for sm_90 with the installed Triton (its own ptxas, no GPU): within 255
    registers (two programs an SM), the int8 wgmma from registers, and ptxas keeps the wgmmas
    asynchronous (C7514: an accumulator read inside a wgmma pipeline stage; C7515: written)."""
    from ffnsplit.kernels import tiles, wgmma_prefill
    from tests.test_mma_decode import _aot

    if wgmma_prefill.warpgroup_mma is None:
        pytest.skip(f"Gluon's Hopper ops do not import here: {wgmma_prefill._IMPORT_ERROR}")
    res = _aot(f"from ffnsplit.kernels import w4a8_hopper as h\nc = h.{kernel}(fold={fold!r})")
    assert res["regs"] <= 255 and res["spills"] < 256
    assert "wgmma.mma_async" in res["ptx"] and ".s8.s8" in res["ptx"]
    log = tiles.ptxas_log(res["ptx"], 90)
    assert "C7514" not in log and "C7515" not in log


def test_hopper_kernel_formats_and_opt_in(monkeypatch) -> None:
    from ffnsplit.kernels import w4a8_hopper as hop

    w = weights(256, 8, 64, group=128)
    x = rows(3, 256, torch.float16)
    assert hop.unsupported(x, w) is None
    assert "groups of 32" in hop.unsupported(x, weights(256, 8, 64, group=32))
    assert "fp16/bf16" in hop.unsupported(x.float(), w)
    assert "gated" in hop.unsupported(x, weights(256, 8, 64, group=128, gated=False))
    a = torch.empty(3, 72, dtype=torch.float16, device=DEVICE)
    assert hop.down_unsupported(a, w) is None
    assert "groups of 128" in hop.down_unsupported(a, weights(256, 8, 64, group=64))
    assert "fp16/bf16" in hop.down_unsupported(a.float(), w)
    assert hop.down_slices(256, 4096, 107, 132) == 1
    assert hop.down_slices(64, 4096, 107, 132) == 4
    assert hop.down_slices(16, 256, 3, 132) == 2  # no more slices than pairs of groups
    monkeypatch.setattr(hop, "ENABLED", True)
    assert hop.use(x, w) == (ON_GPU and hop.available(x.device))  # sm_90 only
    assert hop.use_down(a, w) == (ON_GPU and hop.available(x.device))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "h", "light", "hidden", "sym"),
                         [(77, 13, 208, 4160, False), (256, 0, 1024, 1024, True),
                          (5, 8, 64, 256, False)])  # fmt: skip
def test_hopper_kernel_matches_reference(poison, monkeypatch, dtype, m, h, light, hidden, sym):
    from ffnsplit.kernels import w4a8_hopper as hop

    w = weights(hidden, h, light, group=128, symmetric=sym, dtype=dtype, seed=m)
    x = rows(m, hidden, dtype, seed=m + 1)
    if not hop.available(x.device):
        pytest.skip("the Hopper kernel needs an sm_90 GPU")
    monkeypatch.setattr(hop, "ENABLED", True)
    assert hop.use(x, w)
    light = hop.light_activations
    for fold in ("magic", "i2f"):
        monkeypatch.setattr(hop, "light_activations", functools.partial(light, fold=fold))
        a, amax = w4a8.split_activations(x, w)
        assert rel_err(a, w4a8.reference_activations(x, w)) < TOL[dtype]
        light_max = a[:, w.n_heavy :].float().abs().amax(1)
        assert torch.equal(amax.view(torch.float32), light_max)
        for slices in (None, 3):  # kernel B: its own pick, and slices across the groups
            out = torch.empty(m, hidden, dtype=dtype, device=DEVICE)
            y = hop.down_projection(a, amax, w, out, slices=slices, fold=fold)
            assert rel_err(y, w4a8.reference_down(a, w)) < TOL[dtype]
    y = w4a8.split_ffn(x, w)  # both kernels through the module's entry
    assert rel_err(y, w4a8.reference_split_ffn(x, w)) < max(TOL[dtype], 2e-3)


def test_quantize_rows_permuted_and_from_known_maxima() -> None:
    from ffnsplit.kernels import w4a8_hopper as hop

    x = rows(6, 96, torch.float16)
    q, s = w4a8.quantize_rows(x)
    qp, sp = w4a8.quantize_rows(x, perm=True)
    assert torch.equal(qp.cpu(), hop.permute_x8(q.cpu())) and torch.equal(s, sp)
    amax = x.float().abs().amax(1).view(torch.int32)
    qa, sa = w4a8.quantize_rows(x, amax=amax)
    assert torch.equal(qa, q) and torch.equal(sa, s)
