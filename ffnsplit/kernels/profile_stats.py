"""Profiler statistics of one FFN batch: column sums, max and exact per-token top-k counts.

For activations a [T, I] and down-column norms c [I], adds to per-neuron accumulators
sum_t |a_ti|, sum_t a_ti^2, max_t |a_ti| and, for every token t, 1 to each of the k neurons with the
largest o_ti = |a_ti| * c_i (float32; ties at the k-th value go to the lowest neuron indices, so
exactly k per token). Three kernels, all deterministic (no float atomics):

1. `_row_select_kernel`: one warp per row. Programs of num_warps=1 loop over rows pid,
   pid + n_prog, ... (twice as many programs as the GPU holds at once); only for I > 2048 does a row
   take I / 2048 warps. The row's o as int32 bit patterns (sign cleared: they order like the
   values) sit in registers as up to three power-of-two pieces (1536 = 1024 + 512: no padding
   work; above 8192 one padded piece). The k-th largest is found exactly by a search over the bit patterns in which every step
   is one count #{bits >= mid}: two integer instructions an element and one warp reduction
   (REDUX on sm_90: no shared memory, no barrier). The search keeps #{bits >= lo} >= k >
   #{bits > hi}; it starts from hi = the row max, gallops down from it (mid 2, 4, 8, ... binades
   below hi) until a count reaches k, then bisects, and stops as soon as a mid selects exactly k:
   about 10-13 counts on synthetic SwiGLU-like rows of 1536 (a bitwise search from bit 30 takes
   about 15, and up to 31). Per row it writes a cut (thr, first): token t selects neuron i iff
   bits_ti > thr, or bits_ti == thr and i < first. `first` is I unless more than k values tie at
   thr; then a prefix count over the tied values (only in such rows) puts it one past the column
   of the last tied value kept.
2. `_col_stats_kernel`, memory-bound: programs of 4 warps own 256 neurons x a fixed range of
   tokens, in tiles of 32 tokens (16 above I = 2048; the next tile and its rows' cuts loaded while
   one is reduced); token r of a tile goes to warp r % 4 and a thread holds 8 neurons, so
   sum |a|, sum a^2, max |a| and the top-k count (from the row cuts: bits >= thr + (i >= first),
   two instructions an element) accumulate in registers, and the warps are reduced once at the
   end into one row of partials per program.
3. `_finish_kernel` adds the partials of every program, in program order, into the running
   accumulators (`accumulate_stats`, one call = three launches). The profiler instead keeps
   `StatsPartials`: a slot of per-program partials for each FFN of one size and calibration half,
   into which the column kernel adds call after call (ACCUMULATE), so a hook call costs two
   launches; at the end one `flush` launch per half reduces the slots of every FFN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffnsplit.kernels.tiles import blocks_per_sm, resident_blocks

# Largest intermediate size handled by the kernels: a row's bits sit in registers, at most 64 a
# thread (one warp up to I = 2048; beyond, num_warps = I / 2048 and each search step reduces
# across warps). Up to 16384 (8 warps) compiles without spills on sm_90 (benchmarks/aot_sass.py);
# 32768 would need 16 warps and spills. Larger FFNs use the torch path of the profiler.
MAX_SIZE = 16384
# Row elements per thread in registers before the row is split over more warps.
_ELEMENTS_PER_THREAD = 64
# The gallop's first step below the row max, in float32 bit-pattern units (2 binades = 4x).
_GALLOP = 2 << 23
# Column-statistics tiles: BLOCK_T tokens x BLOCK_C neurons per step; a warp covers the 256
# neurons (8 per thread) of every WARPS-th token of the tile. Tiles of 32 tokens up to I = 2048
# (59.4 vs 64.5 us with 16 for a call of 32,768 x 1536 bf16 tokens on an H100); larger FFNs keep
# 16, the configuration their sequential-mode measurements used.
_COL_BLOCK_T = 32
_COL_BLOCK_T_LARGE = 16
_COL_LARGE_SIZE = 2048
_COL_BLOCK_C = 256
_COL_WARPS = 4
# Row-kernel programs per program slot of the GPU: twice as many programs as it holds at once,
# each with half the rows, even out the rows' unequal search lengths (timed alone: 78.4 vs 88.6 us
# for 32,768 x 1536 bf16 rows on an H100).
_ROW_WAVES = 2


@triton.jit
def _piece_bits(a_ptr, c_ptr, row_off, size, START: tl.constexpr, BLOCK: tl.constexpr):
    """o = |a| * c of columns START..START+BLOCK of a row as int32 bits (sign cleared); 0 past
    the row: below every mid searched (all >= 1), and after every column if tied at 0."""
    cols = START + tl.arange(0, BLOCK)
    ok = cols < size
    a = tl.load(a_ptr + row_off + cols, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + cols, mask=ok, other=0.0)
    return (tl.abs(a) * c).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _count_ge(bits, below):
    """#{bits > below} along axis 0: the sign bit of below - bits, summed (two instructions an
    element). Needs 0 <= bits < 2**31 and -1 <= below < 2**31 (no overflow)."""
    return tl.sum(((below - bits).to(tl.uint32, bitcast=True) >> 31).to(tl.int32), axis=0)


@triton.jit
def _tie_cut(bits, thr, need, base):
    """(#{columns of this piece before the need-th value equal to thr, `base` such values coming
    before the piece}, #{values equal to thr in the piece}). Summed over the pieces, the first
    count is the column of the need-th tied value; padding (0, tied only at thr = 0) comes after
    every column and need <= the number of tied columns."""
    tied = (bits == thr).to(tl.int32)
    rank = base + tl.cumsum(tied, axis=0)
    return tl.sum((rank < need).to(tl.int32), axis=0), tl.sum(tied, axis=0)


@triton.jit(do_not_specialize=["n_prog"])  # one compiled variant whatever the grid
def _row_select_kernel(
    a_ptr, c_ptr, cut_ptr, T, size, stride_t, k, n_prog,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, GALLOP: tl.constexpr,
):  # fmt: skip
    """Rows pid, pid + n_prog, ... of a: the cut (thr, first) of each row's top k (see above)."""
    pid = tl.program_id(0)
    prev = tl.zeros([], dtype=tl.int32)  # the last row's cut: the next row's first guess
    for row in range(pid, T, n_prog):
        row_off = tl.cast(row, tl.int64) * stride_t
        bits0 = _piece_bits(a_ptr, c_ptr, row_off, size, 0, B0)
        top = tl.max(bits0, axis=0)
        if B1 > 0:
            bits1 = _piece_bits(a_ptr, c_ptr, row_off, size, B0, B1)
            top = tl.maximum(top, tl.max(bits1, axis=0))
        if B2 > 0:
            bits2 = _piece_bits(a_ptr, c_ptr, row_off, size, B0 + B1, B2)
            top = tl.maximum(top, tl.max(bits2, axis=0))
        # Invariant: n_lo = #{bits >= lo} >= k > n_hi = #{bits > top_in}, top_in = hi - 1 (int32
        # without overflow: hi can be 2**31). Every valid bits >= 0: n_lo = size at lo = 0.
        lo = top * 0
        top_in = top
        n_lo = lo + size
        n_hi = lo
        gallop = lo + (GALLOP - 1)  # the next gallop step, minus 1
        guess = prev  # tried first (rows of one layer have similar cuts), then 0: used up
        slow = lo  # 1: the last step left more than half the bracket: bisect next
        while (top_in > lo) & (n_lo != k):
            # No lower bound yet (lo == 0): the last row's cut, then a gallop down from the top.
            # Then a safeguarded interpolation: the cut placed as if the n_lo - n_hi values in
            # [lo, top_in] were spread evenly over the bit patterns, or a bisection when the
            # last step did not halve the bracket. Always lo < mid <= top_in.
            width = top_in - lo
            bisect = lo + 1 + ((width - 1) >> 1)
            share = (k - n_hi).to(tl.float32) / (n_lo - n_hi).to(tl.float32)
            est = top_in.to(tl.float32) + 1.0 - share * width.to(tl.float32)
            est = tl.minimum(tl.maximum(est, 1.0), 2147483520.0).to(tl.int32)
            interp = tl.minimum(tl.maximum(est, lo + 1), top_in)
            down = tl.where((guess > 0) & (guess <= top_in), guess, tl.maximum(top_in - gallop, 1))
            mid = tl.where(lo == 0, down, tl.where(slow == 1, bisect, interp))
            n = _count_ge(bits0, mid - 1)
            if B1 > 0:
                n += _count_ge(bits1, mid - 1)
            if B2 > 0:
                n += _count_ge(bits2, mid - 1)
            up = n >= k
            was_open = lo == 0
            lo = tl.where(up, mid, lo)
            n_lo = tl.where(up, n, n_lo)
            top_in = tl.where(up, top_in, mid - 1)
            n_hi = tl.where(up, n_hi, n)
            gallop = tl.where(up | (guess > 0), gallop, tl.minimum(gallop, 0x3FFFFFFF) * 2 + 1)
            guess = guess * 0
            slow = tl.where(was_open | ((top_in - lo) <= (width >> 1)), 0, 1)
        # n_lo == k: exactly k values >= lo. Else top_in == lo: lo is the k-th largest value and
        # n_lo - n_hi > k - n_hi values equal it: keep the first k - n_hi of them.
        first = size
        if n_lo != k:
            need = k - n_hi
            before, tied = _tie_cut(bits0, lo, need, 0)
            if B1 > 0:
                before1, tied1 = _tie_cut(bits1, lo, need, tied)
                before += before1
                tied += tied1
            if B2 > 0:
                before2, tied2 = _tie_cut(bits2, lo, need, tied)
                before += before2
            first = before + 1
        tl.store(cut_ptr + row, lo)
        tl.store(cut_ptr + T + row, first)
        prev = lo


@triton.jit
def _col_stats_kernel(
    a_ptr, c_ptr, cut_ptr, part_ptr, count_ptr, T, size, stride_t, rows_per_split,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, WARPS: tl.constexpr,
    ACCUMULATE: tl.constexpr = False,
):  # fmt: skip
    """Neurons of block pid_c, tokens of split pid_t: partial sum |a|, sum a^2, max |a| and
    top-k count, written to (ACCUMULATE: added to) row pid_t of the partials. Row r of a tile goes to warp r % WARPS
    and a thread holds 8 neurons of its rows, so the reductions over tokens stay in registers
    (per-warp accumulators) until one reduction across the warps at the end."""
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_split = tl.num_programs(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < size
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    acc_abs = tl.zeros([WARPS, BLOCK_C], dtype=tl.float32)
    acc_sq = tl.zeros([WARPS, BLOCK_C], dtype=tl.float32)
    acc_max = tl.zeros([WARPS, BLOCK_C], dtype=tl.float32)
    acc_count = tl.zeros([WARPS, BLOCK_C], dtype=tl.int32)
    row_start = pid_t * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    local = tl.arange(0, BLOCK_T)
    tile = local[:, None] * stride_t + cols[None, :]  # int32: BLOCK_T * stride_t < 2**31
    # software pipelining: the next tile and its rows' cuts are loaded while this one is reduced.
    # The cut of a row: selected iff bits >= thr (+ 1 from column `first` on, in a row whose ties
    # are cut). Rows past the end get thr = 2**31 - 1 > their bits (0); columns past the end are
    # counted but never written.
    row_ok = (row_start + local) < row_end
    mask = row_ok[:, None] & col_ok[None, :]
    a_next = tl.load(a_ptr + tl.cast(row_start, tl.int64) * stride_t + tile, mask=mask, other=0.0)
    thr_next = tl.load(cut_ptr + row_start + local, mask=row_ok, other=0x7FFFFFFF)
    first_next = tl.load(cut_ptr + T + row_start + local, mask=row_ok, other=size)
    for start in range(row_start, row_end, BLOCK_T):
        thr = thr_next
        first = first_next
        a = a_next.to(tl.float32)
        rows = start + BLOCK_T + local
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        base = a_ptr + tl.cast(start + BLOCK_T, tl.int64) * stride_t
        a_next = tl.load(base + tile, mask=mask, other=0.0)
        thr_next = tl.load(cut_ptr + rows, mask=row_ok, other=0x7FFFFFFF)
        first_next = tl.load(cut_ptr + T + rows, mask=row_ok, other=size)
        magnitude = tl.abs(a)
        # |a| * c >= +0 (a NaN product is the positive canonical NaN on the GPU): no sign to clear
        bits = (magnitude * c[None, :]).to(tl.int32, bitcast=True)
        below = thr[:, None] - 1 + (cols[None, :] >= first[:, None]).to(tl.int32)
        hit = ((below - bits).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        # token r of the tile is [r // WARPS, r % WARPS]: summing axis 0 stays inside a thread
        acc_abs += tl.sum(tl.reshape(magnitude, [BLOCK_T // WARPS, WARPS, BLOCK_C]), axis=0)
        acc_sq += tl.sum(tl.reshape(a * a, [BLOCK_T // WARPS, WARPS, BLOCK_C]), axis=0)
        part_max = tl.max(tl.reshape(magnitude, [BLOCK_T // WARPS, WARPS, BLOCK_C]), axis=0)
        acc_max = tl.maximum(acc_max, part_max)
        acc_count += tl.sum(tl.reshape(hit, [BLOCK_T // WARPS, WARPS, BLOCK_C]), axis=0)
    out = pid_t * size + cols
    # ACCUMULATE: this program's own slot, updated call after call in stream order; one
    # statistic at a time (fewer live registers than loading all four slots at once)
    total = tl.sum(acc_abs, axis=0)
    if ACCUMULATE:
        total += tl.load(part_ptr + out, mask=col_ok, other=0.0)
    tl.store(part_ptr + out, total, mask=col_ok)
    total = tl.sum(acc_sq, axis=0)
    if ACCUMULATE:
        total += tl.load(part_ptr + n_split * size + out, mask=col_ok, other=0.0)
    tl.store(part_ptr + n_split * size + out, total, mask=col_ok)
    total = tl.max(acc_max, axis=0)
    if ACCUMULATE:
        old_max = tl.load(part_ptr + 2 * n_split * size + out, mask=col_ok, other=0.0)
        total = tl.maximum(total, old_max)
    tl.store(part_ptr + 2 * n_split * size + out, total, mask=col_ok)
    count = tl.sum(acc_count, axis=0)
    if ACCUMULATE:
        count += tl.load(count_ptr + out, mask=col_ok, other=0)
    tl.store(count_ptr + out, count, mask=col_ok)


@triton.jit
def _finish_kernel(
    part_ptr, count_ptr, abs_ptr, sq_ptr, max_ptr, total_ptr, size, n_prog,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ZERO: tl.constexpr = False,
):  # fmt: skip
    """Add the partials of every program, in program order, into the running accumulators;
    ZERO: and set the partials to zero once read (StatsPartials' running partials). Axis 1 of
    the grid: FFNs (slots), whose partials and accumulators follow one another in memory."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < size
    slot = tl.program_id(1).to(tl.int64)
    part_ptr += slot * 3 * n_prog * size
    count_ptr += slot * n_prog * size
    abs_ptr += slot * size
    sq_ptr += slot * size
    max_ptr += slot * size
    total_ptr += slot * size
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
        if ZERO:
            zero = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            tl.store(part_ptr + offsets, zero, mask=mask)
            tl.store(part_ptr + n_prog * size + offsets, zero, mask=mask)
            tl.store(part_ptr + 2 * n_prog * size + offsets, zero, mask=mask)
            tl.store(count_ptr + offsets, zero.to(tl.int32), mask=mask)
    tl.store(abs_ptr + cols, tl.load(abs_ptr + cols, mask=col_ok) + sum_abs, mask=col_ok)
    tl.store(sq_ptr + cols, tl.load(sq_ptr + cols, mask=col_ok) + sum_sq, mask=col_ok)
    old_max = tl.load(max_ptr + cols, mask=col_ok)
    tl.store(max_ptr + cols, tl.maximum(old_max, max_abs), mask=col_ok)
    old_total = tl.load(total_ptr + cols, mask=col_ok)
    tl.store(total_ptr + cols, old_total + sum_count.to(tl.int64), mask=col_ok)


def row_pieces(size: int) -> tuple[int, int, int]:
    """Power-of-two pieces B0 >= B1 >= B2 (B1, B2 may be 0) covering a row of `size`: the two
    largest powers of two that fit, then the rest padded to a power of two. Above 8192 one padded
    piece: three pieces over 8 warps take more registers (142 vs 126 at 14336 on sm_90), halving
    the programs an SM holds."""
    if size > 8192:
        return triton.next_power_of_2(size), 0, 0
    b0 = 1 << (size.bit_length() - 1)
    rest = size - b0
    b1 = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= b1
    b2 = triton.next_power_of_2(rest) if rest else 0
    return b0, b1, b2


def row_warps(size: int) -> int:
    """Warps per row program: 1 up to I = 2048, then enough for <= 64 row elements a thread."""
    return max(1, triton.next_power_of_2(triton.cdiv(size, 32 * _ELEMENTS_PER_THREAD)))


def col_split(tokens: int, size: int, programs: int, block_t: int) -> tuple[int, int]:
    """(token splits, tokens per split: a multiple of block_t) of the column kernel, for at most
    about `programs` programs in all (more when the tokens of a split would be fewer than
    block_t). Fixed by the shape and the device (SM count, compiled registers): the summation
    order is the same from run to run."""
    splits = max(1, min(programs // triton.cdiv(size, _COL_BLOCK_C), triton.cdiv(tokens, block_t)))
    rows = triton.cdiv(triton.cdiv(tokens, splits), block_t) * block_t
    return triton.cdiv(tokens, rows), rows


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
    1 <= k <= I and fewer than 2**30 tokens.
    """
    a, plan = _prepare(a, col_norm, k)
    if plan is None:
        return
    tokens, size = a.shape
    programs, row_const, warps, col_const, splits, rows, cuts, partials, counts = plan
    _row_select_kernel[(programs,)](a, col_norm, cuts, tokens, size, a.stride(0), k, programs,
                                    **row_const, num_warps=warps)  # fmt: skip
    _col_stats_kernel[(triton.cdiv(size, _COL_BLOCK_C), splits)](
        a, col_norm, cuts, partials, counts, tokens, size, a.stride(0), rows,
        **col_const, num_warps=_COL_WARPS,
    )  # fmt: skip
    _finish(partials, counts, abs_sum, sq_sum, abs_max, topk_count, zero=False)


def _finish(
    partials: torch.Tensor,
    counts: torch.Tensor,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    abs_max: torch.Tensor,
    topk_count: torch.Tensor,
    *,
    zero: bool,
) -> None:
    """Launch `_finish_kernel`: partials [slots, 3, splits, I] and counts [slots, splits, I]
    (slots may be left out: one) into accumulators [slots, I], each row contiguous and the rows
    one after another (zero: and the partials set to zero)."""
    splits, size = counts.shape[-2:]
    slots = counts.numel() // (splits * size)
    block_c = 32
    _finish_kernel[(triton.cdiv(size, block_c), slots)](
        partials, counts, abs_sum, sq_sum, abs_max, topk_count, size, splits,
        BLOCK_P=64, BLOCK_C=block_c, ZERO=zero, num_warps=4,
    )  # fmt: skip


# Launch plans by (tokens, size, row stride, dtype, device, k, alignment): grids and scratch
# buffers, so that a hook call costs three launches and no other host work (the profiler's
# forward is otherwise host-bound on fast GPUs). The scratch buffers are reused: calls on one
# stream run in order, and each call's finish kernel has read them before the next call writes.
# Not evicted: a calibration run uses a handful of shapes (a few MB of scratch each).
_plans: dict[tuple, tuple] = {}


def _prepare(a: torch.Tensor, col_norm: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple | None]:
    """Checked, row-contiguous `a` and its launch plan (None: no tokens, nothing to launch)."""
    tokens, size = a.shape
    if not 1 <= k <= size <= MAX_SIZE or tokens >= 2**30:
        raise ValueError(f"profile stats kernel: unsupported shape {tuple(a.shape)}, k={k}")
    if tokens == 0:
        return a, None
    if a.stride(1) != 1:
        a = a.contiguous()
    key = (tokens, size, a.stride(0), a.dtype, a.device, k, a.data_ptr() % 16 == 0)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _plan(a, col_norm, k)
    return a, plan


def _plan(a: torch.Tensor, col_norm: torch.Tensor, k: int) -> tuple:
    tokens, size = a.shape
    b0, b1, b2 = row_pieces(size)
    warps = row_warps(size)
    cuts = torch.empty(2, tokens, dtype=torch.int32, device=a.device)
    row_args = (a, col_norm, cuts, tokens, size, a.stride(0), k, 2)  # n_prog: not specialized
    row_const = {"B0": b0, "B1": b1, "B2": b2, "GALLOP": _GALLOP}
    block_t = _COL_BLOCK_T if size <= _COL_LARGE_SIZE else _COL_BLOCK_T_LARGE
    col_args = (a, col_norm, cuts, col_norm, cuts, tokens, size, a.stride(0), block_t)
    col_const = {"BLOCK_T": block_t, "BLOCK_C": _COL_BLOCK_C, "WARPS": _COL_WARPS}
    if a.device.type == "cuda":
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        guess = blocks_per_sm(min(255, (b0 + b1 + b2) // (32 * warps) + 24), warps)
        resident = resident_blocks(_row_select_kernel, row_args, row_const, warps, guess)
        row_programs = _ROW_WAVES * sms * resident
        col_programs = sms * resident_blocks(_col_stats_kernel, col_args, col_const, _COL_WARPS, 4)
    else:  # the interpreter: a few programs, so the loops over rows and splits are exercised
        row_programs, col_programs = 3, 3 * triton.cdiv(size, _COL_BLOCK_C)
        col_const["BLOCK_T"] = block_t = 4
    # programs of equal row counts, about row_programs of them
    programs = triton.cdiv(tokens, triton.cdiv(tokens, row_programs))
    splits, rows = col_split(tokens, size, col_programs, block_t)
    partials = torch.empty(3, splits, size, dtype=torch.float32, device=a.device)
    counts = torch.empty(splits, size, dtype=torch.int32, device=a.device)
    return programs, row_const, warps, col_const, splits, rows, cuts, partials, counts


class StatsPartials:
    """Running per-program partials of the statistics of `slots` FFN inputs of one size (the
    profiler: one slot per FFN and calibration half).

    `add(a, col_norm, k, slot)` runs the row and column kernels with the column kernel adding into
    the slot's persistent partials (one row per program: deterministic), so a profiler hook costs
    two launches and no finish; `flush(abs_sum, sq_sum, abs_max, topk_count, first)` adds the
    partials of slots first, first + 1, ... into accumulators [n, I] (row i: slot first + i) and
    zeroes them, in one launch (`_finish_kernel`, program order). The token split is fixed by the
    first call; later calls of other lengths keep it (rows per split vary)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.partials: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.splits = 0
        self._slot_views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, a: torch.Tensor, col_norm: torch.Tensor, k: int, slot: int = 0) -> None:
        a, plan = _prepare(a, col_norm, k)
        if plan is None:
            return
        tokens, size = a.shape
        programs, row_const, warps, col_const, splits, rows, cuts, _, _ = plan
        if self.partials is None or self.partials.device != a.device:
            self.splits = splits
            shape = (self.slots, splits, size)
            self.partials = torch.zeros(self.slots, 3, splits, size, device=a.device)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=a.device)
            self._slot_views = list(zip(self.partials, self.counts, strict=True))
        partials, counts = self._slot_views[slot]
        block_t = col_const["BLOCK_T"]
        rows = triton.cdiv(triton.cdiv(tokens, self.splits), block_t) * block_t
        _row_select_kernel[(programs,)](a, col_norm, cuts, tokens, size, a.stride(0), k, programs,
                                        **row_const, num_warps=warps)  # fmt: skip
        _col_stats_kernel[(triton.cdiv(size, _COL_BLOCK_C), self.splits)](
            a, col_norm, cuts, partials, counts, tokens, size, a.stride(0), rows,
            **col_const, ACCUMULATE=True, num_warps=_COL_WARPS,
        )  # fmt: skip

    def flush(
        self,
        abs_sum: torch.Tensor,
        sq_sum: torch.Tensor,
        abs_max: torch.Tensor,
        topk_count: torch.Tensor,
        first: int = 0,
    ) -> None:
        """Add the partials of slots first .. first + n - 1 into accumulators [n, I] (or [I]:
        n = 1), whose rows are contiguous and follow one another; no-op before any `add`."""
        if self.partials is None:
            return
        n = abs_sum.shape[0] if abs_sum.dim() == 2 else 1
        last = first + n
        _finish(self.partials[first:last], self.counts[first:last], abs_sum, sq_sum, abs_max,
                topk_count, zero=True)  # fmt: skip
