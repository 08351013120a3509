"""The Hopper wgmma int4 GEMM prototype (benchmarks/proto_wgmma.py) on a GPU: correctness against an
fp64 reference on odd shapes, then the Llama-3-8B FFN's light parts at prefill sizes against the
tl tiers' kernels on the same split layer and cuBLAS on dense weights of the same shape.

    PYTHONPATH=. python3 benchmarks/bench_wgmma.py --out $OUT/wgmma.json
    FFNSPLIT_WGMMA_EXPERIMENT=3 PYTHONPATH=. python3 benchmarks/bench_wgmma.py --no-check \
        --only-wg --m 256,2048       # timing experiments (proto_wgmma.EXPERIMENT)

Correctness: rel. error ||out - ref|| / ||ref|| per case (fp16 and bf16, dual and single weight,
groups 64/128/256, symmetric or not, M and N off the tile sizes, K with a partial last group).
Timing: CUDA-graph replays over two weight copies (L2 cannot hold them), median of 15 replays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import proto_wgmma as wg  # noqa: E402
from bench_decode import graph_time_us, rel_err, split_weights  # noqa: E402

from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.format import (  # noqa: E402
    QuantizedWeight,
    n_groups,
    pack_planes,
    unpack_planes,
)


def dequant(w: QuantizedWeight) -> torch.Tensor:
    """W [N, K] in fp64 from the packed format."""
    n, k = w.shape
    q = unpack_planes(w.planes, w.bits, k).double()
    s = w.scales.double().repeat_interleave(w.group_size, 0)[:k].t()
    if w.zeros is None:
        z = float(2 ** (w.bits - 1))
    else:
        z = w.zeros.double().repeat_interleave(w.group_size, 0)[:k].t()
    return (q - z) * s


def qweight(n: int, k: int, group: int, symmetric: bool, dtype: torch.dtype) -> QuantizedWeight:
    q = torch.randint(0, 16, (n, k), device="cuda")
    g = n_groups(k, group)
    scales = ((torch.rand(g, n, device="cuda") + 0.5) * 2e-2).to(dtype)
    zeros = None if symmetric else (torch.rand(g, n, device="cuda") * 15).to(dtype)
    return QuantizedWeight(pack_planes(q, 4), scales, zeros, 4, group, (n, k))


def check(results: list, only_tma: bool = False) -> bool:
    ok = True
    cases = [  # (M, N, K, group, symmetric, dual, bt, split[, x_resident])
        (77, 1000, 4160, 128, False, True, 128, 1),
        (256, 1000, 4160, 64, False, True, 128, 1),
        (300, 520, 1088, 256, True, True, 128, 1),
        (129, 4096, 13632, 128, False, False, 128, 1),
        (256, 1000, 4160, 128, False, False, 128, 2),
        (33, 776, 2112, 128, True, False, 64, 1),
        (200, 1000, 4160, 128, False, True, 64, 1),
        (13, 1000, 4160, 128, False, True, 16, 1),  # decode / mid sizes
        (21, 520, 4160, 128, False, False, 32, 4),
        (9, 776, 2112, 64, True, False, 16, 3),
    ]
    cases = [(*c, False) for c in cases] + [  # x resident in shared memory (decode / mid sizes)
        (13, 1000, 4160, 128, False, True, 16, 1, True),
        (21, 520, 4160, 128, False, False, 32, 4, True),
        (9, 776, 2112, 64, True, False, 16, 3, True),
        (50, 1000, 13632, 128, False, False, 64, 16, True),
    ]
    tma_cases = [  # x by TMA (4 warps), x_resident set to "tma"
        (77, 1000, 4160, 128, False, True, 128, 1, "tma"),
        (300, 520, 1088, 256, True, True, 128, 1, "tma"),
        (129, 1000, 13632, 128, False, False, 128, 3, "tma"),
        (33, 776, 2112, 64, True, False, 64, 1, "tma"),
    ]
    cases = tma_cases if only_tma else cases + tma_cases
    for dtype, bound in ((torch.float16, 2e-3), (torch.bfloat16, 1.2e-2)):
        for m, n, k, group, sym, dual, bt, split, xres in cases:
            torch.manual_seed(m + n)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = qweight(n, k, group, sym, dtype)
            g = qweight(n, k, group, sym, dtype) if dual else None
            ub = torch.randn(n, device="cuda", dtype=dtype) * 0.1
            gb = torch.randn(n, device="cuda", dtype=dtype) * 0.1 if dual else None
            out = torch.full((m, n + 24), float("nan"), device="cuda", dtype=dtype)
            try:
                wg.light_gemm(x, w, out, out_col=8, gate=g, up_bias=ub, gate_bias=gb, bt=bt,
                              split=split, x_resident=xres is True, x_tma=xres == "tma",
                              num_warps=4 if xres == "tma" else 8)  # fmt: skip
                torch.cuda.synchronize()
                up = x.double() @ dequant(w).t() + ub.double()
                if dual:
                    gate = x.double() @ dequant(g).t() + gb.double()
                    ref = torch.nn.functional.silu(gate) * up
                else:
                    ref = up
                err = rel_err(out[:, 8 : 8 + n], ref)
                untouched = bool(out[:, :8].isnan().all() and out[:, 8 + n :].isnan().all())
                good = err < bound and untouched
            except Exception as exc:  # report and go on: one call tests every case
                err, untouched, good = repr(exc)[:300], False, False
            ok &= good
            row = dict(dtype=str(dtype), m=m, n=n, k=k, group=group, symmetric=sym, dual=dual,
                       bt=bt, split=split, x_resident=xres, rel_err=err, bound=bound, untouched=untouched,
                       ok=good)  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    if only_tma:
        ok &= check_kernel_a(results)
    return ok


def check_kernel_a(results: list, variants=((4, 128, 0),)) -> bool:
    """proto_wgmma.kernel_a (heavy and light tiles in one launch) against float64 on odd shapes:
    heavy counts off the 64-neuron tiles, M off the 128-row tiles, K with a partial step; each
    (num_warps, bt, words-ring stages) of `variants`."""
    ok = True
    cases = [(dtype, bound, m, hidden, heavy, light, nw, bt, ring)
             for dtype, bound in ((torch.float16, 2e-3), (torch.bfloat16, 1.2e-2))
             for m, hidden, heavy, light in ((77, 4160, 77, 1024), (300, 1088, 200, 544),
                                             (129, 4096, 720, 13632))
             for nw, bt, ring in variants]  # fmt: skip
    for dtype, bound, m, hidden, heavy, light, nw, bt, ring in cases:
        torch.manual_seed(m + heavy)
        w = split_weights(hidden, heavy, light, 4, 128)
        if dtype != torch.float16:
            w = replace(w, heavy_up=w.heavy_up.to(dtype), heavy_gate=w.heavy_gate.to(dtype),
                        heavy_down=w.heavy_down.to(dtype))  # fmt: skip
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        out = torch.full((m, heavy + light), float("nan"), device="cuda", dtype=dtype)
        try:
            wg.kernel_a(x, w, out, bt=bt, num_warps=nw, ring=ring)
            torch.cuda.synchronize()
            up = x.double() @ torch.cat([w.heavy_up.double(), dequant(w.light_up)]).t()
            gate = x.double() @ torch.cat([w.heavy_gate.double(), dequant(w.light_gate)]).t()
            err = rel_err(out, torch.nn.functional.silu(gate) * up)
            good = err < bound
        except Exception as exc:  # report and go on
            err, good = repr(exc)[:300], False
        ok &= good
        row = dict(kernel="kernel_a", dtype=str(dtype), m=m, hidden=hidden, heavy=heavy,
                   light=light, num_warps=nw, bt=bt, ring=ring, rel_err=err, bound=bound,
                   ok=good)  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
    return ok


def _t(calls) -> float | str:
    """Median us of one call from CUDA-graph replays of `calls`, or the error (a config that does
    not fit: reported, and the run goes on)."""
    try:
        return round(graph_time_us(calls), 2)
    except Exception as exc:
        return repr(exc)[:200]


def _inputs(m: int, hidden: int, heavy: int, light: int, a_cols: int) -> tuple:
    """x [m, hidden], kernel B's input a [m, heavy + light], outputs [m, a_cols] and [m, hidden]."""
    x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
    a = torch.randn(m, heavy + light, device="cuda", dtype=torch.float16) * 0.1
    out_a = torch.empty(m, a_cols, device="cuda", dtype=torch.float16)
    out_b = torch.empty(m, hidden, device="cuda", dtype=torch.float16)
    return x, a, out_a, out_b


def _dense(hidden: int, inter: int) -> tuple[list, list]:
    """Two copies of dense up+gate [2 inter, hidden] and down [hidden, inter] weights (fp16)."""
    up = [torch.randn(2 * inter, hidden, device="cuda", dtype=torch.float16) / 64
          for _ in range(2)]  # fmt: skip
    down = [torch.randn(hidden, inter, device="cuda", dtype=torch.float16) / 120
            for _ in range(2)]  # fmt: skip
    return up, down


def timing(ms: list[int], results: list, hidden: int = 4096, inter: int = 14336,
           heavy: int = 720, only_wg: bool = False) -> None:  # fmt: skip
    light = 13632  # the bench's split: 720 heavy fp16 + 13,632 int4 neurons (padded to 32)
    ws = [split_weights(hidden, heavy, light, 4, 128) for _ in range(2)]
    dense_up, dense_down = _dense(hidden, inter)
    t = _t
    for m in ms:
        x, a, out_a, out_b = _inputs(m, hidden, heavy, light, heavy + light)
        ad = torch.randn(m, inter, device="cuda", dtype=torch.float16) * 0.1
        row = dict(m=m)

        def calls(fn, *args):  # one call per weight copy, its arguments bound now
            return [lambda w=w, args=args: fn(w, *args) for w in ws]

        if not only_wg:
            row["dense_up_gate_us"] = t([lambda w=w, x=x: x @ w.t() for w in dense_up])
            row["dense_down_us"] = t([lambda w=w, ad=ad: ad @ w.t() for w in dense_down])
            row["tl_kernel_a_us"] = t(calls(lambda w, x: sffn.split_activations(x, w), x))
            row["tl_kernel_b_us"] = t(calls(
                lambda w, a: qmm.split_linear(a, w.heavy_down, w.light_down, None), a))  # fmt: skip
        for bt in (128, 64):
            row[f"wg_a_light_bt{bt}_us"] = t(calls(
                lambda w, x, out, bt: wg.light_gemm(x, w.light_up, out, out_col=heavy,
                                                    gate=w.light_gate, bt=bt),
                x, out_a, bt))  # fmt: skip
        for bt, split in ((128, 1), (128, 2), (128, 4), (64, 2)):
            row[f"wg_b_light_bt{bt}_s{split}_us"] = t(calls(
                lambda w, a, out, bt, split: wg.light_gemm(a[:, heavy:], w.light_down, out, bt=bt,
                                                           split=split),
                a, out_b, bt, split))  # fmt: skip
        if only_wg:
            results.append(row)
            print(json.dumps(row), flush=True)
            continue
        row["cublas_heavy_a_us"] = t(calls(
            lambda w, x: x @ torch.cat([w.heavy_up, w.heavy_gate]).t(), x))  # fmt: skip
        row["cublas_heavy_b_us"] = t(calls(lambda w, a: a[:, :heavy] @ w.heavy_down.t(), a))
        results.append(row)
        print(json.dumps(row), flush=True)


def tma_timing(ms: list[int], results: list, hidden: int = 4096, heavy: int = 720) -> None:
    """x by TMA (proto_wgmma's x_tma, x permuted by torch inside the call) against the
    register-staged form, the tl tiers and cuBLAS, at prefill sizes."""
    light = 13632
    ws = [split_weights(hidden, heavy, light, 4, 128) for _ in range(2)]
    dense_up, dense_down = _dense(hidden, 14336)
    for m in ms:
        results.append(_tma_row(m, ws, dense_up, dense_down, hidden, heavy, light))
        print(json.dumps(results[-1]), flush=True)


def _tma_row(m, ws, dense_up, dense_down, hidden, heavy, light) -> dict:
    """One M of tma_timing."""
    x, a, out_a, out_b = _inputs(m, hidden, heavy, light, heavy + light)
    ad = torch.randn(m, 14336, device="cuda", dtype=torch.float16) * 0.1
    row = dict(m=m)
    t = _t

    row["dense_up_gate_us"] = t([lambda w=w: x @ w.t() for w in dense_up])
    row["dense_down_us"] = t([lambda w=w: ad @ w.t() for w in dense_down])
    row["tl_kernel_a_us"] = t([lambda w=w: sffn.split_activations(x, w) for w in ws])
    row["tl_kernel_b_us"] = t(
        [lambda w=w: qmm.split_linear(a, w.heavy_down, w.light_down, None) for w in ws]
    )
    row["wg_a_staged_us"] = t([
        lambda w=w: wg.light_gemm(x, w.light_up, out_a, out_col=heavy, gate=w.light_gate)
        for w in ws])  # fmt: skip
    row["wg_kernel_a_us"] = t([lambda w=w: wg.kernel_a(x, w, out_a) for w in ws])
    row["wg_a_tma_us"] = t([
        lambda w=w: wg.light_gemm(x, w.light_up, out_a, out_col=heavy, gate=w.light_gate,
                                  num_warps=4, x_tma=True) for w in ws])  # fmt: skip
    for split in (1, 2, 4):
        row[f"wg_b_staged_s{split}_us"] = t([
            lambda w=w, split=split: wg.light_gemm(a[:, heavy:], w.light_down, out_b,
                                                   split=split) for w in ws])  # fmt: skip
        row[f"wg_b_tma_s{split}_us"] = t([
            lambda w=w, split=split: wg.light_gemm(a[:, heavy:], w.light_down, out_b,
                                                   split=split, num_warps=4, x_tma=True)
            for w in ws])  # fmt: skip
    return row


# (num_warps, bt, words-ring stages); session 25's first run: 8 warps and 64-row tiles slower
KA_VARIANTS = ((4, 128, 0), (4, 128, 3), (4, 128, 4), (4, 128, 6), (4, 128, 8))
KA_CHECKS = ((4, 128, 0), (4, 128, 3), (4, 128, 4), (4, 128, 8))


def ka_timing(ms: list[int], results: list, hidden: int = 4096, heavy: int = 720) -> None:
    """proto_wgmma.kernel_a per (num_warps, bt, ring) of KA_VARIANTS against the tl kernel A and
    cuBLAS's dense up+gate, at prefill sizes."""
    light = 13632
    ws = [split_weights(hidden, heavy, light, 4, 128) for _ in range(2)]
    dense_up, _ = _dense(hidden, 14336)
    for m in ms:
        results.append(_ka_row(m, ws, dense_up, hidden, heavy, light))
        print(json.dumps(results[-1]), flush=True)


def _ka_row(m, ws, dense_up, hidden, heavy, light) -> dict:
    """One M of ka_timing."""
    x, _, out_a, _ = _inputs(m, hidden, heavy, light, heavy + light)
    row = dict(m=m)
    row["dense_up_gate_us"] = _t([lambda w=w: x @ w.t() for w in dense_up])
    row["tl_kernel_a_us"] = _t([lambda w=w: sffn.split_activations(x, w) for w in ws])
    for nw, bt, ring in KA_VARIANTS:
        row[f"wg_kernel_a_nw{nw}_bt{bt}_r{ring}_us"] = _t(
            [lambda w=w, nw=nw, bt=bt, ring=ring: wg.kernel_a(x, w, out_a, bt=bt, num_warps=nw,
                                                              ring=ring)
             for w in ws])  # fmt: skip
    return row


def stacked(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    """up and gate as one weight [2N, K] (the same bytes as kernel A's light part, timed as one
    single-weight product: no activation)."""
    zeros = None if a.zeros is None else torch.cat([a.zeros, b.zeros], 1)
    return QuantizedWeight([torch.cat([a.planes[0], b.planes[0]], 1)],
                           torch.cat([a.scales, b.scales], 1), zeros, a.bits, a.group_size,
                           (a.shape[0] + b.shape[0], a.shape[1]))  # fmt: skip


def mid_timing(ms: list[int], results: list, hidden: int = 4096, heavy: int = 720) -> None:
    """Decode and mid sizes (M = 8-128): the prototype's light parts in K-slices (partials
    written, not summed: the kernel alone) against the tiers' whole kernels A and B (heavy
    included) and cuBLAS's heavy parts."""
    light = 13632
    ws = [split_weights(hidden, heavy, light, 4, 128) for _ in range(2)]
    ups = [stacked(w.light_up, w.light_gate) for w in ws]
    for m in ms:
        results.append(_mid_row(m, ws, ups, hidden, heavy, light))
        print(json.dumps(results[-1]), flush=True)


def _mid_row(m: int, ws: list, ups: list, hidden: int, heavy: int, light: int) -> dict:
    """One M of mid_timing."""
    x, a, out_a, out_b = _inputs(m, hidden, heavy, light, 2 * light)
    row = dict(m=m)
    t = _t

    row["tier_kernel_a_us"] = t([lambda w=w: sffn.split_activations(x, w) for w in ws])
    row["tier_kernel_b_us"] = t(
        [lambda w=w: qmm.split_linear(a, w.heavy_down, w.light_down, None) for w in ws]
    )
    row["cublas_heavy_a_us"] = t(
        [lambda w=w: x @ torch.cat([w.heavy_up, w.heavy_gate]).t() for w in ws]
    )
    row["cublas_heavy_b_us"] = t([lambda w=w: a[:, :heavy] @ w.heavy_down.t() for w in ws])
    bt = max(16, triton_pow2(m))
    # x_resident: the slice's x staged once in shared memory (no restaging a step); the
    # slices that fit (others fail to launch and are reported as such)
    for nw in (4, 8):
        row[f"wg_a_dual_xres_nw{nw}_us"] = t([
            lambda w=w, nw=nw: wg.light_gemm(x, w.light_up, out_a, gate=w.light_gate, bt=bt,
                                             num_warps=nw, x_resident=True)
            for w in ws])  # fmt: skip
        for split in (2, 4, 8):
            row[f"wg_a_stack_xres_nw{nw}_s{split}_us"] = t([
                lambda u=u, nw=nw, split=split: wg.light_gemm(
                    x, u, out_a, bt=bt, num_warps=nw, split=split, reduce=False,
                    x_resident=True) for u in ups])  # fmt: skip
        for split in (4, 8, 16):
            row[f"wg_b_xres_nw{nw}_s{split}_us"] = t([
                lambda w=w, nw=nw, split=split: wg.light_gemm(
                    a[:, heavy:], w.light_down, out_b, bt=bt, num_warps=nw, split=split,
                    reduce=False, x_resident=True) for w in ws])  # fmt: skip
    return row


def triton_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="128,256,512,1024,2048")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--only-wg", action="store_true", help="time the wgmma kernels only")
    parser.add_argument(
        "--mid", default=None, help="decode / mid sizes instead, e.g. 16,32,64,128 (mid_timing)"
    )
    parser.add_argument("--tma", default=None,
                        help="x by TMA: its checks only, then these M (tma_timing), e.g. 256")  # fmt: skip
    parser.add_argument(
        "--ka",
        default=None,
        help="kernel_a per (num_warps, bt, ring): its checks, then these M, e.g. 256",
    )
    args = parser.parse_args()
    if not wg.available(torch.device("cuda")):
        print(f"wgmma path unavailable here: {wg._IMPORT_ERROR}", file=sys.stderr)
        return 2
    checks, times = [], []
    if args.ka:
        ok = True if args.no_check else check_kernel_a(checks, KA_CHECKS)
    else:
        ok = True if args.no_check else check(checks, only_tma=args.tma is not None)
    print("checks:", "ok" if ok else "FAILED", flush=True)
    if args.ka:
        ka_timing([int(v) for v in args.ka.split(",")], times)
    elif args.tma:
        tma_timing([int(v) for v in args.tma.split(",")], times)
    elif args.mid:
        mid_timing([int(v) for v in args.mid.split(",")], times)
    else:
        timing([int(v) for v in args.m.split(",")], times, only_wg=args.only_wg)
    if args.out:
        payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       checks=checks, times=times)  # fmt: skip
        with open(args.out, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
