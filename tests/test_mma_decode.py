"""The Gluon decode tier (ffnsplit/kernels/mma_decode.py).

Gluon has no interpreter, so the kernels themselves run only on a CUDA GPU (the `gpu` tests: every
config, odd shapes, partial last chunks, fp16 and bf16, against float64). On CPU the pieces that
decide correctness without a GPU are checked: the k permutations the kernels apply to codes,
dense rows and x agree (a slot-order product equals the natural-order one), and the PTX's
magic-number arithmetic turns every nibble into its exact value in fp16 and bf16.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffnsplit.kernels import mma_decode, tiles
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels.format import pack_planes, pad_heavy
from tests.test_kernels import (
    DEVICE,
    ON_GPU,
    TOL,
    gpu,
    random_qweight,
    random_split_weights,
    ref_linear,
    ref_split_ffn,
    rel_err,
)

needs_mma = pytest.mark.skipif(
    not (ON_GPU and mma_decode.available(torch.device(DEVICE))),
    reason="needs Gluon and a CUDA GPU of sm_80 or newer",
)


def _fragment_codes(words: torch.Tensor) -> torch.Tensor:
    """What mma_decode._codes computes, in torch: one 32-k block of canonical words [4, n] ->
    codes [32 slots, n]. Register j of lane t holds nibbles (j, j + 4) (the PTX), joined as
    join(join(p0, p1), join(p2, p3)), then the kernel's reshape / permute / reshape."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    n = w.shape[1]
    regs = [torch.stack([(w >> (4 * j)) & 0xF, (w >> (4 * (j + 4))) & 0xF], -1) for j in range(4)]
    t = torch.stack([torch.stack(regs[0:2], -1), torch.stack(regs[2:4], -1)], -1)
    t = t.reshape(2, 2, n, 2, 2, 2).permute(mma_decode.CODE_PERM)
    return t.reshape(32, n)


def _swapped_codes(words: torch.Tensor) -> torch.Tensor:
    """mma_decode._codes with SWAP (the W-as-A form) in torch: words [4, n] -> codes [n, 32
    slots], the same registers joined and permuted n first."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    n = w.shape[1]
    regs = [torch.stack([(w >> (4 * j)) & 0xF, (w >> (4 * (j + 4))) & 0xF], -1) for j in range(4)]
    t = torch.stack([torch.stack(regs[0:2], -1), torch.stack(regs[2:4], -1)], -1)
    return t.reshape(2, 2, n, 2, 2, 2).permute(mma_decode.CODE_PERM_A).reshape(n, 32)


def _fragment_rows(rows: torch.Tensor) -> torch.Tensor:
    """mma_decode._rows in torch: dense [n, 32] (one block) -> [32 slots, n]."""
    n = rows.shape[0]
    return rows.reshape(n, 4, 2, 2, 2).permute(mma_decode.ROW_PERM).reshape(32, n)


def _x_slots(x: torch.Tensor, light: bool) -> torch.Tensor:
    """mma_decode._slots in torch: x [16, 128] -> the same values in slot order."""
    perm = mma_decode.LIGHT_X_PERM if light else mma_decode.DENSE_X_PERM
    return x.reshape(16, 4, 4, 2, 2, 2).permute(perm).reshape(16, 128)


def test_light_slots_match_the_words() -> None:
    """x in slot order times the codes as the kernel unpacks them = x times the weight."""
    n = 24
    q = torch.randint(0, 16, (n, 128))
    words = pack_planes(q, 4)[0]  # [16, n]: 4 blocks of 4 word rows
    x = torch.randn(16, 128, dtype=torch.float64)
    xs = _x_slots(x, light=True)
    codes = torch.cat([_fragment_codes(words[4 * b : 4 * b + 4]) for b in range(4)])
    assert not torch.equal(codes.T, q), "the slot order must differ from k order to be tested"
    torch.testing.assert_close(xs @ codes.to(torch.float64), x @ q.T.to(torch.float64))


def test_swapped_codes_match_the_words() -> None:
    """The W-as-A form: codes [n, slot] (A operand) times x in slot order, transposed (B
    operand [slot, m]) = W x^T, with the x permutation the x-as-A form stages."""
    n = 40
    q = torch.randint(0, 16, (n, 128))
    words = pack_planes(q, 4)[0]
    x = torch.randn(16, 128, dtype=torch.float64)
    xs = _x_slots(x, light=True)
    codes = torch.cat([_swapped_codes(words[4 * b : 4 * b + 4]) for b in range(4)], dim=1)
    assert torch.equal(codes, torch.cat([_fragment_codes(words[4 * b : 4 * b + 4]).T
                                         for b in range(4)], dim=1))  # fmt: skip
    torch.testing.assert_close(codes.to(torch.float64) @ xs.T, q.to(torch.float64) @ x.T)


def test_swap_candidates(monkeypatch) -> None:
    """FFNSPLIT_MMA_SWAP: the W-as-A configs up to SWAP_MAX_M rows (first, or alone), never
    above; every one of them takes at most 16 rows of x as its n8 columns."""
    up, rows, swapped = mma_decode.UP_CONFIGS, mma_decode.UP_ROWS, mma_decode.UP_SWAP
    assert swapped and all(c.swap for c in swapped) and not any(c.swap for c in up)
    for mode, want in (("0", up), ("1", swapped + up), ("only", swapped)):
        monkeypatch.setattr(mma_decode, "SWAP", mode)
        for m in (1, 8, mma_decode.SWAP_MAX_M):
            assert mma_decode.candidates(up, rows, swapped, m) == want
        assert mma_decode.candidates(up, rows, swapped, 17) == rows[2]
    for cfg in swapped + mma_decode.DOWN_SWAP:
        assert cfg.block_m(1) == 8 and cfg.block_m(9) == 16
        assert cfg.block_n == 16 * cfg.num_warps * cfg.tiles and cfg.block_nh == 8 * cfg.num_warps


def test_finish_slots() -> None:
    """Kernel B's tile finish (_finish_rows) loads 16 words a thread at one row and 32 at 2-8
    rows (4 slots of 8 rows: what the MMA layout's finish held), never more slots than exist."""
    assert [mma_decode._finish_slots(m, 16) for m in (1, 2, 3, 4, 5, 8)] == [16, 16, 8, 8, 4, 4]
    assert mma_decode._finish_slots(1, 3) == 4 and mma_decode._finish_slots(8, 2) == 2
    if mma_decode.gluon is not None:  # the layouts need Gluon
        assert mma_decode.down_meta(mma_decode.DOWN_SWAP[0], 3)["FM"] == 4


def test_dense_slots_match_the_rows() -> None:
    n = 40
    rows = torch.randn(n, 128, dtype=torch.float64)
    x = torch.randn(16, 128, dtype=torch.float64)
    xs = _x_slots(x, light=False)
    frags = torch.cat([_fragment_rows(rows[:, 32 * b : 32 * b + 32]) for b in range(4)])
    torch.testing.assert_close(xs @ frags, x @ rows.T)


def _halves(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 32-bit registers -> their two 16-bit halves as `dtype` values (float64)."""
    h = torch.stack([bits & 0xFFFF, (bits >> 16) & 0xFFFF], -1).to(torch.int16)
    return h.view(dtype).to(torch.float64)


def test_unpack_arithmetic_is_exact() -> None:
    """The PTX's shift / lop3 sequence, in torch, gives every nibble as BIAS + q exactly (fp16
    1024 + q, bf16 128 + q): register j holds nibbles (j, j + 4)."""
    w = torch.randint(-(2**31), 2**31, (4096,), dtype=torch.int64) & 0xFFFFFFFF
    nib = [((w >> (4 * i)) & 0xF).to(torch.float64) for i in range(8)]
    for j in range(4):
        want = torch.stack([nib[j], nib[j + 4]], -1)
        got = _halves(((w >> (4 * j)) & 0x000F000F) | 0x64006400, torch.float16)
        assert torch.equal(got, 1024 + want)
        got = _halves(((w >> (4 * j)) & 0x000F000F) | 0x43004300, torch.bfloat16)
        assert torch.equal(got, 128 + want)
        # the W-as-A fp16 form (_ASM_F16_X16): odd registers keep their nibbles 4 bits up
        mask, scale = (0x000F000F, 1) if j % 2 == 0 else (0x00F000F0, 16)
        got = _halves(((w >> (8 * (j // 2))) & mask) | 0x64006400, torch.float16)
        assert torch.equal(got, 1024 + scale * want)


def test_odd_k_slots_are_slot_bit_3() -> None:
    """_ASM_F16_X16's registers 1 and 3 hold the odd k of a word; _sum_weights puts its 16s
    where slot bit 3 is set: the light slot order (x's LIGHT_X_PERM) maps those slots to odd k."""
    k = torch.arange(128, dtype=torch.float64).repeat(16, 1)
    slots = _x_slots(k, light=True)[0]  # the k each slot holds
    bit3 = (torch.arange(128) // 8) % 2 == 1
    assert torch.equal(slots[bit3] % 2, torch.ones(64, dtype=torch.float64))
    assert torch.equal(slots[~bit3] % 2, torch.zeros(64, dtype=torch.float64))


@pytest.mark.parametrize("symmetric", [False, True])
def test_x16_group_arithmetic(symmetric) -> None:
    """A group as the W-as-A fp16 form forms it: x' (odd k / 16, exact in fp16), codes 1024 + q
    (even k) and 1024 + 16 q (odd k), the products started from -1024 sum x' and the zero point
    taken out with sum x = x' weighted 1 (even k) and 16 (odd k) (_sum_weights' other rows):
    s (blk - z sum x) against s sum x (q - z) in fp64."""
    x = torch.randn(8, 128, dtype=torch.float64).to(torch.float16)
    odd = torch.arange(128) % 2 == 1
    xp = torch.where(odd, x.double() / 16, x.double()).to(torch.float16)
    assert torch.equal(torch.where(odd, xp.double() * 16, xp.double()), x.double())
    q = torch.randint(0, 16, (128, 64)).to(torch.float64)
    z = torch.full((64,), 8.0, dtype=torch.float64) if symmetric else torch.rand(64) * 15
    s = torch.rand(64, dtype=torch.float64) / 50
    codes = torch.where(odd[:, None], 1024 + 16 * q, 1024 + q)  # exact in fp16
    assert torch.equal(codes.to(torch.float16).double(), codes)
    seed = (xp.float() @ torch.full((128, 1), -1024.0)).double()  # exact products, fp32 sums
    blk = (seed.float() + xp.float() @ codes.float()).double()
    sum_x = (xp.float() @ torch.where(odd, 16.0, 1.0)[:, None]).double()
    got = (blk.float() - sum_x.float() * z.float()).double() * s
    ref = (x.double() @ (q - z.double())) * s
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize(
    ("dtype", "bias", "bound"), [(torch.float16, 1024.0, 1e-4), (torch.bfloat16, 128.0, 1e-5)]
)
def test_bias_taken_out_with_the_zero_point(dtype, bias, bound) -> None:
    """A group's product as the kernels form it: fp32 sums of x (BIAS + q) and of x (the
    tensor cores: exact products, fp32 sums), then s (blk - (z + BIAS) sum x), against
    s sum x (q - z) in fp64. The offset costs fp32 roundings of BIAS sum |x|: ~3e-5 of the
    result in fp16 (1e-7 without it), a tenth of the fp16 output's own rounding."""
    x = torch.randn(16, 128, dtype=torch.float64).to(dtype)
    q = torch.randint(0, 16, (128, 256)).to(torch.float64)
    z = torch.rand(256, dtype=torch.float64) * 15
    s = torch.rand(256, dtype=torch.float64) / 50
    blk = (x.float() @ (bias + q).float()).double()  # every operand exact in fp32
    xs = x.float().sum(1, keepdim=True).double()
    got = (blk.float() - xs.float() * (z.float() + bias)).double() * s
    ref = (x.double() @ (q - z)) * s
    assert ((got - ref).norm() / ref.norm()).item() < bound


def test_the_asm_uses_these_constants() -> None:
    """The CPU arithmetic above is the kernels' own: their PTX names these masks and values."""
    if mma_decode.gluon is None:
        pytest.skip(f"Gluon does not import here: {mma_decode._IMPORT_ERROR}")
    f16, bf16 = mma_decode._ASM_F16.value, mma_decode._ASM_BF16.value
    assert "0x000f000f, 0x64006400" in f16 and "0x000f000f, 0x43004300" in bf16
    for asm in (f16, bf16):
        assert [line for line in asm.splitlines() if line.startswith("shr")] == [
            f"shr.u32 t, $4, {s};" for s in (4, 8, 12)
        ]
        assert not any(op in asm for op in ("sub.", "fma.", "0x00f000f0"))
    x16 = [line for line in mma_decode._ASM_F16_X16.value.splitlines()
           if line.startswith(("lop3", "shr"))]  # fmt: skip
    assert x16 == [
        "lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;",
        "lop3.b32 $1, $4, 0x00f000f0, 0x64006400, 0xea;",
        "shr.u32 t, $4, 8;",
        "lop3.b32 $2, t, 0x000f000f, 0x64006400, 0xea;",
        "lop3.b32 $3, t, 0x00f000f0, 0x64006400, 0xea;",
    ]


def test_light_ok_formats() -> None:
    qw = random_qweight(8, 256, 4, 128, False, device="cpu")
    assert mma_decode.light_ok(qw, torch.float16) and mma_decode.light_ok(qw, torch.bfloat16)
    assert not mma_decode.light_ok(qw, torch.float32)
    for bits, group in ((8, 128), (3, 64), (4, 32), (4, 96 * 2)):
        k = 384
        assert not mma_decode.light_ok(
            random_qweight(8, k, bits, group, True, "cpu"), torch.float16
        )


def test_forced_path_says_why_it_cannot_run() -> None:
    if ON_GPU and mma_decode.available(torch.device(DEVICE)):
        pytest.skip("this GPU runs the tier")
    x = torch.randn(4, 256)
    qw = random_qweight(8, 256, 4, 128, False, device="cpu")
    with pytest.raises(ValueError, match="kernel path 'mma' cannot run here"):
        qmm.quant_matmul(x, qw, path="mma")
    assert not mma_decode.use(8, "auto", x, qw)


def test_kernel_path_follows_the_dispatch() -> None:
    """split_ffn.kernel_path names the tier split_activations takes (bench rows record it)."""
    w = random_split_weights(256, 16, 96, "silu", True, False, torch.float16, bits=4, group=128)
    x = torch.empty(0, device=DEVICE, dtype=torch.float16)
    runs_mma = mma_decode.ENABLED and ON_GPU and mma_decode.available(torch.device(DEVICE))
    assert sffn.kernel_path(1, x, w) == ("mma" if runs_mma and mma_decode.MIN_M <= 1 else "gemv")
    for m in (2, 8, 16):
        assert sffn.kernel_path(m, x, w) == (
            "mma" if runs_mma else ("gemv" if m <= 4 else "decode")
        )
    for m in (17, 32):
        assert sffn.kernel_path(m, x, w) == ("mma" if runs_mma else "small")
    assert sffn.kernel_path(33, x, w) == "small"
    assert sffn.kernel_path(64, x, w) == "small"
    assert sffn.kernel_path(65, x, w) == "prefill"
    assert sffn.kernel_path(256, x, w) == "prefill"
    assert sffn.kernel_path(tiles.DEQUANT_MIN_M - 1, x, w) == "prefill"
    assert sffn.kernel_path(tiles.DEQUANT_MIN_M, x, w) == "dequant"
    assert sffn.kernel_path(2048, x, w) == "dequant"
    assert sffn.kernel_path(8, x, w, path="decode") == "decode"


# GPU: (hidden, heavy, light, m, group, symmetric) rotate through odd shapes, partial last chunks
# (hidden 576, light 224) and a heavy count that is not a multiple of 8
GPU_SHAPES = [
    (576, 20, 224, 16, 128, False),
    (256, 0, 96, 5, 64, True),
    (512, 37, 0, 9, 128, False),
    (384, 16, 320, 1, 256, True),
    (640, 48, 4128, 13, 64, False),
]
GPU_CASES = list(itertools.product(range(len(GPU_SHAPES)), (torch.float16, torch.bfloat16)))


def _case_weights(case: int, dtype: torch.dtype):
    """(weights, hidden, m) of GPU_SHAPES[case]: activation, gating and biases vary by case."""
    hidden, h, light, m, group, symmetric = GPU_SHAPES[case]
    activation = ("silu", "gelu", "relu", "gelu_tanh", "silu")[case]
    gated, biases = case != 2, case % 2 == 0
    w = random_split_weights(hidden, h, light, activation, gated, biases, dtype, bits=4,
                             group=group, symmetric=symmetric)  # fmt: skip
    return w, hidden, m


def _only(monkeypatch, up_table: str, down_table: str, config: int) -> None:
    """Config `config` (modulo each table's length) the only candidate of both kernels."""
    for name in (up_table, down_table):
        table = getattr(mma_decode, name)
        monkeypatch.setattr(mma_decode, name, (table[config % len(table)],))


@gpu
@needs_mma
@pytest.mark.parametrize(("case", "dtype"), GPU_CASES)
@pytest.mark.parametrize(
    "config", range(max(len(mma_decode.UP_CONFIGS), len(mma_decode.DOWN_CONFIGS)))
)
def test_split_ffn_every_config(poison, monkeypatch, case, dtype, config) -> None:
    _only(monkeypatch, "UP_CONFIGS", "DOWN_CONFIGS", config)
    w, hidden, m = _case_weights(case, dtype)
    x = torch.randn(m, hidden, device=DEVICE).to(dtype)
    out = sffn.split_ffn(x, w, path="mma")
    assert out.shape == (m, hidden) and out.dtype == dtype
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]


@gpu
@needs_mma
@pytest.mark.parametrize(("case", "dtype"), GPU_CASES)
@pytest.mark.parametrize("config", range(max(len(mma_decode.UP_SWAP), len(mma_decode.DOWN_SWAP))))
def test_split_ffn_swap_configs(poison, monkeypatch, case, dtype, config) -> None:
    """The W-as-A form (every config alone, 1-8 rows; the cases' 9-16 rows take the x-as-A
    configs) against float64."""
    monkeypatch.setattr(mma_decode, "SWAP", "only")
    _only(monkeypatch, "UP_SWAP", "DOWN_SWAP", config)
    w, hidden, m = _case_weights(case, dtype)
    # a second size (1-8 rows: the single n8 tile) with the heavy part padded to a multiple of 8
    # neurons as SplitFFN lays it out on a GPU (format.pad_heavy)
    padded = pad_heavy(w)
    for rows, weights in ((m, w), (1 + m % 8, padded)):
        x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
        out = sffn.split_ffn(x, weights, path="mma")
        assert out.shape == (rows, hidden) and out.dtype == dtype
        assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]


@gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("swap", ["only", "0"])
def test_ticket_publishes_partials_in_graph_replays(monkeypatch, dtype, swap) -> None:
    """The split-K ticket (a CTA barrier, then one thread's acq_rel atomic, no per-thread fence)
    must publish every warp's partials to the program that finishes the tile: four calls in a
    row in one CUDA graph (each kernel overlapping the next through PDL), replayed 150 times.
    The finish adds the slots in a fixed order, so a stale or missing partial would show as an
    output that differs bit for bit from the first replay's, or from float64."""
    monkeypatch.setattr(mma_decode, "SWAP", swap)
    w = pad_heavy(random_split_weights(1536, 72, 4000, "silu", True, False, dtype, bits=4,
                                       group=128))  # fmt: skip
    for rows in (1, 4, 8, 16, 40):
        xs = [torch.randn(rows, 1536, device=DEVICE).to(dtype) for _ in range(4)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in xs:  # compile outside the capture
                sffn.split_ffn(x, w, path="mma")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [sffn.split_ffn(x, w, path="mma") for x in xs]
        graph.replay()
        first = [out.clone() for out in outs]
        for x, out in zip(xs, first, strict=True):
            assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype], rows
        for rep in range(150):
            graph.replay()
            torch.cuda.synchronize()
            for out, ref in zip(outs, first, strict=True):
                assert torch.equal(out, ref), (rows, rep)


@gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefetch", [True, False])
def test_dense_linear_with_its_l2_requests(poison, monkeypatch, dtype, prefetch) -> None:
    """A dense-only split_linear (a decoder's projection) with and without its weights' L2
    requests before the PDL wait, odd shapes, chained in a CUDA graph behind another kernel (as
    in a decode step): the requests are hints and must change nothing."""
    monkeypatch.setattr(mma_decode, "DENSE_PREFETCH", prefetch)
    for m, n, k in ((1, 1000, 1288), (3, 300, 600), (16, 4096, 1048)):
        heavy = torch.randn(n, k, device=DEVICE).to(dtype) / k**0.5
        bias = torch.randn(n, device=DEVICE).to(dtype)
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        ref = x.double() @ heavy.double().T + bias.double()
        got = qmm.split_linear(x, heavy, None, bias, path="mma", prefetch=True)
        assert rel_err(got, ref) < TOL[dtype]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = qmm.split_linear(x * 1, heavy, None, bias, path="mma", prefetch=True)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref) < TOL[dtype], (m, n, k)


@gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_and_auto(poison, dtype) -> None:
    """A plain packed linear (no dense part) with a bias, and "auto" taking this tier at M = 8."""
    qw = random_qweight(300, 1056, 4, 128, False)
    x = torch.randn(8, 1056, device=DEVICE).to(dtype)
    bias = torch.randn(300, device=DEVICE).to(dtype)
    assert mma_decode.use(8, "auto", x, qw) == mma_decode.ENABLED
    for path in ("mma", "auto"):
        out = qmm.quant_matmul(x, qw, bias, path=path)
        assert rel_err(out, ref_linear(x, qw, bias)) < TOL[dtype]


@gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 40, 64])
def test_split_ffn_row_tiles(poison, monkeypatch, dtype, m) -> None:
    """2 and 4 m16 row tiles a program (branch mma-rows), every candidate alone."""
    rows = 2 if m <= 32 else 4
    for up, down in zip(mma_decode.UP_ROWS[rows], mma_decode.DOWN_ROWS[rows], strict=False):
        monkeypatch.setattr(mma_decode, "UP_ROWS", {rows: (up,)})
        monkeypatch.setattr(mma_decode, "DOWN_ROWS", {rows: (down,)})
        w = random_split_weights(576, 20, 224, "silu", True, True, dtype, bits=4, group=128)
        x = torch.randn(m, 576, device=DEVICE).to(dtype)
        out = sffn.split_ffn(x, w, path="mma")
        assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]


@pytest.mark.parametrize(
    ("kernel", "table", "m"),
    [
        ("up", "UP_SWAP", 1),
        ("down", "DOWN_SWAP", 4),
        ("up", "UP_CONFIGS", 16),
        ("down", "DOWN_CONFIGS", 16),
    ],  # fmt: skip
)
def test_default_configs_compile_for_sm90_and_fit(kernel, table, m) -> None:
    """The first config of each table (the pick without the tuner) compiles for sm_90 with the
    installed Triton (no GPU: its own ptxas; Gluon's API moves between releases, e.g.
    thread_barrier -> barrier after 3.6), without spills, and in few enough registers for the
    `resident` programs an SM its K-slices assume (65,536 registers an SM on sm_80-90)."""
    if mma_decode.gluon is None:
        pytest.skip(f"Gluon does not import here: {mma_decode._IMPORT_ERROR}")
    cfg = getattr(mma_decode, table)[0]
    res = _aot(f"c = md.aot_compile({kernel!r}, md.{table}[0], {m})")
    assert res["spills"] == 0
    allocated = -(-res["regs"] // 8) * 8  # in units of 8 a thread
    assert allocated * 32 * cfg.num_warps * cfg.resident <= 65536, (cfg, res["regs"])


def test_dense_prefetch_is_issued_before_the_wait() -> None:
    """Kernel B as a dense-only split_linear with PREFETCH (sm_90 AOT, installed Triton): its
    dense slices' prefetch.global.L2 requests come before their griddepcontrol.wait, with no
    spills and no more registers than its first config allows."""
    if mma_decode.gluon is None:
        pytest.skip(f"Gluon does not import here: {mma_decode._IMPORT_ERROR}")
    cfg = mma_decode.DOWN_SWAP[0]
    args = "'down', md.DOWN_SWAP[0], 1, heavy=4096, light=0, hidden=4096"
    plain = _aot(f"c = md.aot_compile({args})")
    res = _aot(f"c = md.aot_compile({args}, prefetch=True)")
    ptx = res["ptx"]
    assert "prefetch.global.L2" not in plain["ptx"] and "prefetch.global.L2" in ptx
    # the dense branch's requests, then its wait
    waits = [i for i, line in enumerate(ptx.splitlines()) if "griddepcontrol.wait" in line]
    requests = [i for i, line in enumerate(ptx.splitlines()) if "prefetch.global.L2" in line]
    assert any(w > max(requests) for w in waits)
    assert res["spills"] == 0 and res["regs"] <= (cfg.maxnreg or 255)


def _aot(statement: str) -> dict:
    """Run `statement` (binding `c` to an `mma_decode.aot_compile` result) in a fresh Python
    without TRITON_INTERPRET: {"regs", "spills", "ptx"}. A fresh process because the interpreter
    patches triton.language's tensor methods while it runs kernels, and a worker that ran
    interpreted kernels before could compile with them (CI, session 23: three such compiles
    failed with an interpreter builder inside Gluon's code generator)."""
    code = "\n".join([
        "import json",
        "from ffnsplit.kernels import mma_decode as md",
        statement,
        "regs, spills = md.aot_resources(c)",
        "print(json.dumps(dict(regs=regs, spills=spills, ptx=c.asm['ptx'])))",
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_down_slices_share_out_the_bytes() -> None:
    """Kernel B's K-slices: packed and dense in proportion to their weighted bytes (the Llama-3-8B
    FFN's down projection, 16 slices a tile: 14 packed, 2 dense), every part at least one slice,
    none past the chunks it has, and a part that is absent gets none."""
    assert mma_decode._down_slices(16, 720, 13632, 128) == (14, 2)
    assert mma_decode._down_slices(16, 0, 13632, 128) == (16, 0)
    assert mma_decode._down_slices(16, 4096, 0, 128) == (0, 16)
    assert mma_decode._down_slices(200, 720, 13632, 128) == (107, 6)  # chunks: 107 and 6
    assert mma_decode._down_slices(4, 64, 13632, 128) == (3, 1)
