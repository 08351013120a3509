"""The decode plumbing kernels (kernels/decode_ops.py) against their torch references.

On the CPU they run under TRITON_INTERPRET=1 at tiny odd shapes (hidden 72, head dim 16, 6 query
and 3 kv heads, a 37-long cache); the `gpu` tests run Llama-3-8B shapes (hidden 4096, 32 / 8
heads of 128, an 8192-long cache at position 600) in fp16 and bf16, a CUDA graph replayed at
moving positions, and the cost of attention following the position, not the cache length.
Outputs are NaN-poisoned where launchers allocate them (conftest's `poison`); cache entries no
query may see are NaN.
"""

from __future__ import annotations

import pytest
import torch

from ffnsplit.kernels import decode_ops, reference
from tests.test_kernels import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def randn(*shape: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def norm_weight(size: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return (torch.rand(size, device=device) + 0.5).to(dtype)


# ---------------------------------------------------------------------------------------------
# The greedy pick


@pytest.mark.parametrize("vocab", [4096, 128 * 257, 1001])
def test_greedy_tokens_is_argmax_with_ties(vocab) -> None:
    """The first index of the maximum, ties across and inside chunks included; a vocabulary
    with no power-of-two divisor takes argmax itself."""
    logits = torch.randn(3, vocab, device=DEVICE).half()
    top = logits.max() + 1
    logits[0, [vocab // 2, vocab - 1]] = top  # tie across chunks: the first wins
    logits[1, [5, 6]] = top  # tie inside a chunk
    got = decode_ops.greedy_tokens(logits)
    assert got.shape == (3, 1) and got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1, keepdim=True))
    assert got[0, 0] == vocab // 2 and got[1, 0] == 5


def test_greedy_tokens_in_place_with_the_position_step(poison) -> None:
    """The decode step's form: tokens written into `out`, the position advanced by one, a NaN
    taken as the maximum (before a later +inf too: NaN counts as +inf, first index wins), fp32
    rows of odd length with their maximum in the last, partial chunk."""
    logits = torch.randn(4, 777, device=DEVICE)
    logits[0, 776] = 50.0
    logits[1, 300] = float("nan")
    logits[1, 500] = float("inf")
    logits[2, :] = -3.0  # all tied: the first index
    out = torch.full((4, 1), -1, dtype=torch.int64, device=DEVICE)
    position = torch.tensor([41], device=DEVICE)
    got = decode_ops.greedy_tokens(logits, out=out, position=position)
    assert got.data_ptr() == out.data_ptr()
    assert out[:, 0].tolist() == [776, 300, 0, int(logits[3].argmax())]
    assert position.item() == 42
    decode_ops.greedy_tokens(logits[:, :5], out=out, position=position)  # counters reset
    assert torch.equal(out, logits[:, :5].nan_to_num(float("inf")).argmax(-1, keepdim=True))
    assert position.item() == 43
    with pytest.raises(ValueError, match="int64"):
        decode_ops.greedy_tokens(logits, out=out.int())


# ---------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loop", [False, True], ids=["one-pass", "looped"])
def test_add_rms_norm_matches_reference(poison, monkeypatch, dtype, loop) -> None:
    if loop:  # rows longer than the register block: two passes over 32-wide blocks
        monkeypatch.setattr(decode_ops, "MAX_NORM_BLOCK", 32)
    x, residual = randn(3, 5, 72, dtype=dtype), randn(3, 5, 72, dtype=dtype)
    weight = norm_weight(72, dtype)
    out, new_residual = decode_ops.add_rms_norm(x, residual, weight, 1e-5)
    expected, expected_residual = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(new_residual, expected_residual)  # one rounding of the same sum
    assert rel_err(out, expected) < TOL[dtype]
    plain = decode_ops.rms_norm(x, weight, 1e-5)
    assert rel_err(plain, reference.rms_norm(x, weight, 1e-5)) < TOL[dtype]


def test_rms_norm_of_strided_rows_and_a_wider_weight(poison) -> None:
    """The last token of a [B, T, H] slice (strided rows); an fp32 weight on fp16 rows promotes
    the output to fp32, as LlamaRMSNorm's `weight * h.to(dtype)` does."""
    x = randn(2, 7, 72, dtype=torch.float16)[:, -1:]
    weight = norm_weight(72, torch.float32)
    out = decode_ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 72)
    assert rel_err(out, reference.rms_norm(x, weight, 1e-6)) < TOL[torch.float32]


def test_rms_norm_uses_eps_and_weight() -> None:
    """A kernel that ignores eps or the weight fails: tiny rows make eps dominate."""
    x = randn(4, 72, dtype=torch.float32) * 1e-3
    weight = norm_weight(72, torch.float32)
    out = decode_ops.rms_norm(x, weight, 1e-4)
    assert rel_err(out, reference.rms_norm(x, weight, 1e-4)) < 1e-5
    assert rel_err(out, reference.rms_norm(x, weight, 1e-6)) > 0.1
    assert rel_err(out, reference.rms_norm(x, torch.ones_like(weight), 1e-4)) > 0.1


# ---------------------------------------------------------------------------------------------
# Rotary + cache write

HEADS = {"q_heads": 6, "kv_heads": 3, "head_dim": 16}


def _rope_inputs(dtype: torch.dtype, batch: int, positions: list[int], length: int, q_heads: int,
                 kv_heads: int, head_dim: int, device: str = DEVICE) -> dict:  # fmt: skip
    t = len(positions)
    return {
        "qkv": randn(batch, t, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device),
        "cos": randn(t, head_dim, dtype=dtype, device=device),
        "sin": randn(t, head_dim, dtype=dtype, device=device),
        "positions": torch.tensor(positions, device=device),
        "k_cache": randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device),
        "v_cache": randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device),
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def _check_rope(inputs: dict, dtype: torch.dtype, qk_norm: bool) -> None:
    if qk_norm:
        dim = inputs["head_dim"]
        device = inputs["qkv"].device
        inputs = {**inputs, "q_norm": norm_weight(dim, dtype, device),
                  "k_norm": norm_weight(dim, dtype, device), "eps": 1e-6}  # fmt: skip
    expected_inputs = {**inputs, "k_cache": inputs["k_cache"].clone(),
                       "v_cache": inputs["v_cache"].clone()}  # fmt: skip
    q = decode_ops.rope_kv_write(**inputs)
    expected_q = reference.rope_kv_write(**expected_inputs)
    assert q.shape == expected_q.shape
    assert rel_err(q, expected_q) < TOL[dtype]
    for cache in ("k_cache", "v_cache"):  # the written rows, and nothing else touched
        assert rel_err(inputs[cache], expected_inputs[cache]) < TOL[dtype]
        written = inputs[cache][:, :, inputs["positions"]]
        assert rel_err(written, expected_inputs[cache][:, :, inputs["positions"]]) < TOL[dtype]
    unwritten = torch.ones(inputs["k_cache"].shape[2], dtype=torch.bool)
    unwritten[inputs["positions"].cpu()] = False
    assert torch.equal(
        inputs["v_cache"][:, :, unwritten], expected_inputs["v_cache"][:, :, unwritten]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_rope_kv_write_matches_reference(poison, dtype, qk_norm) -> None:
    inputs = _rope_inputs(dtype, batch=2, positions=[11, 4, 12], length=19, **HEADS)
    _check_rope(inputs, dtype, qk_norm)


def test_rope_kv_write_rotates_with_cos_and_sin() -> None:
    """Swapping cos and sin (or dropping rotate_half's sign) would not pass: check one head."""
    inputs = _rope_inputs(torch.float32, batch=1, positions=[3], length=5, **HEADS)
    q = decode_ops.rope_kv_write(**inputs)
    x = inputs["qkv"][0, 0, :16]
    cos, sin = inputs["cos"][0], inputs["sin"][0]
    rotated = x * cos + torch.cat((-x[8:], x[:8])) * sin
    torch.testing.assert_close(q[0, 0, 0], rotated)


# ---------------------------------------------------------------------------------------------
# Attention


def _attention_case(dtype: torch.dtype, batch: int, positions: list[int], length: int,
                    q_heads: int, kv_heads: int, head_dim: int, window: int | None,
                    device: str = DEVICE) -> tuple[dict, dict]:  # fmt: skip
    """Kernel inputs whose caches are NaN wherever no query may look, and the clean inputs of
    the reference."""
    t = len(positions)
    pos = torch.tensor(positions, device=device)
    clean = {
        "q": randn(batch, q_heads, t, head_dim, dtype=dtype, device=device),
        "k_cache": randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device),
        "v_cache": randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device),
        "positions": pos,
        "scale": head_dim**-0.5,
        "groups": q_heads // kv_heads,
        "window": window,
    }
    keys = torch.arange(length, device=device)
    seen = (keys[None, :] <= pos[:, None]).any(0)
    if window is not None:
        seen = ((keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)).any(0)
    poisoned = dict(clean)
    for cache in ("k_cache", "v_cache"):
        poisoned[cache] = clean[cache].clone()
        poisoned[cache][:, :, ~seen] = float("nan")
    return poisoned, clean


# (positions, chunk): decode, several queries over split chunks (out of order, across chunk
# boundaries), many rows (two row tiles, one pass) and a forced single pass.
ATTENTION_CASES = {
    "decode-split": ([21], None),
    "queries-split": ([17, 5, 33, 16], 16),
    "prefill-tiles": (list(range(9, 18)), None),
    "one-pass": ([30, 31], 64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_decode_attention_matches_reference(poison, dtype, window, case) -> None:
    positions, chunk = ATTENTION_CASES[case]
    kernel_inputs, clean = _attention_case(dtype, 2, positions, 37, window=window, **HEADS)
    out = decode_ops.decode_attention(**kernel_inputs, chunk=chunk)
    expected = reference.decode_attention(**clean)
    assert out.shape == expected.shape and out.dtype == dtype
    assert rel_err(out, expected) < TOL[dtype]


def test_decode_attention_is_causal_over_the_cache() -> None:
    """Moving the query's position changes what it sees (a kernel reading every key fails)."""
    inputs, _ = _attention_case(torch.float32, 1, [20], 37, window=None, **HEADS)
    clean = {**inputs, "k_cache": randn(1, 3, 37, 16, dtype=torch.float32),
             "v_cache": randn(1, 3, 37, 16, dtype=torch.float32)}  # fmt: skip
    at_20 = decode_ops.decode_attention(**clean)
    at_30 = decode_ops.decode_attention(**{**clean, "positions": torch.tensor([30], device=DEVICE)})
    assert rel_err(at_20, reference.decode_attention(**clean)) < 1e-5
    assert rel_err(at_30, at_20) > 0.05


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"groups": 3}, "query heads per kv head"),
        ({"positions": torch.tensor([1.0])}, "integer tensor"),
        ({"window": 0}, "at least 1"),
        ({"q": torch.ones(1, 6, 1, 16, dtype=torch.float64)}, "fp16, bf16 or fp32"),
    ],
)
def test_decode_attention_rejects_bad_inputs(change: dict, message: str) -> None:
    inputs, _ = _attention_case(torch.float32, 1, [3], 8, window=None, **HEADS)
    with pytest.raises(ValueError, match=message):
        decode_ops.decode_attention(**{**inputs, **change})


def test_rope_kv_write_rejects_a_width_that_is_not_the_heads() -> None:
    inputs = _rope_inputs(torch.float32, batch=1, positions=[2], length=5, **HEADS)
    with pytest.raises(ValueError, match="heads x 16"):
        decode_ops.rope_kv_write(**{**inputs, "q_heads": 5})


# ---------------------------------------------------------------------------------------------
# A decode token's attention: one launch and its combine (or its ticket)


def _check_rope_attention(dtype: torch.dtype, batch: int, position: int, length: int,
                          q_heads: int, kv_heads: int, head_dim: int, window: int | None,
                          chunk: int | None, ticket: bool, device: str = DEVICE) -> None:  # fmt: skip
    """rope_attention against reference.rope_attention. The kernel's caches are NaN at every key
    the token may not see and at its own position (which it must write and take from
    registers), so reading anything else fails; the written rows must match the reference's."""
    inputs = _rope_inputs(dtype, batch, [position], length, q_heads, kv_heads, head_dim, device)
    # the rotary tables of every position (P > L): the kernel reads row `position`
    inputs["cos"] = randn(length + 3, head_dim, dtype=dtype, device=device)
    inputs["sin"] = randn(length + 3, head_dim, dtype=dtype, device=device)
    expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())
    keys = torch.arange(length, device=device)
    unseen = keys >= position
    if window is not None:
        unseen |= keys <= position - window
    for cache in ("k_cache", "v_cache"):
        inputs[cache][:, :, unseen] = float("nan")
    scale = head_dim**-0.5
    out = decode_ops.rope_attention(**inputs, scale=scale, window=window, chunk=chunk,
                                    ticket=ticket)  # fmt: skip
    ref_inputs = {**inputs, "k_cache": expected_caches[0], "v_cache": expected_caches[1]}
    expected = reference.rope_attention(**ref_inputs, scale=scale, window=window)
    assert out.shape == expected.shape and out.dtype == dtype
    rows = {name: inputs[name][position : position + 1] for name in ("cos", "sin")}
    q = reference.rope_kv_write(**{**ref_inputs, **rows, "k_cache": expected_caches[0].clone(),
                                   "v_cache": expected_caches[1].clone()})  # fmt: skip
    two = decode_ops.decode_attention(q, *expected_caches, inputs["positions"], scale,
                                      q_heads // kv_heads, window)  # fmt: skip
    assert out.stride() == two.stride()  # the same layout as the two-launch path's
    assert rel_err(out, expected) < TOL[dtype]
    for mine, theirs in zip((inputs["k_cache"], inputs["v_cache"]), expected_caches, strict=True):
        assert rel_err(mine[:, :, position], theirs[:, :, position]) < TOL[dtype]  # (GPU fp32:
        # the rotary's two products may fuse into one FMA)


# (batch, position, length, heads, window, chunk): several chunks with the token at a chunk's
# first key, its last key and inside one; one chunk; 1, 2 and 5 query heads a kv head; a head
# size that is not a power of two; a window that starts inside a chunk; the token in a chunk's
# second block of keys (the interpreter's blocks are 16 keys)
ROPE_ATTENTION_CASES = {
    "chunks-first-key": (2, 16, 37, (6, 3, 16), None, 16),
    "chunks-last-key": (1, 31, 37, (6, 3, 16), 6, 16),
    "chunks-inside": (2, 26, 40, (10, 2, 24), None, 8),
    "one-chunk": (1, 12, 19, (4, 4, 16), 5, 64),
    "first-token": (1, 0, 37, (6, 3, 16), None, 16),
    "last-key": (1, 36, 37, (6, 3, 16), None, None),
    "long-chunks": (1, 35, 37, (6, 3, 16), 20, 32),
    "later-block": (1, 20, 37, (6, 3, 16), None, 32),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROPE_ATTENTION_CASES))
@pytest.mark.parametrize("ticket", [False, True], ids=["combine", "ticket"])
def test_rope_attention_matches_the_reference(poison, dtype, case, ticket) -> None:
    batch, position, length, heads, window, chunk = ROPE_ATTENTION_CASES[case]
    _check_rope_attention(dtype, batch, position, length, *heads, window, chunk, ticket)


def test_rope_attention_warps_follow_the_grid() -> None:
    """4 warps a program up to two programs an SM that take one block of keys each, else 2 (a
    CPU counts as 4 SMs)."""
    device = torch.device(DEVICE)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if ON_GPU else 4
    pick = decode_ops._rope_attention_warps
    assert [pick(device, n, 1) for n in (1, 2 * sms, 2 * sms + 1, 100 * sms)] == [4, 4, 2, 2]
    assert pick(device, 1, 2) == 2


def test_split_attention_chunks_keep_two_programs_an_sm(monkeypatch) -> None:
    """The default chunk: whole blocks, about two programs an SM over the batch's kv heads, at
    most MAX_SPLITS chunks; FFNSPLIT_ATTENTION_PROGRAMS_PER_SM=0 keeps MAX_SPLITS chunks."""
    monkeypatch.setattr(decode_ops, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_ops, "MAX_SPLITS", 128)
    chunk = decode_ops._key_chunk
    cpu = torch.device("cpu")
    # Llama-3-8B (8 kv heads, 32 keys a block): 20 one-block chunks at 640 keys, 32 at 4,096
    # and 8,192 (4 and 8 blocks each); 37 keys in 2 blocks; many heads: one chunk
    assert [chunk(cpu, n, 32, 8) for n in (640, 4096, 8192, 37)] == [32, 128, 256, 32]
    # a batch of 4: 9 chunks of 15 blocks
    assert chunk(cpu, 4096, 32, 4 * 8) == 32 * 15 and chunk(cpu, 640, 32, 300) == 640
    monkeypatch.setattr(decode_ops, "SPLIT_PROGRAMS_PER_SM", 0)
    assert chunk(cpu, 4096, 32, 8) == 32 and chunk(cpu, 65536, 32, 8) == 512


def test_rope_attention_tickets_reset_between_calls() -> None:
    """The chunks' ticket counters are back at zero after each call: a second call (the next
    position, other heads) combines right, and so does the combine launch after it."""
    for position in (20, 21, 35):
        _check_rope_attention(torch.float32, 1, position, 37, 6, 3, 16, None, 8, True)
    _check_rope_attention(torch.float32, 2, 5, 37, 8, 2, 16, 3, 8, True)
    _check_rope_attention(torch.float32, 2, 5, 37, 8, 2, 16, 3, 8, False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positions": torch.tensor([1, 2])}, "one decode token"),
        ({"q_heads": 5}, "whole groups"),
        ({"q_heads": 17 * 3}, "at most 16"),
        ({"window": 0}, "at least 1"),
        ({"cos": torch.zeros(16, device=DEVICE)}, "table"),
    ],
)
def test_rope_attention_rejects_bad_inputs(change: dict, message: str) -> None:
    inputs = _rope_inputs(torch.float32, batch=1, positions=[2], length=5, **HEADS)
    if "positions" in change:
        inputs = _rope_inputs(torch.float32, batch=1, positions=[2, 3], length=5, **HEADS)
    if change.get("q_heads") == 17 * 3:
        inputs = _rope_inputs(torch.float32, 1, [2], 5, 17 * 3, 3, 16)
    with pytest.raises(ValueError, match=message):
        decode_ops.rope_attention(**{**inputs, **change}, scale=0.25)


# ---------------------------------------------------------------------------------------------
# GPU: Llama-3-8B shapes

LLAMA3 = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
GPU_DTYPES = [torch.float16, torch.bfloat16]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 512])
def test_gpu_add_rms_norm_llama3(poison, dtype, rows) -> None:
    x, residual = randn(rows, 4096, dtype=dtype), randn(rows, 4096, dtype=dtype)
    weight = norm_weight(4096, dtype)
    out, new_residual = decode_ops.add_rms_norm(x, residual, weight, 1e-5)
    expected, expected_residual = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, expected_residual)
    assert rel_err(out, expected) < TOL[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("positions", [[600], list(range(512))], ids=["decode", "prefill"])
def test_gpu_rope_kv_write_llama3(poison, dtype, positions) -> None:
    _check_rope(_rope_inputs(dtype, 1, positions, 8192, **LLAMA3), dtype, qk_norm=False)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize(
    ("batch", "positions"), [(1, [600]), (4, [600]), (1, [8000]), (1, list(range(512)))],
    ids=["decode", "decode-b4", "decode-long", "prefill"],
)  # fmt: skip
def test_gpu_decode_attention_llama3(poison, dtype, window, batch, positions) -> None:
    kernel_inputs, clean = _attention_case(dtype, batch, positions, 8192, window=window, **LLAMA3)
    out = decode_ops.decode_attention(**kernel_inputs)
    assert rel_err(out, reference.decode_attention(**clean)) < TOL[dtype]


@gpu
@needs_cuda
def test_gpu_decode_step_replays_in_a_cuda_graph_at_moving_positions() -> None:
    """Rotary, cache write and attention captured once, replayed at positions 600..603."""
    dtype = torch.float16
    inputs = _rope_inputs(dtype, 1, [600], 8192, **LLAMA3)
    positions = inputs["positions"]
    expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())

    def step() -> torch.Tensor:
        q = decode_ops.rope_kv_write(**inputs)
        return decode_ops.decode_attention(q, inputs["k_cache"], inputs["v_cache"], positions,
                                           128**-0.5, 4)  # fmt: skip

    step()  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for position in range(600, 604):
        positions.fill_(position)
        inputs["qkv"].copy_(randn(*inputs["qkv"].shape, dtype=dtype))
        graph.replay()
        ref_inputs = {**inputs, "k_cache": expected_caches[0], "v_cache": expected_caches[1]}
        q = reference.rope_kv_write(**ref_inputs)
        expected = reference.decode_attention(q, *expected_caches, positions, 128**-0.5, 4)
        assert rel_err(out, expected) < TOL[dtype], position


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("ticket", [False, True], ids=["combine", "ticket"])
@pytest.mark.parametrize(("batch", "position"), [(1, 600), (4, 600), (1, 8000), (1, 64)],
                         ids=["decode", "decode-b4", "decode-long", "chunk-edge"])  # fmt: skip
@pytest.mark.parametrize("warps", [0, 4], ids=["warps-by-grid", "warps-4"])
def test_gpu_rope_attention_llama3(poison, monkeypatch, dtype, window, ticket, batch, position,
                                   warps) -> None:  # fmt: skip
    """An 8,192-key cache: 128 chunks a kv head, more programs than two an SM, so the grid's
    pick is 2 warps; the forced 4 keep the short-cache form covered at this length."""
    monkeypatch.setattr(decode_ops, "ROPE_ATTENTION_WARPS", warps)
    _check_rope_attention(dtype, batch, position, 8192, window=window, chunk=None, ticket=ticket,
                          **LLAMA3)  # fmt: skip


@gpu
@needs_cuda
@pytest.mark.parametrize("ticket", [False, True], ids=["combine", "ticket"])
def test_gpu_rope_attention_replays_in_a_cuda_graph_at_moving_positions(ticket) -> None:
    """The one-launch decode attention captured once, replayed at positions 600..603 (its
    tickets reset between replays; the new keys written where the next replay reads them)."""
    dtype = torch.float16
    inputs = _rope_inputs(dtype, 1, [600], 8192, **LLAMA3)
    inputs["cos"], inputs["sin"] = randn(8192, 128, dtype=dtype), randn(8192, 128, dtype=dtype)
    positions = inputs["positions"]
    expected_caches = (inputs["k_cache"].clone(), inputs["v_cache"].clone())
    decode_ops.rope_attention(**inputs, scale=128**-0.5, ticket=ticket)  # compiles (writes 600)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_ops.rope_attention(**inputs, scale=128**-0.5, ticket=ticket)
    for position in range(600, 604):
        positions.fill_(position)
        inputs["qkv"].copy_(randn(*inputs["qkv"].shape, dtype=dtype))
        graph.replay()
        ref_inputs = {**inputs, "k_cache": expected_caches[0], "v_cache": expected_caches[1]}
        expected = reference.rope_attention(**ref_inputs, scale=128**-0.5)
        assert rel_err(out, expected) < TOL[dtype], position
