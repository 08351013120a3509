"""Compile a Triton kernel ahead of time for a GPU this machine does not have; print its resources.

Runs Triton's own pipeline (with its bundled ptxas) for a target such as sm_90 without a GPU or a
driver, then prints registers per thread, spill bytes, shared memory, the SASS instruction count by
opcode, and the same for every loop of the SASS (a backward branch and its target; for an outer
loop, the instructions outside its inner loops): with the trip counts of the loops this gives an
instruction estimate per unit of work.

    python benchmarks/aot_sass.py --list                      # the built-in kernels
    python benchmarks/aot_sass.py profile-row                 # one of them
    python benchmarks/aot_sass.py profile-col a_ptr='*fp16'   # one, an argument changed
    python benchmarks/aot_sass.py ffnsplit.kernels.profile_stats:_finish_kernel \\
        part_ptr='*fp32' count_ptr='*i32' abs_ptr='*fp32' sq_ptr='*fp32' max_ptr='*fp32' \\
        total_ptr='*i64' size=1536 n_prog=128 BLOCK_P=64 BLOCK_C=32 --warps 4

Arguments are NAME=VALUE for every kernel parameter: a pointer as '*DTYPE' (fp32, bf16, fp16, i32,
i64, ...; 16-byte aligned like a torch allocation, '*DTYPE:u' for unaligned), an integer argument as
an example value (specialized like the runtime does: divisible by 16, or equal to 1) or as a type
(i32, i64: no specialization), a constexpr parameter as its value (int, float, True/False or a
Triton dtype name like tl.float16). --sass/--ptx/--ttgir DIR write the listings there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# A fresh cache (so ptxas runs and its report is seen) and the compiler, not the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_sass_")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of Triton <= 3.9
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ffnsplit.kernels.tiles import ptxas_log  # noqa: E402

_PROFILE = "ffnsplit.kernels.profile_stats"
_ROW_ARGS = "a_ptr=*bf16 c_ptr=*fp32 cut_ptr=*i32 T=16384 size={size} stride_t={size} k={k} "
_ROW_ARGS += "n_prog=3277 B0={b0} B1={b1} B2={b2} GALLOP=16777216"
_COL_ARGS = "a_ptr=*bf16 c_ptr=*fp32 cut_ptr=*i32 part_ptr=*fp32 count_ptr=*i32 T=16384 "
_COL_ARGS += (
    "size=1536 stride_t=1536 rows_per_split=192 BLOCK_T=16 BLOCK_C=256 WARPS=4 ACCUMULATE=True"
)
_FINISH_ARGS = "part_ptr=*fp32 count_ptr=*i32 abs_ptr=*fp32 sq_ptr=*fp32 max_ptr=*fp32 "
_FINISH_ARGS += "total_ptr=*i64 size=1536 n_prog=86 BLOCK_P=64 BLOCK_C=32 ZERO=True"


_GEMV = "ffnsplit.kernels.gemv:_gemv_kernel"
# Llama-3-8B FFN at M = 1: kernel A (up/gate: 720 dense rows + 13,632 int4 g128 columns, K 4096)
# and kernel B (down: 4096 outputs, K = 720 dense + 13,632 int4), as launched by default
_GEMV_ARGS = (
    "x_ptr=*fp16 dw0_ptr=*fp16 dw1_ptr=*fp16 p0_ptr=*i32 p1_ptr=*i32 s_ptr=*fp16 z_ptr=*fp16 "
    "q0_ptr=*i32 q1_ptr=*i32 t_ptr=*fp16 u_ptr=*fp16 ws_ptr=*fp32 cnt_ptr=*i32 out_ptr=*fp16 "
    "ub_ptr=*fp16 gb_ptr=*fp16 M=i32 stride_xm={sx} ND={nd} KD={kd} stride_dw={kd} XD=0 OD=0 "
    "SD=i32 RD=i32 NL={nl} KL={kl} XL={xl} OL={ol} SL=i32 SLOT_L=i32 NOUT={nout} "
    "ONE=i32 NFT=i32 stride_om={nout} BITS=4 GROUP=128 SYMMETRIC=False DUAL={dual} BM=1 "
    "BLOCK_N=256 BLOCK_ND=2 BLOCK_KD=256 FAST=True FUSED={ka} KA={ka} ACTIVATION=silu "
    "HAS_UP_BIAS=False HAS_GATE_BIAS=False BLOCK_S=8 PDL=True ATOMIC=False XVEC=True"
)


def _gemv_args(sx: int, nd: int, kd: int, nl: int, kl: int, xl: int, ol: int, nout: int, *,
               kernel_a: bool) -> str:  # fmt: skip
    """_GEMV_ARGS for x row stride sx, dense [nd, kd], light [kl, nl] read from x[:, xl:],
    light columns written from ol, nout outputs; kernel A (up/gate, gated) or B (down)."""
    return _GEMV_ARGS.format(sx=sx, nd=nd, kd=kd, nl=nl, kl=kl, xl=xl, ol=ol, nout=nout,
                             dual=kernel_a, ka=kernel_a)  # fmt: skip


def _row(size: int) -> tuple[str, str, int]:
    """The row kernel as accumulate_stats launches it for intermediate size `size`, k = 5%."""
    from ffnsplit.kernels.profile_stats import row_pieces, row_warps

    b0, b1, b2 = row_pieces(size)
    args = _ROW_ARGS.format(size=size, k=-(-size // 20), b0=b0, b1=b1, b2=b2)
    return f"{_PROFILE}:_row_select_kernel", args, row_warps(size)


# name -> (module:function, arguments, num_warps): the launches of profile_stats.accumulate_stats
# for T = 16,384 bf16 tokens on a 132-SM GPU; NAME=VALUE arguments after a preset override it.
PRESETS: dict[str, tuple[str, str, int]] = {
    "profile-row": _row(1536),  # SmolLM2-135M
    **{
        f"profile-row-{size}": _row(size)
        # 2560 SmolLM2-360M, 5632 TinyLlama, 8192 Llama-3.2-1B, 14336 Llama-3-8B, 16384 MAX_SIZE
        for size in (2048, 2560, 4096, 5632, 8192, 14336, 16384)
    },
    "profile-row-32768": (  # above MAX_SIZE: spills, not launched
        f"{_PROFILE}:_row_select_kernel",
        _ROW_ARGS.format(size=32768, k=1639, b0=32768, b1=0, b2=0),
        16,
    ),
    "profile-col": (f"{_PROFILE}:_col_stats_kernel", _COL_ARGS, 4),
    "profile-finish": (f"{_PROFILE}:_finish_kernel", _FINISH_ARGS, 4),
    "gemv-a": (_GEMV, _gemv_args(4096, 720, 4096, 13632, 4096, 0, 720, 14336, kernel_a=True), 2),
    "gemv-b": (_GEMV, _gemv_args(14336, 4096, 720, 4096, 13632, 720, 0, 4096, kernel_a=False), 2),
}


def _load(spec: str) -> triton.runtime.JITFunction:
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, triton.runtime.JITFunction):  # autotuners, heuristics
        fn = fn.fn
    return fn


def _constexpr(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text.startswith("tl."):
        return getattr(tl, text[3:])
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text  # a string constexpr (an activation name)


def build_source(fn: triton.runtime.JITFunction, values: dict[str, str]) -> ASTSource:
    """The ASTSource the runtime would build for a launch with these arguments."""
    missing = [p.name for p in fn.params if p.name not in values]
    unknown = sorted(set(values) - {p.name for p in fn.params})
    if missing or unknown:
        raise SystemExit(f"missing arguments {missing}, unknown {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        text = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = _constexpr(text)
        elif text.startswith("*"):
            dtype, _, flag = text.partition(":")
            signature[param.name] = dtype
            if flag != "u":
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif re.fullmatch(r"-?\d+", text):
            value = int(text)
            if param.do_not_specialize:
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif value == 1:  # the runtime makes an argument equal to 1 a constant
                signature[param.name] = "constexpr"
                constexprs[param.name] = 1
            else:
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = text
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_kernel(
    fn: triton.runtime.JITFunction,
    values: dict[str, str],
    warps: int,
    stages: int,
    arch: int,
    maxnreg: int | None = None,
) -> tuple[object, str]:
    """(compiled kernel, ptxas report: Triton's own ptxas run when it prints its log, else
    ptxas -v run here on the kernel's PTX)."""
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    with contextlib.suppress(AttributeError):
        triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            build_source(fn, values), target=GPUTarget("cuda", arch, 32), options=options
        )
    report = log.getvalue()
    if "registers" not in report:
        report = ptxas_log(kernel.asm["ptx"], arch)
    return kernel, report


_BRANCH = re.compile(r"BRA\S*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin (the raw listing, with addresses)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.check_output(
            [triton.knobs.nvidia.cuobjdump.path, "-sass", file.name], text=True
        )


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of every instruction; the opcode without predicate or modifiers."""
    rows = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if not match:
            continue
        text = match.group(2)
        words = text.split()
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        rows.append((int(match.group(1), 16), op.split(".")[0], text))
    return rows


def find_loops(rows: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop: a backward branch and its target."""
    index_of = {address: i for i, (address, _, _) in enumerate(rows)}
    loops = set()
    for i, (address, op, text) in enumerate(rows):
        match = _BRANCH.search(text) if op == "BRA" else None
        if match and int(match.group(1), 16) < address:
            start = index_of.get(int(match.group(1), 16))
            if start is not None:
                loops.add((start, i))
    return sorted(loops)


def _ops(rows: list[tuple[int, str, str]], top: int = 0) -> str:
    counts = Counter(op for _, op, _ in rows if op != "NOP")
    items = counts.most_common(top or None)
    return " ".join(f"{op}:{n}" for op, n in items)


def report(name: str, kernel, log: str, warps: int) -> None:
    rows = parse_sass(disassemble(kernel.asm["cubin"]))
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    n_regs = int(regs[-1]) if regs else None
    print(f"== {name}: num_warps={warps}, target sm_{kernel.metadata.target.arch}")
    print(
        f"registers/thread: {n_regs}, spill stores/loads: "
        f"{'/'.join(spills[-1]) if spills else '?'} bytes, stack: {stack[-1] if stack else '?'} "
        f"bytes, shared: {kernel.metadata.shared} bytes"
    )
    if n_regs:
        per_warp = 32 * ((n_regs + 7) // 8 * 8)
        blocks = min(32, 65536 // (per_warp * warps), 64 // warps)
        print(f"resident per SM (registers, 64 warps, 32 blocks): {blocks} blocks = "
              f"{blocks * warps} warps")  # fmt: skip
    print(f"SASS instructions: {sum(op != 'NOP' for _, op, _ in rows)}")
    print(f"  by opcode: {_ops(rows)}")
    loops = find_loops(rows)
    for start, end in loops:
        inner = [(s, e) for s, e in loops if start <= s and e <= end and (s, e) != (start, end)]
        own = [
            row
            for i, row in enumerate(rows[start : end + 1], start)
            if not any(s <= i <= e for s, e in inner)
        ]
        label = f"loop 0x{rows[start][0]:04x}-0x{rows[end][0]:04x}"
        print(
            f"{label}: {sum(op != 'NOP' for _, op, _ in rows[start : end + 1])} instructions"
            + (f", {sum(op != 'NOP' for _, op, _ in own)} outside its {len(inner)} inner loop(s)"
               if inner else " (innermost)")
        )  # fmt: skip
        print(f"  by opcode{' (outside inner loops)' if inner else ''}: {_ops(own)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", nargs="?", help="a preset name or module:function")
    parser.add_argument("args", nargs="*", help="NAME=VALUE for each kernel parameter")
    parser.add_argument("--warps", type=int, help="num_warps (a preset has its own)")
    parser.add_argument("--stages", type=int, default=3, help="num_stages (default 3)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--maxnreg", type=int, help="register cap per thread (launch option)")
    parser.add_argument("--list", action="store_true", help="list the presets")
    for kind in ("sass", "ptx", "ttgir"):
        parser.add_argument(f"--{kind}", metavar="DIR", help=f"write the {kind} listing to DIR")
    args = parser.parse_args()
    if args.list or not args.kernel:
        for name, (spec, values, warps) in PRESETS.items():
            print(f"{name}: {spec} num_warps={warps}\n    {values}")
        return
    if args.kernel in PRESETS:
        spec, text, warps = PRESETS[args.kernel]
        pairs = text.split() + args.args
    else:
        spec, pairs, warps = args.kernel, args.args, 4
    warps = args.warps or warps
    values = dict(pair.split("=", 1) for pair in pairs)
    kernel, log = compile_kernel(_load(spec), values, warps, args.stages, args.arch, args.maxnreg)
    report(args.kernel, kernel, log, warps)
    for kind in ("sass", "ptx", "ttgir"):
        folder = getattr(args, kind)
        if folder:
            path = Path(folder) / f"{args.kernel.replace(':', '.')}.{kind}"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = disassemble(kernel.asm["cubin"]) if kind == "sass" else kernel.asm[kind]
            path.write_text(text)
            print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:  # ptxas or cuobjdump
        raise SystemExit(f"{exc.cmd[0]} failed: {exc}") from None
    except BrokenPipeError:  # output piped into head
        sys.stderr.close()
