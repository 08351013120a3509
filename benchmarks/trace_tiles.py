"""Where the Gluon tier's layer time goes, program by program (GPU only).

Loads a copy of ffnsplit/kernels/mma_decode.py with %globaltimer stamps added to kernel A and
kernel B (each program: 0 start, 1 end of its K-slice loop, 2 partials stored, 3 fenced, 4
ticket taken (column 7: the ticket), 5 tile finished by the last slice; column 6: the SM),
replays the layer
(A then B over two weight copies) from a CUDA graph with the default configs, and reports each
stamp's min / median / 90th percentile / max over the programs, in microseconds from the first
program of kernel A of the last call, plus the raw stamps. The copy is made by text
replacement: if mma_decode.py changed where a stamp goes, the script says which replacement no
longer applies.

    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/trace_tiles.py --out $OUT/trace.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import graph_time_us, split_weights  # noqa: E402
from bench_floor import write_result  # noqa: E402

STAMPS = ("start", "loop_end", "stored", "fenced", "ticket", "finished")

_HELPERS = """    @gluon.jit
    def _mark(tr_ptr, prog, k):
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64,
                                      is_pure=False, pack=1)
        gl.store(tr_ptr + prog * 8 + k, t)
        if k == 0:  # and the SM it runs on
            sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32,
                                           is_pure=False, pack=1)
            gl.store(tr_ptr + prog * 8 + 6, sm.to(gl.int64))

"""

# (anchor, replacement) pairs applied once each, in order
_EDITS = [
    (
        "    @gluon.jit\n    def _pdl_trigger(PDL: gl.constexpr):",
        _HELPERS + "    @gluon.jit\n    def _pdl_trigger(PDL: gl.constexpr):",
    ),
    (
        "                SB: gl.constexpr = 1):  # fmt: skip\n",
        "                SB: gl.constexpr = 1, tr_ptr=None, prog=0):  # fmt: skip\n",
    ),
    (
        '        _barrier()\n        ticket = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")\n',
        "        _barrier()\n        _mark(tr_ptr, prog, 3)\n"
        '        ticket = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")\n'
        "        _mark(tr_ptr, prog, 4)\n        gl.store(tr_ptr + prog * 8 + 7, ticket.to(gl.int64))\n",
    ),
    (
        '            gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")\n',
        '            gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")\n'
        "            _barrier()\n            _mark(tr_ptr, prog, 5)\n",
    ),
    (
        '        gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;"',
        '        _mark(tr_ptr, prog, 2)\n        gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;"',
    ),
    (
        "gz_ptr, ws_ptr,\n                   cnt_ptr, a_ptr,",
        "gz_ptr, ws_ptr,\n                   cnt_ptr, tr_ptr, a_ptr,",
    ),
    ("ws_ptr, cnt_ptr, out_ptr, b_ptr,", "ws_ptr, cnt_ptr, tr_ptr, out_ptr, b_ptr,"),
    (
        "        n_split = gl.num_programs(1)\n        chunks = gl.cdiv(K, _CHUNK)\n",
        "        n_split = gl.num_programs(1)\n        prog = pid * n_split + split\n"
        "        _mark(tr_ptr, prog, 0)\n        chunks = gl.cdiv(K, _CHUNK)\n",
    ),
    (
        "        n0 = pid * BN\n",
        "        n0 = pid * BN\n        prog = pid * gl.num_programs(1) + split\n        _mark(tr_ptr, prog, 0)\n",
    ),
    (
        "            h_cols = _columns(pid * BNH, BNH, MMA_H, False)\n",
        "            _mark(tr_ptr, prog, 1)\n            h_cols = _columns(pid * BNH, BNH, MMA_H, False)\n",
    ),
    (
        "            l_cols = _columns(l0, BN, MMA, SWAP)\n",
        "            _mark(tr_ptr, prog, 1)\n            l_cols = _columns(l0, BN, MMA, SWAP)\n",
    ),
    (
        "            cols = _columns(n0, BN, MMA, SWAP)\n            _store_partial(ws_ptr, acc, split",
        "            _mark(tr_ptr, prog, 1)\n            cols = _columns(n0, BN, MMA, SWAP)\n"
        "            _store_partial(ws_ptr, acc, split",
    ),
    ("*light, ws, counters, a,", '*light, ws, counters, TRACE["A"], a,'),
    ("*packed, ws, counters, out,", '*packed, ws, counters, TRACE["B"], out,'),
    ("_up_tuner = Tuner()\n", "TRACE = {}\n_up_tuner = Tuner()\n"),
]


def traced_module() -> types.ModuleType:
    """mma_decode with the stamps, registered under its own name (split_ffn and quant_matmul
    then import it)."""
    src = (ROOT / "ffnsplit" / "kernels" / "mma_decode.py").read_text()
    for anchor, new in _EDITS:
        if src.count(anchor) != 1:
            raise SystemExit(
                f"trace_tiles: mma_decode.py changed, this no longer applies: {anchor!r}"
            )
        src = src.replace(anchor, new)
    # every _arrive call passes its stamps
    out, i = [], 0
    while (j := src.find("_arrive(cnt_ptr", i)) >= 0:
        if src[j - 4 : j] == "def ":  # the definition itself
            out.append(src[i : j + 1])
            i = j + 1
            continue
        depth, k = 0, src.index("(", j)
        while True:
            depth += {"(": 1, ")": -1}.get(src[k], 0)
            if depth == 0:
                break
            k += 1
        out.append(src[i:k] + ", tr_ptr=tr_ptr, prog=prog")
        i = k
    src = "".join(out) + src[i:]
    path = Path(tempfile.mkdtemp(prefix="ffnsplit-trace-")) / "mma_decode_traced.py"
    path.write_text(src)  # Triton's JIT reads a kernel's source from its file
    module = types.ModuleType("ffnsplit.kernels.mma_decode")
    module.__file__ = str(path)
    sys.modules["ffnsplit.kernels.mma_decode"] = module
    exec(compile(src, str(path), "exec"), module.__dict__)  # noqa: S102
    return module


def summary(rows: list[list[int]], t0: int) -> dict:
    """Each stamp's min, median, 90th percentile and max in us from t0 (programs that have it)."""
    out = {}
    for col, name in enumerate(STAMPS):
        v = sorted((r[col] - t0) / 1e3 for r in rows if r[col] > 0)
        if v:
            out[name] = [round(v[0], 2), round(v[len(v) // 2], 2),
                         round(v[int(len(v) * 0.9)], 2), round(v[-1], 2)]  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,4")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "trace.json"))
    args = parser.parse_args()
    md = traced_module()
    from ffnsplit.kernels import split_ffn as sffn

    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    results = []
    for m in (int(v) for v in args.m.split(",")):
        md.TRACE["A"] = torch.zeros(8 * 4096, dtype=torch.int64, device="cuda")
        md.TRACE["B"] = torch.zeros(8 * 4096, dtype=torch.int64, device="cuda")
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        calls = [lambda w=w, x=x: sffn.split_ffn(x, w, path="mma") for w in copies]
        layer = graph_time_us(calls)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                for call in calls:
                    call()
        graph.replay()
        for t in md.TRACE.values():
            t.zero_()
        graph.replay()  # the stamps of the last call's kernel A and kernel B remain
        torch.cuda.synchronize()
        raw = {}
        for kernel in ("A", "B"):
            tr = md.TRACE[kernel].view(-1, 8).cpu()
            raw[kernel] = tr[tr[:, 0] > 0].tolist()
        t0 = min(r[0] for r in raw["A"])
        row = dict(m=m, layer_us=layer, A=summary(raw["A"], t0), B=summary(raw["B"], t0), raw=raw)
        for kernel in ("A", "B"):  # how many programs each SM ran: {programs: SMs}
            per_sm = Counter(Counter(r[6] for r in raw[kernel]).values())
            row[f"{kernel}_programs_per_sm"] = dict(sorted(per_sm.items()))
        results.append(row)
        print(f"M = {m}: layer {layer:.2f} us", {k: row[k] for k in ("A", "B")}, flush=True)
    write_result(args.out, torch.device("cuda"), stamps=list(STAMPS), rows=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
