"""Fused profiler statistics of one FFN batch: column sums, max and exact per-token top-k counts.

For activations a [T, I] and down-column norms c [I], one pass adds to per-neuron accumulators:
sum_t |a_ti|, sum_t a_ti^2, max_t |a_ti| and, for every token t, 1 to each of the k neurons with
the largest o_ti = |a_ti| * c_i (float32). The k-th largest o of a row is found exactly by a bitwise
search on the float bit pattern (o >= 0, so its bits as int32 order like the values), with the row
in registers: each step counts the elements >= a candidate threshold and keeps the candidate bit
when at least k remain; a row is done early once a candidate selects exactly k. Ties at the k-th
value go to the lowest neuron indices (a prefix count over the tied elements), so exactly k per
token. Each program loops over rows and writes per-neuron partials; a second kernel adds them in a
fixed order (deterministic, no atomics) into the running accumulators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest intermediate size handled by the kernel: a row (padded to a power of two) and four
# per-neuron accumulators sit in registers; beyond this they spill. Larger FFNs (run sequentially
# anyway, where weight transfers dominate) use the torch path of the profiler.
MAX_SIZE = 4096


@triton.jit
def _row_stats_kernel(
    a_ptr, c_ptr, part_ptr, count_ptr, T, size, stride_t, k, n_prog,
    ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """Rows pid*ROWS, (pid + n_prog)*ROWS, ... of a: per-neuron partials of this program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_I)
    col_ok = cols < size
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    acc_abs = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc_max = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc_count = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(pid * ROWS, T, n_prog * ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
        a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(a)
        acc_abs += tl.sum(magnitude, axis=0)
        acc_sq += tl.sum(a * a, axis=0)
        acc_max = tl.maximum(acc_max, tl.max(magnitude, axis=0))
        # padding (and rows past T) get bits -1: below every threshold searched (all >= 0)
        bits = tl.where(mask, (magnitude * c[None, :]).to(tl.int32, bitcast=True), -1)
        threshold = tl.zeros([ROWS], dtype=tl.int32)
        done = rows >= T
        n_open = tl.sum(row_ok.to(tl.int32), axis=0)
        shift = n_open * 0 + 30
        while (shift >= 0) & (n_open > 0):
            candidate = threshold | (1 << shift)
            count = tl.sum((bits >= candidate[:, None]).to(tl.int32), axis=1)
            threshold = tl.where((count >= k) & ~done, candidate, threshold)
            done = done | (count == k)
            n_open = tl.sum((~done).to(tl.int32), axis=0)
            shift -= 1
        # done rows: exactly k elements >= threshold; others: threshold is the k-th largest value
        above = bits > threshold[:, None]
        tied = bits == threshold[:, None]
        n_above = tl.sum(above.to(tl.int32), axis=1)
        selected = above | tied
        if tl.max(n_above + tl.sum(tied.to(tl.int32), axis=1) - k, axis=0) > 0:
            rank = tl.cumsum(tied.to(tl.int32), axis=1)
            selected = above | (tied & (rank <= (k - n_above)[:, None]))
        acc_count += tl.sum(selected.to(tl.int32), axis=0)
    tl.store(part_ptr + pid * size + cols, acc_abs, mask=col_ok)
    tl.store(part_ptr + (n_prog + pid) * size + cols, acc_sq, mask=col_ok)
    tl.store(part_ptr + (2 * n_prog + pid) * size + cols, acc_max, mask=col_ok)
    tl.store(count_ptr + pid * size + cols, acc_count, mask=col_ok)


@triton.jit
def _finish_kernel(
    part_ptr, count_ptr, abs_ptr, sq_ptr, max_ptr, total_ptr, size, n_prog,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Add the partials of every program, in program order, into the running accumulators."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < size
    sum_abs = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    max_abs = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_count = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, n_prog, BLOCK_P):
        progs = start + tl.arange(0, BLOCK_P)
        mask = (progs < n_prog)[:, None] & col_ok[None, :]
        offsets = progs[:, None] * size + cols[None, :]
        sum_abs += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0), axis=0)
        sum_sq += tl.sum(tl.load(part_ptr + n_prog * size + offsets, mask=mask, other=0.0), axis=0)
        part_max = tl.load(part_ptr + 2 * n_prog * size + offsets, mask=mask, other=0.0)
        max_abs = tl.maximum(max_abs, tl.max(part_max, axis=0))
        sum_count += tl.sum(tl.load(count_ptr + offsets, mask=mask, other=0), axis=0)
    tl.store(abs_ptr + cols, tl.load(abs_ptr + cols, mask=col_ok) + sum_abs, mask=col_ok)
    tl.store(sq_ptr + cols, tl.load(sq_ptr + cols, mask=col_ok) + sum_sq, mask=col_ok)
    old_max = tl.load(max_ptr + cols, mask=col_ok)
    tl.store(max_ptr + cols, tl.maximum(old_max, max_abs), mask=col_ok)
    old_total = tl.load(total_ptr + cols, mask=col_ok)
    tl.store(total_ptr + cols, old_total + sum_count.to(tl.int64), mask=col_ok)


def _launch_shape(size: int) -> tuple[int, int, int]:
    """(BLOCK_I, ROWS, num_warps): 8 to 16 row elements per thread (no register spills on sm_90;
    the four per-neuron accumulators take registers too)."""
    block = triton.next_power_of_2(size)
    if block <= 2048:
        return block, 2, max(1, block // 256)
    return block, 1, 16


def accumulate_stats(
    a: torch.Tensor,
    col_norm: torch.Tensor,
    k: int,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    abs_max: torch.Tensor,
    topk_count: torch.Tensor,
) -> None:
    """Add the statistics of activations `a` [T, I] to the accumulators, in place.

    `col_norm` [I] float32; `abs_sum`, `sq_sum`, `abs_max` [I] float32 and `topk_count` [I] int64,
    all contiguous on a's device. `abs_max` must start at 0 (|a| >= 0). Needs I <= MAX_SIZE,
    1 <= k <= I and fewer than 2**31 tokens.
    """
    tokens, size = a.shape
    if not 1 <= k <= size <= MAX_SIZE or tokens >= 2**31:
        raise ValueError(f"profile stats kernel: unsupported shape {tuple(a.shape)}, k={k}")
    if tokens == 0:
        return
    if a.stride(1) != 1:
        a = a.contiguous()
    block, rows, warps = _launch_shape(size)
    groups = triton.cdiv(tokens, rows)
    if a.device.type == "cuda":
        programs = min(groups, 2 * torch.cuda.get_device_properties(a.device).multi_processor_count)
    else:  # the interpreter: a few programs, so the strided row loop is exercised
        programs = min(groups, 3)
    partials = torch.empty(3, programs, size, dtype=torch.float32, device=a.device)
    counts = torch.empty(programs, size, dtype=torch.int32, device=a.device)
    _row_stats_kernel[(programs,)](
        a, col_norm, partials, counts, tokens, size, a.stride(0), k, programs,
        ROWS=rows, BLOCK_I=block, num_warps=warps,
    )  # fmt: skip
    block_c = 32
    _finish_kernel[(triton.cdiv(size, block_c),)](
        partials, counts, abs_sum, sq_sum, abs_max, topk_count, size, programs,
        BLOCK_P=64, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
