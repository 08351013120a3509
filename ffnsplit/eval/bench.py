"""`ffnsplit bench`: FFN-layer latency and end-to-end prefill / decode throughput.

Layer bench: one FFN layer (a `--shape HxI` with random weights, or every distinct layer layout of
a compressed folder) for every M (rows of x = tokens per call), as
  dense       three fp16 matmuls + act(gate) * up through torch (cuBLAS)
  torch_int4  the same with torch.ops.aten._weight_int4pack_mm (bf16 activations, the light part's
              group size), as gpt-fast and torchao use it
  ffnsplit    kernels.ops.split_ffn(backend="triton"), and its two halves: kernel_A (up/gate/act,
              split_ffn.split_activations) and kernel_B (down over [heavy | light] with its split-K
              reduction, quant_matmul.split_linear)
  reference   the torch reference path (dequantizes on every call; eager, M <= 256)
Each method runs once first (compile, autotune, cuBLAS set-up); its time is the median of CUDA-graph
replays cycling through `copies` weight copies, enough copies that the smallest method's weights
of all copies are at least twice the L2 cache, so no call finds its weights in L2. Reported:
microseconds, achieved GB/s of weight bytes, the ratio to the byte floor (weight bytes / the copy
bandwidth measured on the card, bytes read + written), the speedup over dense, and the relative
error ||out - ref|| / ||ref|| of each method against an fp32 computation with the same weights.

End-to-end: a Llama-style causal LM and its compressed twin (a compressed folder and its dense
original, or a random-weight model of a named shape and the same model with every FFN split in
place: a random heavy set kept fp16, the rest RTN-quantized) run through `StaticDecoder`, the same
code for both: prefill = one forward of the prompt (a CUDA-graph replay on a GPU), decode =
greedy steps over a static KV cache, one step per CUDA-graph replay. Reported: prefill and decode
tokens/s, peak GPU memory, and how far the compressed model's logits are from the dense
model's.

On the CPU (`device="cpu"`) everything runs eagerly with tiny shapes: smoke numbers, not timings.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnsplit.errors import FFNSplitError, OptionError, UnsupportedModelError
from ffnsplit.fsutil import atomic_write_text
from ffnsplit.kernels import decode_ops, ops, reference, tiles, w4a8_hopper
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels import w4a8 as w4a8_kernels
from ffnsplit.kernels.format import (
    PACK_ALIGN,
    QuantizedWeight,
    SplitFFNWeights,
    pack_planes,
    pad_heavy,
)
from ffnsplit.kernels.format import n_groups as count_groups
from ffnsplit.kernels.tiles import capture_graph
from ffnsplit.plan import LayerPlan, LightFormat, SplitPlan, group_for, parse_light_format
from ffnsplit.runtime import is_out_of_memory, resolve_device

BENCH_FORMAT = 1
DEFAULT_SHAPE = "4096x14336"  # Llama-3-8B's FFN
CPU_DEFAULT_SHAPE = "256x1024"  # --device cpu runs eagerly: smoke numbers in seconds, not minutes
DEFAULT_MS = (1, 4, 16, 64, 256, 2048)
REFERENCE_MAX_M = 256  # the reference dequantizes per call: too slow to time beyond
METHODS = ("dense", "torch_int4", "ffnsplit", "kernel_A", "kernel_B", "reference")
W4A8_METHOD = "ffnsplit_w4a8"  # with --light-act int8: the split FFN on int8 light activations
GRAPH_REPEAT = 4  # passes over the weight copies per CUDA graph
MAX_COPIES = 128
E2E_REPEATS = 5  # medians of this many prefills / decode runs on a GPU (one on the CPU)
# untimed prefills after the first (tuning) one on a GPU: one eager 512-token prompt is ~15-30 ms,
# and three timed ones right after the tuning call moved 2x between calls (session 5)
E2E_WARMUP = 2

E2E_SHAPES: dict[str, dict] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": True},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
}  # fmt: skip
"""Llama configs of real models' shapes (random weights: for timing) and a tiny one for tests."""

NO_GPU = (
    "no CUDA GPU is visible: timings need one; run on a CUDA machine, or pass --device cpu for "
    "smoke numbers only (not timings to report)"
)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Options


def parse_shape(text: str) -> tuple[int, int]:
    """`HxI` -> (hidden size, intermediate size); a one-line OptionError otherwise."""
    usage = f"--shape {text!r}: expected HxI (hidden x intermediate size), e.g. {DEFAULT_SHAPE}"
    parts = str(text).strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise OptionError(usage)
    hidden, intermediate = (int(p) for p in parts)
    if hidden <= 0 or intermediate <= 0:
        raise OptionError(usage)
    if hidden % PACK_ALIGN:
        raise OptionError(
            f"--shape {text}: the hidden size {hidden} must be a multiple of {PACK_ALIGN} "
            "(packed int formats)"
        )
    return hidden, intermediate


def parse_ms(value: str | Sequence[int]) -> tuple[int, ...]:
    """`1,4,16` (or a sequence of ints) -> sorted distinct positive row counts."""
    usage = f"--m {value!r}: expected comma-separated positive integers, e.g. 1,4,16,64"
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items or not all(v.isdigit() for v in items):
            raise OptionError(usage)
        ms = [int(v) for v in items]
    else:
        ms = [int(v) for v in value]
    if not ms or any(m <= 0 for m in ms):
        raise OptionError(usage)
    return tuple(sorted(set(ms)))


@dataclass
class BenchOptions:
    """Everything `ffnsplit bench` decides (validated on construction).

    Sources: `model` (a compressed ffnsplit folder: its distinct FFN layer layouts), `shapes`
    (`HxI` layers with random weights), `against` (the dense original of `model`: end-to-end),
    `e2e_shape` (a name in E2E_SHAPES: random-weight model and its compressed twin, end-to-end).
    With none of them, the layer bench of DEFAULT_SHAPE runs (CPU_DEFAULT_SHAPE with
    `device="cpu"`).
    """

    model: str | None = None
    shapes: tuple[str, ...] = ()
    against: str | None = None
    e2e_shape: str | None = None
    ms: tuple[int, ...] | str = DEFAULT_MS
    light: str = "int4-g128"  # light format of `shapes` layers and of the e2e twin
    heavy_fraction: float = 0.05
    copies: int | None = None  # rotating weight copies; None: enough to defeat the L2 cache
    repeats: int | None = None  # timed repetitions (medians); None: 15 on a GPU, 3 on the CPU
    batch: int = 1
    prompt_len: int = 512
    decode_steps: int = 128
    graphs: bool = True  # CUDA graphs (layer timings and decode steps)
    decoder_kernels: str = "auto"  # StaticDecoder's kernels: auto (triton on CUDA), triton, torch
    light_act: str = "none"  # "int8": the layer bench adds the W4A8 split FFN (kernels/w4a8.py)
    # kernels.tiles.GEMV_MAX_M for this run (threshold experiments; the Gluon mma tier takes
    # 2 <= M <= 32 first where it can run, FFNSPLIT_MMA=0 takes it out)
    gemv_max_m: int | None = None
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        self.ms = parse_ms(self.ms)
        self.shapes = tuple(str(s) for s in self.shapes)
        for shape in self.shapes:
            parse_shape(shape)
        if self.against is not None and self.model is None:
            raise OptionError(
                "--against compares a compressed model with its original: give the compressed "
                "folder as MODEL"
            )
        if self.e2e_shape is not None and self.e2e_shape not in E2E_SHAPES:
            raise OptionError(
                f"unknown --e2e-shape {self.e2e_shape!r}: choose one of {', '.join(E2E_SHAPES)}"
            )
        if self.model is None and not self.shapes and self.e2e_shape is None:
            cpu = str(self.device).strip().lower() == "cpu"
            self.shapes = (CPU_DEFAULT_SHAPE if cpu else DEFAULT_SHAPE,)
        light = self.light_format
        if self.shapes and light.kind != "quant":
            raise OptionError(
                f"--light {self.light}: the layer bench of --shape takes a quantized format "
                "(intB-gG[-sym])"
            )
        if light.method != "rtn" or light.weighted:
            raise OptionError(
                f"--light {self.light}: benchmarks quantize with RTN (no calibration): drop "
                "-gptq / -w"
            )
        if not 0.0 <= self.heavy_fraction <= 1.0:
            raise OptionError(f"--heavy-fraction {self.heavy_fraction} is outside [0, 1]")
        for name in ("batch", "prompt_len", "decode_steps"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("copies", "repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(f"--{name} must be at least 1")
        if self.light_act not in ("none", "int8"):
            raise OptionError(f"--light-act {self.light_act!r}: choose one of none, int8")
        if self.decoder_kernels not in ops.BACKENDS:
            raise OptionError(
                f"unknown --decoder-kernels {self.decoder_kernels!r}: choose one of "
                f"{', '.join(ops.BACKENDS)}"
            )

    @property
    def light_format(self) -> LightFormat:
        return parse_light_format(self.light)


def bench_device(name: str | None) -> torch.device:
    """`auto` means a GPU: without one the bench stops and says how to get smoke numbers."""
    if name in (None, "", "auto"):
        if not torch.cuda.is_available():
            raise FFNSplitError(NO_GPU)
        return torch.device("cuda")
    return resolve_device(name)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def elapsed_us(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of `fn()` on the device: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e6


def time_calls_us(
    calls: Sequence[Callable[[], object]], device: torch.device, *, graph: bool, reps: int
) -> float:
    """Median time of one call, cycling through `calls` (one per weight copy).

    graph: replays of a CUDA graph of GRAPH_REPEAT passes over the calls; else eager passes.
    """

    def passes(count: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(count):
                for call in calls:
                    call()

        return run

    if graph:
        cuda_graph = capture_graph(passes(GRAPH_REPEAT))
        cuda_graph.replay()
        per_call = GRAPH_REPEAT * len(calls)
        times = [elapsed_us(cuda_graph.replay, device) / per_call for _ in range(reps)]
        del cuda_graph
    else:
        passes(1)()
        times = [elapsed_us(passes(1), device) / len(calls) for _ in range(reps)]
    return statistics.median(times)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton

        ms = triton.testing.do_bench(
            lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median"
        )
        seconds = ms * 1e-3
    else:
        dst.copy_(src)
        seconds = statistics.median(elapsed_us(lambda: dst.copy_(src), device) for _ in range(5))
        seconds *= 1e-6
    return 2 * numel * 4 / seconds


@contextlib.contextmanager
def _out_of_memory(what: str, advice: str, device: torch.device) -> Iterator[None]:
    """Turn an allocation failure into one line saying what to change."""
    try:
        yield
    except FFNSplitError:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        del exc
        _free(device)
        raise FFNSplitError(f"out of memory while {what}: {advice}") from None


# ---------------------------------------------------------------------------------------------
# Layer weights


def shape_split(
    intermediate: int, heavy_fraction: float, heavy: int | None = None
) -> tuple[int, int]:
    """(heavy, stored light) neurons of a `--shape` layer: the heavy count rounded to a multiple
    of 16 (heavy rows stay 16-byte aligned) unless `heavy` gives it, the light count padded to a
    multiple of 32."""
    if heavy is None:
        heavy = min(intermediate, int(round(heavy_fraction * intermediate / 16)) * 16)
    light = -(-(intermediate - heavy) // PACK_ALIGN) * PACK_ALIGN
    return heavy, light


def random_qweight(n: int, k: int, light: LightFormat, device: torch.device) -> QuantizedWeight:
    """A packed weight [N, K] with random codes, scales and zeros (values of a plausible size)."""
    group = group_for(light, k)
    codes = torch.randint(0, 2**light.bits, (n, k), device=device)
    groups = count_groups(k, group)
    scales = ((torch.rand(groups, n, device=device) + 0.5) * 2e-3).half()
    zeros = None
    if not light.symmetric:
        zeros = torch.randint(0, 2**light.bits, (groups, n), device=device).half()
    return QuantizedWeight(pack_planes(codes, light.bits), scales, zeros, light.bits, group, (n, k))


def random_split_weights(
    hidden: int,
    n_heavy: int,
    n_light: int,
    light: LightFormat,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float16,
    activation: str = "silu",
    gated: bool = True,
) -> SplitFFNWeights:
    """Random split-FFN weights: `n_heavy` dense neurons and `n_light` packed ones (no biases)."""

    def dense(rows: int, cols: int) -> Tensor | None:
        if not n_heavy:
            return None
        return torch.randn(rows, cols, device=device, dtype=dtype) / cols**0.5

    def packed(n: int, k: int) -> QuantizedWeight | None:
        return random_qweight(n, k, light, device) if n_light else None

    return SplitFFNWeights(
        activation=activation,
        gated=gated,
        heavy_up=dense(n_heavy, hidden),
        heavy_gate=dense(n_heavy, hidden) if gated else None,
        heavy_down=dense(hidden, n_heavy),
        light_up=packed(n_light, hidden),
        light_gate=packed(n_light, hidden) if gated else None,
        light_down=packed(hidden, n_light),
    )


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


def clone_split_weights(w: SplitFFNWeights) -> SplitFFNWeights:
    """A copy of every tensor of `w` (a rotating weight copy for the layer bench)."""

    def packed(q: QuantizedWeight | None) -> QuantizedWeight | None:
        if q is None:
            return None
        planes = [p.clone() for p in q.planes]
        return replace(q, planes=planes, scales=q.scales.clone(), zeros=_clone(q.zeros))

    names = ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias")
    changes = {name: _clone(getattr(w, name)) for name in names}
    changes.update({name: packed(getattr(w, name)) for name in ("light_up", "light_gate",
                                                                "light_down")})  # fmt: skip
    return replace(w, **changes)


def _nbytes(*tensors: Tensor | QuantizedWeight | None) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, QuantizedWeight):
            total += t.nbytes()
        elif t is not None:
            total += t.numel() * t.element_size()
    return total


def down_bytes(w: SplitFFNWeights) -> int:
    """Bytes kernel B reads: the down projection over [heavy | light] and its bias."""
    return _nbytes(w.heavy_down, w.light_down, w.down_bias)


def split_bytes(w: SplitFFNWeights) -> int:
    """Bytes of every weight and bias of a split FFN."""
    return down_bytes(w) + _nbytes(
        w.heavy_up, w.heavy_gate, w.light_up, w.light_gate, w.up_bias, w.gate_bias
    )


class Int4Linear:
    """One random weight [N, K] in torch's tinygemm int4 layout, as gpt-fast and torchao use it:
    w = (q - 8) * scale + zero per group of K, bf16 scales/zeros and activations. On the CPU,
    torch's CPU variant of the same op (`_for_cpu`)."""

    def __init__(
        self, n: int, k: int, group: int, device: torch.device, keep_reference: bool = False
    ) -> None:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        if device.type == "cuda":
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
            self._matmul = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
            self._matmul = torch.ops.aten._weight_int4pack_mm_for_cpu
        scales = (torch.rand(k // group, n, device=device) + 0.5) * 2e-3
        zeros = (torch.rand(k // group, n, device=device) - 0.5) * 1e-2
        self.scales_zeros = torch.stack([scales, zeros], dim=-1).bfloat16().contiguous()
        self.group = group
        self.reference: Tensor | None = None  # the fp32 weight these bytes represent
        if keep_reference:
            values = self.scales_zeros.float()
            scale = values[..., 0].t().repeat_interleave(group, 1)
            zero = values[..., 1].t().repeat_interleave(group, 1)
            self.reference = (q.float() - 8) * scale + zero

    def __call__(self, x: Tensor) -> Tensor:
        return self._matmul(x, self.packed, self.group, self.scales_zeros)

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales_zeros)


def _ffn(x: Tensor, up, gate, down, activation: str) -> Tensor:
    """down(act(gate x) * up x) (or down(act(up x))) for callables or weight tensors."""

    def apply(w, t: Tensor) -> Tensor:
        return F.linear(t, w) if isinstance(w, Tensor) else w(t)

    if gate is None:
        a = reference.apply_activation(activation, apply(up, x))
    else:
        a = reference.apply_activation(activation, apply(gate, x)) * apply(up, x)
    return apply(down, a)


# ---------------------------------------------------------------------------------------------
# Layer bench


@dataclass
class LayerCase:
    """One FFN layer layout to benchmark, with its rotating weight copies."""

    label: str
    hidden: int
    intermediate: int  # neurons of the dense FFN it stands for (dense and torch int4 use this)
    n_heavy: int
    n_light: int  # stored (padded) light neurons
    light: str
    activation: str
    gated: bool
    group: int | None  # the light part's group size (torch int4 uses it); None: no light part
    copies: list[SplitFFNWeights]
    layers: list[int] = field(default_factory=list)  # FFN layers of a compressed model


def _auto_copies(per_copy_bytes: int, device: torch.device) -> int:
    """Copies whose total is at least twice the L2 cache (at least 3; 1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return min(MAX_COPIES, max(3, math.ceil(2 * l2 / max(per_copy_bytes, 1))))


def shape_case(
    shape: str,
    heavy_fraction: float,
    light: LightFormat,
    device: torch.device,
    copies: int | None = None,
) -> LayerCase:
    """A SwiGLU layer of `shape` with random split weights (see shape_split)."""
    hidden, intermediate = parse_shape(shape)
    n_heavy, n_light = shape_split(intermediate, heavy_fraction)
    first = random_split_weights(hidden, n_heavy, n_light, light, device)
    count = copies or _auto_copies(down_bytes(first), device)
    weights = [first] + [
        random_split_weights(hidden, n_heavy, n_light, light, device) for _ in range(count - 1)
    ]
    return LayerCase(
        label=f"{hidden}x{intermediate} SwiGLU, {n_heavy} heavy fp16 + {n_light} light "
        f"{light.label()}",
        hidden=hidden,
        intermediate=intermediate,
        n_heavy=n_heavy,
        n_light=n_light,
        light=light.label(),
        activation="silu",
        gated=True,
        group=group_for(light, hidden) if n_light else None,
        copies=weights,
    )


def _open_model(spec: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    from ffnsplit import io, models

    path = Path(str(spec)).expanduser()
    if path.is_dir() and io.is_compressed_dir(path):
        return io.load_compressed(path, device=device, dtype=dtype)[0]
    return models.load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)[
        0
    ]


def _require_compressed(folder: str) -> Path:
    from ffnsplit import io

    path = Path(str(folder)).expanduser()
    if not (path.is_dir() and io.is_compressed_dir(path)):
        why = "not a compressed ffnsplit folder" if path.is_dir() else "not a folder"
        raise FFNSplitError(
            f"{folder} is {why}: MODEL must be a folder written by `ffnsplit compress` (for "
            "other models use --shape HxI or --e2e-shape NAME)"
        )
    return path


def model_cases(
    folder: str, device: torch.device, copies: int | None = None
) -> tuple[list[LayerCase], list[str]]:
    """One LayerCase per distinct FFN layout of a compressed folder, and notes on skipped ones.

    The dense and torch-int4 rows use the size of the FFN before compression (from plan.json).
    """
    from ffnsplit import io
    from ffnsplit.arch import installed_ffns
    from ffnsplit.modules import SplitFFN
    from ffnsplit.plan import load_plan

    path = _require_compressed(folder)
    model, _ = io.load_compressed(path, device=device, dtype=torch.float16)
    plan_file = path / "plan.json"
    sizes = [layer.intermediate_size for layer in load_plan(str(plan_file)).layers] if (
        plan_file.is_file()) else None  # fmt: skip
    groups: dict[str, list[tuple[int, SplitFFN]]] = {}
    for index, _name, module in installed_ffns(model, SplitFFN):
        key = json.dumps(module.meta(), sort_keys=True)
        groups.setdefault(key, []).append((index, module))
    cases, notes = [], []
    for members in groups.values():
        layers = [index for index, _ in members]
        index, module = members[0]
        span = _layer_span(layers)
        if module.heavy_kind == "int8" or module.light_kind == "lowrank":
            notes.append(
                f"layers {span}: {module.heavy_kind} heavy + {module.light_kind} light parts are "
                "not covered by the layer bench (the end-to-end bench runs them)"
            )
            continue
        stored = module.split_weights()
        first = pad_heavy(stored)  # as the module's CUDA forward lays it out for its kernels
        light = first.light_up
        light_label = "none"
        if light is not None:
            group = "pc" if light.group_size >= light.shape[1] else f"g{light.group_size}"
            light_label = f"int{light.bits}-{group}" + ("-sym" if light.symmetric else "")
        count = copies or _auto_copies(down_bytes(first), device)
        weights = [first] + [clone_split_weights(first) for _ in range(count - 1)]
        intermediate = sizes[index] if sizes else module.n_heavy + module.n_light
        cases.append(
            LayerCase(
                label=f"layers {span}: {module.hidden_size}x{intermediate} {module.activation}"
                f"{' gated' if module.gated else ''}, {stored.n_heavy} heavy fp16 + "
                f"{module.n_light} light {light_label}"
                + (f" ({first.n_light} stored)" if first.n_light != module.n_light else ""),
                hidden=module.hidden_size,
                intermediate=intermediate,
                n_heavy=first.n_heavy,
                n_light=first.n_light,
                light=light_label,
                activation=module.activation,
                gated=module.gated,
                group=None if light is None else light.group_size,
                copies=weights,
                layers=layers,
            )
        )
    del model
    return cases, notes


def _layer_span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _int4_weights(
    case: LayerCase, device: torch.device
) -> tuple[list[list[Int4Linear]], str | None]:
    """torch-int4 copies of the layer's dense shape, or none and why."""
    group, hidden, intermediate = case.group, case.hidden, case.intermediate
    if group is None:
        return [], "no quantized light part to compare with"
    if hidden % group or intermediate % group:
        return [], f"H={hidden} and I={intermediate} must be multiples of the group size {group}"
    shapes = [(intermediate, hidden)] * (2 if case.gated else 1) + [(hidden, intermediate)]
    try:
        return [
            [Int4Linear(n, k, group, device, keep_reference=copy == 0) for n, k in shapes]
            for copy in range(len(case.copies))
        ], None
    except Exception as exc:  # torch's int4 ops change between releases: report, go on
        if is_out_of_memory(exc):
            raise
        return [], f"unavailable here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"


def _row(m: int, method: str, us: float, nbytes: int, bandwidth: float, timing: str) -> dict:
    floor_us = nbytes / bandwidth * 1e6
    return {"m": m, "method": method, "us": us, "GBps": nbytes / us / 1e3, "floor_us": floor_us,
            "x_floor": us / floor_us, "timing": timing}  # fmt: skip


def bench_layer(
    case: LayerCase,
    ms: Sequence[int],
    device: torch.device,
    *,
    bandwidth: float,
    graphs: bool = True,
    reps: int | None = None,
    log: Log | None = None,
    w4a8: bool = False,
) -> dict:
    """Time every method on `case` for every M; returns the case's description and rows.
    `w4a8`: also the split FFN on int8 light activations (W4A8_METHOD; its error is against the
    same fp32 reference as the others', so it shows what the int8 activations cost)."""
    log = log or (lambda message: None)
    cuda = device.type == "cuda"
    reps = reps or (15 if cuda else 3)
    weights = case.copies
    matrices = 3 if case.gated else 2
    shapes = [(case.intermediate, case.hidden)] * (matrices - 1) + [
        (case.hidden, case.intermediate)
    ]
    dense_w = [
        [torch.randn(n, k, device=device, dtype=torch.float16) / k**0.5 for n, k in shapes]
        for _ in weights
    ]
    int4_w, int4_note = _int4_weights(case, device)
    notes = [] if int4_note is None else [f"torch_int4 skipped: {int4_note}"]
    triton_ok = cuda or tiles.INTERPRET
    if not triton_ok:
        notes.append("ffnsplit Triton kernels skipped: they need CUDA (or TRITON_INTERPRET=1)")
    nbytes = {
        "dense": matrices * case.hidden * case.intermediate * 2,
        "torch_int4": sum(lin.nbytes() for lin in int4_w[0]) if int4_w else 0,
        "ffnsplit": split_bytes(weights[0]),
        "kernel_A": split_bytes(weights[0]) - down_bytes(weights[0]),
        "kernel_B": down_bytes(weights[0]),
        "reference": split_bytes(weights[0]),
        W4A8_METHOD: split_bytes(weights[0]),
    }
    act = case.activation
    if w4a8:
        probe = torch.empty(0, case.hidden, device=device, dtype=torch.float16)
        why = w4a8_kernels.unsupported(probe, weights[0]) if triton_ok else "no Triton here"
        if why:
            notes.append(f"{W4A8_METHOD} skipped: {why}")
            w4a8 = False
        else:
            notes.append(f"{W4A8_METHOD}: int8 light activations (a different numerics), "
                         "error against the fp16-activation fp32 reference")  # fmt: skip

    def unpack(ws: list) -> tuple:
        return (ws[0], ws[1] if case.gated else None, ws[-1])

    Methods = dict[str, tuple[list[Callable[[], Tensor]], Callable[[], float]]]

    def methods_at(m: int) -> Methods:
        """method -> (calls, one per weight copy; check: relative error against fp32)."""
        x = torch.randn(m, case.hidden, device=device, dtype=torch.float16)
        xf, xbf = x.float(), x.bfloat16()
        w0 = weights[0]
        ref_split = reference.split_ffn(xf, w0)
        methods: Methods = {
            "dense": (
                [lambda w=w: _ffn(x, *unpack(w), act) for w in dense_w],
                lambda: rel_err(
                    _ffn(x, *unpack(dense_w[0]), act),
                    _ffn(xf, *unpack([t.float() for t in dense_w[0]]), act),
                ),
            )
        }
        if int4_w:
            methods["torch_int4"] = (
                [lambda w=w: _ffn(xbf, *unpack(w), act) for w in int4_w],
                lambda: rel_err(
                    _ffn(xbf, *unpack(int4_w[0]), act),
                    _ffn(xf, *unpack([lin.reference for lin in int4_w[0]]), act),
                ),
            )
        if triton_ok:
            acts = [sffn.split_activations(x, w) for w in weights]
            methods["ffnsplit"] = (
                [lambda w=w: ops.split_ffn(x, w, backend="triton") for w in weights],
                lambda: rel_err(ops.split_ffn(x, w0, backend="triton"), ref_split),
            )
            methods["kernel_A"] = (
                [lambda w=w: sffn.split_activations(x, w) for w in weights],
                lambda: rel_err(sffn.split_activations(x, w0), reference.split_activations(xf, w0)),
            )
            methods["kernel_B"] = (
                [
                    lambda w=w, a=a: sffn.down_projection(a, w)
                    for w, a in zip(weights, acts, strict=True)
                ],
                lambda: rel_err(
                    sffn.down_projection(acts[0], w0),
                    reference.split_linear(
                        acts[0].float(), w0.heavy_down, w0.light_down, w0.down_bias
                    ),
                ),
            )
        if w4a8:
            methods[W4A8_METHOD] = (
                [lambda w=w: w4a8_kernels.split_ffn(x, w) for w in weights],
                lambda: rel_err(w4a8_kernels.split_ffn(x, w0), ref_split),
            )
        if m <= REFERENCE_MAX_M:
            methods["reference"] = (
                [lambda w=w: ops.split_ffn(x, w, backend="torch") for w in weights],
                lambda: rel_err(ops.split_ffn(x, w0, backend="torch"), ref_split),
            )
        return methods

    rows: list[dict] = []
    for m in ms:
        methods = methods_at(m)
        dense_us = None
        for name, (calls, check) in methods.items():
            graph = cuda and graphs and name != "reference"
            try:
                error = check()
                us = time_calls_us(calls, device, graph=graph, reps=reps)
            except Exception as exc:  # one broken path must not hide the others: report it
                if is_out_of_memory(exc):
                    raise
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                rows.append({"m": m, "method": name, "error": f"{type(exc).__name__}: {first}"})
                log(f"  M={m} {name}: FAILED {type(exc).__name__}: {first}")
                continue
            timing = "cuda-graph" if graph else ("eager" if cuda else "eager-cpu")
            row = _row(m, name, us, nbytes[name], bandwidth, timing)
            row["rel_err"] = error
            if name in ("ffnsplit", "kernel_A", "kernel_B"):  # which kernel tier served this M
                probe = torch.empty(0, device=device, dtype=torch.float16)
                which = {"ffnsplit": sffn.ffn_path, "kernel_A": sffn.kernel_a_path,
                         "kernel_B": sffn.kernel_b_path}  # fmt: skip
                row["path"] = which[name](m, probe, weights[0])
            if name == W4A8_METHOD:
                probe = torch.empty(0, case.hidden, device=device, dtype=torch.float16)
                hopper = w4a8_hopper.use(probe, weights[0])
                row["path"] = "w4a8+wgmma" if hopper else "w4a8"
            dense_us = us if name == "dense" else dense_us
            row["vs_dense"] = None if dense_us is None else dense_us / us
            rows.append(row)
        line = " ".join(f"{r['method']}={r['us']:.1f}us" for r in rows if r["m"] == m and "us" in r)
        paths = {r["path"] for r in rows if r["m"] == m and "path" in r}
        log(f"  M={m} {line}" + (f" (path {', '.join(sorted(paths))})" if paths else ""))
    slower = slower_note(rows) if cuda else None  # CPU smoke runs time nothing worth saying
    if slower:  # said in the results, not left for the reader to spot in the table
        notes.append(slower)
    return {
        "label": case.label,
        "layers": case.layers,
        "shape": [case.hidden, case.intermediate],
        "heavy": case.n_heavy,
        "light": case.n_light,
        "light_format": case.light,
        "activation": case.activation,
        "gated": case.gated,
        "copies": len(weights),
        "weight_bytes": {k: v for k, v in nbytes.items() if v},
        "notes": notes,
        "rows": rows,
    }


def slower_note(rows: list[dict]) -> str | None:
    """The layer bench's note on the row counts M where ffnsplit ran slower than dense fp16
    (vs_dense < 1), with each one's ratio and kernel path; None where it never did."""
    slower = [r for r in rows if r["method"] == "ffnsplit" and (r.get("vs_dense") or 1.0) < 1.0]
    if not slower:
        return None
    return "ffnsplit slower than dense fp16 at " + ", ".join(
        f"M = {r['m']} ({r['vs_dense']:.2f}x, path {r.get('path', '?')})" for r in slower
    )


def tuning_timings() -> dict:
    """Per kernel and shape key, every autotuned config's time in us (what the tuners measured)."""
    from ffnsplit.kernels import dequant_gemm, gemv, mma_decode

    out = {}
    # the key fields that tell a kernel's shapes apart (dequant: K, features, two weights)
    tuners = ((sffn._tuner, "kernel_A", slice(0, 2)), (qmm._tuner, "kernel_B", slice(0, 2)),
              (gemv._tuner, "gemv", slice(0, 2)), (dequant_gemm._tuner, "dequant", slice(3, 6)),
              (mma_decode._up_tuner, "mma_A", slice(0, 2)),
              (mma_decode._down_tuner, "mma_B", slice(0, 2)))  # fmt: skip
    for tuner, name, fields in tuners:
        for key, timings in getattr(tuner, "timings", {}).items():
            out[f"{name} {key[fields]}"] = {
                str(cfg): round(t * 1e3, 1) for cfg, t in timings.items()
            }
    return out


# ---------------------------------------------------------------------------------------------
# End to end

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _repeat_kv(t: Tensor, groups: int) -> Tensor:
    """[B, kv, L, D] -> [B, kv * groups, L, D], each key/value head repeated `groups` times."""
    if groups == 1:
        return t
    b, kv, length, dim = t.shape
    return t[:, :, None].expand(b, kv, groups, length, dim).reshape(b, kv * groups, length, dim)


def _fuse_qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """One [q + k + v, H] weight (and bias) for the three projections of `attn`; the modules'
    parameters are re-pointed at slices of it, so the model holds no second copy."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        weight = torch.cat([p.weight.detach() for p in projs])
        bias = None
        if all(p.bias is not None for p in projs):
            bias = torch.cat([p.bias.detach() for p in projs])
        start = 0
        for proj in projs:
            rows = proj.weight.shape[0]
            proj.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            if bias is not None:
                proj.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
    if bias is None and any(p.bias is not None for p in projs):
        raise UnsupportedModelError("q/k/v projections with biases on only some of them")
    return weight, bias


def _rms_norm_args(norm: nn.Module) -> tuple[Tensor, float]:
    """(weight, eps) of a LlamaRMSNorm-style module (the fused kernels take them)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or getattr(norm, "weight", None) is None:
        raise UnsupportedModelError(
            f"{type(norm).__name__} is not an RMSNorm with a weight and variance_epsilon: "
            "use kernels='torch'"
        )
    return norm.weight, float(eps)


PROJ_MAX_ROWS = 16  # StaticDecoder's projections: split_linear up to this many tokens a call


def decoder_projections(device: torch.device) -> str:
    """Where StaticDecoder (kernels="triton") sends its q/k/v and o projections: "ffnsplit"
    (split_linear's dense path) or "torch" (cuBLAS). FFNSPLIT_DECODER_PROJ picks one; "auto"
    (default) is ffnsplit where the Gluon tier runs on an sm_90 GPU or newer, torch elsewhere.
    H200, Llama-3-8B step (session 19, benchmarks/oracle_decode.py): dense 4,747 -> 4,646 us,
    split 2,704 -> 2,586 us once dense-only calls stopped triggering their dependents early
    (mma_decode.DENSE_TRIGGER); with the early trigger the split step had been 266 us slower.
    "ffnsplit" on the CPU needs TRITON_INTERPRET=1 (the tests use it)."""
    choice = os.environ.get("FFNSPLIT_DECODER_PROJ", "auto")
    if choice not in ("auto", "ffnsplit", "torch"):
        raise OptionError(f"FFNSPLIT_DECODER_PROJ={choice!r}: use auto, ffnsplit or torch")
    if choice == "auto":
        from ffnsplit.kernels import mma_decode

        fast = mma_decode.available(device) and torch.cuda.get_device_capability(device) >= (9, 0)
        return "ffnsplit" if fast else "torch"
    if choice == "ffnsplit" and device.type != "cuda" and not tiles.INTERPRET:
        return "torch"
    return choice


def decoder_attention() -> str:
    """How StaticDecoder (kernels="triton") runs a decode token's attention
    (FFNSPLIT_DECODE_ATTENTION, decode_ops.ROPE_ATTENTION_MODES): "fused" (default:
    decode_ops.rope_attention, then its combine launch), "ticket" (rope_attention, each kv
    head's last chunk combining) or "unfused" (rope_kv_write, then decode_attention and its
    combine: three launches). Models with q/k norms (Qwen3) or more than 16 query heads a kv
    head always take "unfused"."""
    choice = os.environ.get("FFNSPLIT_DECODE_ATTENTION", "fused")
    if choice not in decode_ops.ROPE_ATTENTION_MODES:
        raise OptionError(
            f"FFNSPLIT_DECODE_ATTENTION={choice!r}: use "
            + ", ".join(decode_ops.ROPE_ATTENTION_MODES)
        )
    return choice


class StaticDecoder:
    """A Llama-style causal LM run over a static KV cache; every step is CUDA-graph capturable.

    Uses the model's own embeddings, q/k/v/o projections, rotary tables, lm head and FFN
    (whatever it is: the dense MLP or a SplitFFN, called as `layer.mlp(x)`); the attention
    plumbing is here: a [layers, B, kv heads, max_len, head dim] cache written at `positions` (a
    device tensor), attention over it limited by `positions`, so shapes never change and nothing
    waits on the host. Supports DECODER_TYPES (q/k norms of Qwen3, biases, grouped-query
    attention, sliding windows).

    `kernels`: "torch" runs the model's own norms, projections and torch ops (rotary, cache copies,
    the cache repeated per query head, masked SDPA, argmax); "triton" runs kernels/decode_ops.py:
    each RMSNorm fused with the residual add before it, rotary + cache write in one launch, attention over the
    unrepeated cache whose cost follows the position (prefill too: one pass per tile of query
    rows; a decode token's rotary, cache write and attention in one launch and a combine,
    decoder_attention), the greedy pick, token write and position step in one launch, and on
    sm_90 GPUs the decode projections through ffnsplit's dense split_linear
    (decoder_projections); "auto" is triton on CUDA, torch elsewhere. Both models of a
    comparison run the same.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, kernels: str = "auto") -> None:
        if kernels not in ops.BACKENDS:
            raise OptionError(f"unknown decoder kernels {kernels!r}: choose one of "
                              f"{', '.join(ops.BACKENDS)}")  # fmt: skip
        config = model.config
        base = getattr(model, "model", None)
        if (
            getattr(config, "model_type", None) not in DECODER_TYPES
            or base is None
            or getattr(model, "lm_head", None) is None
        ):
            raise UnsupportedModelError(
                f"the end-to-end bench runs Llama-style decoders ({', '.join(DECODER_TYPES)}); "
                f"this model is {getattr(config, 'model_type', type(model).__name__)!r}"
            )
        self.model, self.base = model, base
        self.layers = list(base.layers)
        embed = base.embed_tokens.weight
        device, dtype = embed.device, embed.dtype
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        kv_heads = config.num_key_value_heads
        self.groups = config.num_attention_heads // kv_heads
        shape = (len(self.layers), batch, kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.arange(max_len, device=device)
        with torch.no_grad():  # precomputed for every position: a step only gathers rows
            cos, sin = base.rotary_emb(embed[:1].detach(), self.key_positions[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim] in the model's dtype
        self.windows = [
            getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
            for layer in self.layers
        ]
        # one projection launch for q, k and v; rotary on q and k in one pass (see _attention)
        self.qkv = [_fuse_qkv(layer.self_attn) for layer in self.layers]
        self.q_heads = config.num_attention_heads
        self.batch, self.max_len = batch, max_len
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.kernels = kernels == "triton" or (kernels == "auto" and device.type == "cuda")
        # decode-sized q/k/v and o projections through ffnsplit's dense split_linear (the
        # Gluon tier) instead of cuBLAS, both models alike: see decoder_projections
        self.own_projections = self.kernels and decoder_projections(device) == "ffnsplit"
        self.attention_mode = decoder_attention()
        # decode tokens through decode_ops.rope_attention (it reads the rotary tables itself)
        self.fused_decode = (
            self.attention_mode != "unfused"
            and self.groups <= 16
            and getattr(attn, "q_norm", None) is None
        )
        if self.kernels:
            if device.type != "cuda" and not tiles.INTERPRET:
                raise OptionError(
                    "kernels='triton' needs a CUDA model (or TRITON_INTERPRET=1 on the CPU)"
                )
            self.norms = [
                (_rms_norm_args(layer.input_layernorm),
                 _rms_norm_args(layer.post_attention_layernorm))
                for layer in self.layers
            ]  # fmt: skip
            self.final_norm = _rms_norm_args(base.norm)
            self.qk_norms = [self._qk_norm_args(layer.self_attn) for layer in self.layers]

    @staticmethod
    def _qk_norm_args(attn: nn.Module) -> dict:
        """rope_kv_write's q_norm / k_norm / eps arguments (Qwen3), {} without q/k norms."""
        if getattr(attn, "q_norm", None) is None:
            return {}
        (q_norm, eps), (k_norm, k_eps) = _rms_norm_args(attn.q_norm), _rms_norm_args(attn.k_norm)
        if eps != k_eps:
            raise UnsupportedModelError("q and k norms with different eps: use kernels='torch'")
        return {"q_norm": q_norm, "k_norm": k_norm, "eps": eps}

    def _attention(
        self, attn: nn.Module, x: Tensor, index: int, cos: Tensor, sin: Tensor,
        positions: Tensor, mask: Tensor,
    ) -> Tensor:  # fmt: skip
        b, t, _ = x.shape
        weight, bias = self.qkv[index]
        qkv = F.linear(x, weight, bias).view(b, t, -1, self.head_dim)
        heads = self.q_heads + (qkv.shape[2] - self.q_heads) // 2  # q heads + k heads
        qk, v = qkv[:, :, :heads], qkv[:, :, heads:]
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before rotary
            qk = torch.cat((attn.q_norm(qk[:, :, : self.q_heads]),
                            attn.k_norm(qk[:, :, self.q_heads :])), dim=2)  # fmt: skip
        qk = qk.transpose(1, 2)  # [B, q + k heads, T, D]: rotary once for both
        qk = qk * cos + reference.rotate_half(qk) * sin
        q, k = qk[:, : self.q_heads], qk[:, self.q_heads :]
        keys, values = self.keys[index], self.values[index]
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v.transpose(1, 2))
        # the cache repeated per query head (a copy): SDPA's own enable_gqa would send a masked
        # call to its math backend on torch 2.11 (several kernels), not measured yet
        out = F.scaled_dot_product_attention(
            q, _repeat_kv(keys, self.groups), _repeat_kv(values, self.groups), attn_mask=mask,
            scale=attn.scaling,
        )  # fmt: skip
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _attention_kernels(
        self, attn: nn.Module, x: Tensor, index: int, cos: Tensor, sin: Tensor, positions: Tensor
    ) -> Tensor:
        """_attention through decode_ops: qkv projection, rotary + cache write, attention."""
        b, t, _ = x.shape
        weight, bias = self.qkv[index]
        out = self._attend(attn, self._project(x, weight, bias), index, cos, sin, positions)
        o = attn.o_proj  # out is [B, T, H, D] viewed as [B, H, T, D]: merging the heads is free
        # o's weights asked for in L2 while the attention's dependent loads leave the memory
        # idle, where mma_decode.DENSE_PREFETCH allows it (off by default: session 20)
        return self._project(out.transpose(1, 2).reshape(b, t, -1), o.weight, o.bias,
                             prefetch=True)  # fmt: skip

    def _attend(
        self, attn: nn.Module, qkv: Tensor, index: int, cos: Tensor, sin: Tensor, positions: Tensor
    ) -> Tensor:
        """The attention of the q/k/v projection `qkv` [B, T, width] over layer `index`'s cache
        (written at `positions` first): out [B, q heads, T, D] (a view of [B, T, q heads, D]).
        A decode token (T = 1) in one launch and its combine (fused_decode: cos and sin are
        then the whole rotary tables), else rotary + cache write (cos, sin: the rows of
        `positions`), then decode_attention."""
        keys, values = self.keys[index], self.values[index]
        if qkv.shape[1] == 1 and self.fused_decode:  # cos, sin: the tables (forward)
            return decode_ops.rope_attention(
                qkv, cos, sin, positions, keys, values, self.q_heads, keys.shape[1],
                self.head_dim, attn.scaling, self.windows[index],
                ticket=self.attention_mode == "ticket",
            )  # fmt: skip
        q = decode_ops.rope_kv_write(
            qkv, cos, sin, positions, keys, values, self.q_heads, keys.shape[1], self.head_dim,
            **self.qk_norms[index],
        )  # fmt: skip
        return decode_ops.decode_attention(
            q, keys, values, positions, attn.scaling, self.groups, self.windows[index]
        )

    def _project(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, prefetch: bool = False
    ) -> Tensor:
        """x @ weight^T + bias: at decode sizes through split_linear's dense path when
        `own_projections` (the Gluon tier picks it up to mma_decode.AUTO_MAX_M rows), else torch.
        `prefetch`: split_linear's (the weights in L2 before the PDL wait)."""
        if self.own_projections and x.shape[0] * x.shape[1] <= PROJ_MAX_ROWS:
            return qmm.split_linear(x, weight, None, bias, prefetch=prefetch)
        return F.linear(x, weight, bias)

    def _hidden_kernels(
        self, h: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, last_only: bool
    ) -> Tensor:
        """The layers and final norm over the embeddings `h`, each RMSNorm fused with the
        residual add before it (the FFN output of layer i goes into layer i + 1's input norm)."""
        residual = None
        for index, layer in enumerate(self.layers):
            (in_weight, in_eps), post = self.norms[index]
            if residual is None:
                residual, x = h, decode_ops.rms_norm(h, in_weight, in_eps)
            else:
                x, residual = decode_ops.add_rms_norm(h, residual, in_weight, in_eps)
            out = self._attention_kernels(layer.self_attn, x, index, cos, sin, positions)
            x, residual = decode_ops.add_rms_norm(out, residual, *post)
            h = layer.mlp(x)
        if last_only:
            h = h[:, -1:]
            residual = None if residual is None else residual[:, -1:]
        if residual is None:
            return decode_ops.rms_norm(h, *self.final_norm)
        return decode_ops.add_rms_norm(h, residual, *self.final_norm)[0]

    def forward(self, ids: Tensor, positions: Tensor, last_only: bool = True) -> Tensor:
        """Logits [B, T (1 if last_only), V] of tokens `ids` [B, T] at `positions` [T] (a long
        tensor on the device), whose keys and values are written into the cache."""
        h = self.base.embed_tokens(ids)
        if self.kernels and ids.shape[1] == 1 and self.fused_decode:
            cos, sin = self.cos, self.sin  # rope_attention reads row `position` itself
        else:
            cos = self.cos.index_select(0, positions)
            sin = self.sin.index_select(0, positions)
        if self.kernels:
            return self.model.lm_head(self._hidden_kernels(h, cos, sin, positions, last_only))
        keys, queries = self.key_positions[None, :], positions[:, None]
        causal = keys <= queries
        masks = {None: causal}
        for index, layer in enumerate(self.layers):
            window = self.windows[index]
            if window not in masks:  # key within `window` positions of the query, as HF does
                masks[window] = causal & (keys > queries - window)
            residual = h
            h = layer.input_layernorm(h)
            h = residual + self._attention(
                layer.self_attn, h, index, cos, sin, positions, masks[window]
            )
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        h = self.base.norm(h)
        if last_only:
            h = h[:, -1:]
        return self.model.lm_head(h)

    def start_decode(self, tokens: Tensor, position: int) -> None:
        """Set the next decode step's input tokens [B, 1] and position (in place)."""
        self.tokens.copy_(tokens)
        self.position.fill_(position)

    def decode_step(self) -> None:
        """One greedy step: `tokens` at `position` -> next tokens; both advance in place."""
        logits = self.forward(self.tokens, self.position)[:, -1]
        if self.kernels:  # the pick, the tokens' write and the position's step in one launch
            decode_ops.greedy_tokens(logits, out=self.tokens, position=self.position)
        else:
            self.tokens.copy_(logits.argmax(dim=-1, keepdim=True))
            self.position.add_(1)


def random_llama(
    name: str, device: torch.device, dtype: torch.dtype, max_positions: int = 8192
) -> nn.Module:
    """A LlamaForCausalLM of the E2E_SHAPES `name`, random weights, built directly on `device`
    in `dtype` (no download, no CPU copy). Seed torch first for repeatable weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**E2E_SHAPES[name], max_position_embeddings=max(max_positions, 2048))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_plan(
    model: nn.Module,
    *,
    heavy_fraction: float,
    light: LightFormat,
    seed: int = 0,
    heavy_dtype: str = "float16",
    fingerprint: dict | None = None,
) -> SplitPlan:
    """A plan with a random heavy set of ceil(heavy_fraction * I) neurons per FFN (the count
    `ffnsplit compress --heavy-fraction` takes) kept in `heavy_dtype`, and `light` for the rest:
    a twin for timing, no profile needed. `fingerprint` (arch.model_fingerprint) lets
    apply.compress_model check the plan against the model."""
    from ffnsplit.apply import ffn_geometry
    from ffnsplit.arch import get_ffn_blocks

    generator = torch.Generator().manual_seed(seed)
    layers = []
    for block in get_ffn_blocks(model):
        size = block.parts().intermediate_size
        order = torch.randperm(size, generator=generator)
        heavy = min(size, math.ceil(heavy_fraction * size - 1e-9))
        layers.append(
            LayerPlan(
                layer=block.layer,
                heavy_idx=order[:heavy].tolist(),
                light_idx=torch.sort(order[heavy:]).values.tolist(),
                pruned_idx=[],
                light=light,
                heavy_dtype=heavy_dtype,
            )
        )
    return SplitPlan(
        layers=layers, selection="random", fingerprint=fingerprint or {},
        geometry=ffn_geometry(model), seed=seed,
    )  # fmt: skip


def split_model_(model: nn.Module, plan: SplitPlan) -> nn.Module:
    """Replace every FFN by its SplitFFN under `plan`, in place, on the weights' device.

    apply.compress_model without its fingerprint check, which hashes every FFN weight on the
    CPU (minutes for an 8B model); RTN formats only (no calibration)."""
    from ffnsplit.apply import build_split_ffn, needs_calibration
    from ffnsplit.arch import get_ffn_blocks

    if any(needs_calibration(layer.light) for layer in plan.layers):
        raise OptionError("split_model_ quantizes with RTN: GPTQ / weighted low-rank need compress")
    with torch.no_grad():
        for block in get_ffn_blocks(model):
            block.install(build_split_ffn(block.parts(), plan.layers[block.layer]))
    return model


def _model_bytes(model: nn.Module) -> tuple[int, int]:
    """(all weight bytes, FFN weight bytes); tied tensors counted once."""
    from ffnsplit.arch import get_ffn_blocks, installed_ffns
    from ffnsplit.modules import SplitFFN

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    split = installed_ffns(model, SplitFFN)
    modules = [m for _, _, m in split] if split else [b.module for b in get_ffn_blocks(model)]
    ffn = sum(_nbytes(*m.parameters(), *m.buffers()) for m in modules)
    return total, ffn


def measure_model(
    model: nn.Module,
    prompt: Tensor,
    *,
    decode_steps: int,
    check_len: int = 64,
    graphs: bool = True,
    reps: int | None = None,
    kernels: str = "auto",
    log: Log | None = None,
) -> tuple[dict, Tensor]:
    """Prefill and decode throughput and peak memory of `model` on `prompt` [B, P] (on the
    model's device) through StaticDecoder(kernels=`kernels`), and its logits on the first
    `check_len` prompt tokens (fp32, CPU)."""
    log = log or (lambda message: None)
    device = prompt.device
    cuda = device.type == "cuda"
    reps = reps or (E2E_REPEATS if cuda else 1)
    batch, prompt_len = prompt.shape
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    weights_bytes, ffn_bytes = _model_bytes(model)
    max_len = -(-(prompt_len + decode_steps) // 64) * 64
    with torch.no_grad():
        decoder = StaticDecoder(model, batch, max_len, kernels=kernels)
        check_len = min(check_len, prompt_len)
        check = decoder.forward(prompt[:, :check_len], decoder.key_positions[:check_len], False)
        check = check.float().cpu()
        positions = decoder.key_positions[:prompt_len]
        logits = decoder.forward(prompt, positions)  # warm-up: compiles, tunes for M = B * P
        for _ in range(E2E_WARMUP if cuda else 0):
            decoder.forward(prompt, positions)
        _sync(device)

        def prefill() -> None:
            decoder.forward(prompt, positions)

        prefill_timing = "eager" if cuda else "eager-cpu"
        prefill_graph = None
        if cuda and graphs:
            # one forward of the prompt as a CUDA graph, as the decode steps: eagerly the host's
            # launches set its time (sessions 18-20 saw one card's 512-token prefill move 2x)
            try:
                prefill_graph = capture_graph(prefill)
            except RuntimeError as error:
                log(f"  the prefill could not be captured ({error}); timing it eagerly")
            else:
                prefill, prefill_timing = prefill_graph.replay, "cuda-graph"
        prefill_us = statistics.median(elapsed_us(prefill, device) for _ in range(reps))
        del prefill_graph
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        decoder.start_decode(first, prompt_len)
        step, timing = decoder.decode_step, "eager" if cuda else "eager-cpu"
        graph = None
        if cuda and graphs:
            graph = capture_graph(decoder.decode_step)
            step, timing = graph.replay, "cuda-graph"
        else:
            step()  # warm-up: compiles, tunes for M = B

        def decode(count: int) -> Callable[[], None]:
            def run() -> None:
                decoder.start_decode(first, prompt_len)
                for _ in range(count):
                    step()

            return run

        decode(min(decode_steps, 8))()
        step_us = statistics.median(
            elapsed_us(decode(decode_steps), device) / decode_steps for _ in range(reps)
        )
        del graph
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    metrics = {
        "weights_bytes": weights_bytes,
        "ffn_bytes": ffn_bytes,
        "prefill_ms": prefill_us / 1e3,
        "prefill_tokens_per_s": batch * prompt_len / (prefill_us * 1e-6),
        "prefill_timing": prefill_timing,
        "decode_ms_per_step": step_us / 1e3,
        "decode_tokens_per_s": batch / (step_us * 1e-6),
        "decode_timing": timing,
        "peak_memory_bytes": peak,
    }
    log(
        f"  prefill {metrics['prefill_tokens_per_s']:,.0f} tok/s ({prefill_timing}), decode "
        f"{metrics['decode_tokens_per_s']:,.1f} tok/s ({timing})"
        + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
    )
    return metrics, check


def _e2e_result(
    name: str, source: str, options: BenchOptions, dtype: torch.dtype,
    dense: tuple[dict, Tensor], compressed: tuple[dict, Tensor], twin: dict | None,
) -> dict:  # fmt: skip
    (d, d_logits), (c, c_logits) = dense, compressed

    def ratio(key: str) -> float | None:
        return None if not d[key] or c[key] is None else c[key] / d[key]

    return {
        "name": name,
        "source": source,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": options.batch,
        "prompt_len": options.prompt_len,
        "decode_steps": options.decode_steps,
        "twin": twin,
        "dense": d,
        "compressed": c,
        "prefill_speedup": ratio("prefill_tokens_per_s"),
        "decode_speedup": ratio("decode_tokens_per_s"),
        "peak_memory_ratio": ratio("peak_memory_bytes"),
        "weights_ratio": ratio("weights_bytes"),
        "same_timing": d["decode_timing"] == c["decode_timing"]
        and d.get("prefill_timing") == c.get("prefill_timing"),
        "logits_rel_err": rel_err(c_logits, d_logits),
        "top1_agreement": float((c_logits.argmax(-1) == d_logits.argmax(-1)).float().mean()),
    }


def _prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def e2e_random(options: BenchOptions, device: torch.device, log: Log | None = None) -> dict:
    """The E2E_SHAPES model `options.e2e_shape` with random weights against its compressed twin
    (every FFN split in place: random heavy set kept fp16, the rest `options.light` with RTN).
    fp16 on a GPU, fp32 on the CPU."""
    log = log or (lambda message: None)
    name = options.e2e_shape
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    length = options.prompt_len + options.decode_steps
    log(f"end-to-end {name}: building the random-weight model on {device}")
    torch.manual_seed(options.seed)
    model = random_llama(name, device, dtype, max_positions=length)
    prompt = _prompt(options.batch, options.prompt_len, model.config.vocab_size, options.seed,
                     device)  # fmt: skip
    measure = {"decode_steps": options.decode_steps, "graphs": options.graphs,
               "kernels": options.decoder_kernels, "log": log}  # fmt: skip
    log(f"end-to-end {name}: dense")
    dense = measure_model(model, prompt, **measure)
    light = options.light_format
    log(f"end-to-end {name}: splitting every FFN ({options.heavy_fraction:.0%} random heavy, "
        f"{light.label()} RTN)")  # fmt: skip
    plan = random_plan(model, heavy_fraction=options.heavy_fraction, light=light,
                       seed=options.seed, heavy_dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    split_model_(model, plan)
    log(f"end-to-end {name}: compressed")
    compressed = measure_model(model, prompt, **measure)
    twin = {"heavy_fraction": options.heavy_fraction, "heavy_selection": "random",
            "heavy_dtype": plan.layers[0].heavy_dtype, "light": light.label(),
            "method": "rtn"}  # fmt: skip
    del model
    _free(device)
    source = f"{name} shape, random weights"
    return _e2e_result(name, source, options, dtype, dense, compressed, twin)


def e2e_against(options: BenchOptions, device: torch.device, log: Log | None = None) -> dict:
    """The compressed folder `options.model` against its dense original `options.against`,
    loaded one at a time (fp16 on a GPU, fp32 on the CPU)."""
    log = log or (lambda message: None)
    folder = _require_compressed(options.model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    measure = {"decode_steps": options.decode_steps, "graphs": options.graphs,
               "kernels": options.decoder_kernels, "log": log}  # fmt: skip
    log(f"end-to-end: dense {options.against}")
    model = _open_model(options.against, device, dtype, options.trust_remote_code)
    vocab = model.config.get_text_config().vocab_size
    prompt = _prompt(options.batch, options.prompt_len, vocab, options.seed, device)
    dense = measure_model(model, prompt, **measure)
    del model
    _free(device)
    log(f"end-to-end: compressed {options.model}")
    model = _open_model(str(folder), device, dtype, False)
    if model.config.get_text_config().vocab_size != vocab:
        raise OptionError(
            f"{options.model} and {options.against} have different vocabularies: --against "
            "takes the model the folder was compressed from"
        )
    compressed = measure_model(model, prompt, **measure)
    del model
    _free(device)
    name = f"{folder.name} vs {options.against}"
    return _e2e_result(name, name, options, dtype, dense, compressed, None)


# ---------------------------------------------------------------------------------------------
# Run and report


def environment(device: torch.device, command: str = "") -> dict:
    """Card, versions, date and command of a run."""
    import transformers
    import triton

    info = {
        "bench_format": BENCH_FORMAT,
        "device": str(device),
        "smoke": device.type != "cuda",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, sms=props.multi_processor_count,
                    l2_mb=getattr(props, "L2_cache_size", 0) / 2**20,
                    memory_gib=props.total_memory / 2**30)  # fmt: skip
    else:
        cpu = platform.processor() or platform.machine()
        info["card"] = f"CPU {cpu} ({torch.get_num_threads()} threads)"
    return info


def run_bench(
    options: BenchOptions,
    log: Log | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Every benchmark `options` asks for; returns the JSON-able payload (see write_outputs).

    `checkpoint(payload)` is called after each layer case and end-to-end run (e.g. to save the
    results so far, should a time limit stop the run)."""
    log = log or (lambda message: None)
    checkpoint = checkpoint or (lambda payload: None)
    if options.model is not None:
        _require_compressed(options.model)
    device = bench_device(options.device)
    payload = environment(device, options.command)
    payload["settings"] = {
        "ms": list(options.ms), "light": options.light, "heavy_fraction": options.heavy_fraction,
        "copies": options.copies, "repeats": options.repeats, "graphs": options.graphs,
        "batch": options.batch, "prompt_len": options.prompt_len,
        "decode_steps": options.decode_steps, "seed": options.seed,
        "decoder_kernels": options.decoder_kernels, "light_act": options.light_act,
        "decoder_projections": decoder_projections(device),
        "decoder_attention": decoder_attention(),
        "gemv_max_m": options.gemv_max_m if options.gemv_max_m is not None else tiles.GEMV_MAX_M,
    }  # fmt: skip
    payload.update(layers=[], e2e=[], notes=[])
    if payload["smoke"]:
        payload["notes"].append(f"{payload['card']}: smoke numbers, not timings to report")
    previous_gemv = tiles.GEMV_MAX_M
    if options.gemv_max_m is not None:
        tiles.GEMV_MAX_M = options.gemv_max_m
    torch.manual_seed(options.seed)
    try:
        if options.shapes or options.model:
            payload["copy_GBps"] = copy_bandwidth(device) / 1e9
            log(f"{payload['card']}: copy bandwidth {payload['copy_GBps']:.0f} GB/s (read + write)")
        layer_advice = "pass fewer --copies, smaller --m values or a smaller --shape"

        def run_case(make: Callable[[], LayerCase], what: str) -> None:
            with _out_of_memory(what, layer_advice, device):
                case = make()
                log(f"layer {case.label} ({len(case.copies)} weight copies)")
                payload["layers"].append(
                    bench_layer(case, options.ms, device, bandwidth=payload["copy_GBps"] * 1e9,
                                graphs=options.graphs, reps=options.repeats, log=log,
                                w4a8=options.light_act == "int8")
                )  # fmt: skip
                del case
            _free(device)
            checkpoint(payload)

        for shape in options.shapes:
            run_case(
                lambda shape=shape: shape_case(shape, options.heavy_fraction,
                                               options.light_format, device, options.copies),
                f"benchmarking the {shape} layer",
            )  # fmt: skip
        if options.model is not None:
            with _out_of_memory(f"loading {options.model}", layer_advice, device):
                cases, notes = model_cases(options.model, device, options.copies)
            payload["notes"] += notes
            while cases:
                case = cases.pop(0)
                run_case(lambda case=case: case, f"benchmarking {case.label}")
                del case
        e2e_advice = (
            "lower --batch or --prompt-len, choose a smaller --e2e-shape, or use a GPU with more "
            "memory"
        )
        if options.e2e_shape is not None:
            with _out_of_memory(f"running the {options.e2e_shape} model", e2e_advice, device):
                payload["e2e"].append(e2e_random(options, device, log))
            checkpoint(payload)
        if options.against is not None:
            with _out_of_memory(f"running {options.model} and {options.against}", e2e_advice,
                                device):  # fmt: skip
                payload["e2e"].append(e2e_against(options, device, log))
            checkpoint(payload)
    finally:
        tiles.GEMV_MAX_M = previous_gemv
    payload["tuning_us"] = tuning_timings()
    return payload


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def max_errors(case: dict) -> dict[str, float]:
    """Per method, the largest relative error against fp32 over every M."""
    errors: dict[str, float] = {}
    for row in case["rows"]:
        if row.get("rel_err") is not None:
            errors[row["method"]] = max(errors.get(row["method"], 0.0), row["rel_err"])
    return errors


def _versions(payload: dict) -> str:
    card = payload["card"] + (f" ({payload['sms']} SMs)" if payload.get("sms") else "")
    cuda = f", CUDA {payload['cuda']}" if payload.get("cuda") and not payload["smoke"] else ""
    return (f"{card}, torch {payload['torch']}, triton {payload['triton']}, transformers "
            f"{payload['transformers']}{cuda}")  # fmt: skip


def _layer_markdown(case: dict, payload: dict) -> list[str]:
    by = {(r["m"], r["method"]): r for r in case["rows"] if "us" in r}
    ms = sorted({r["m"] for r in case["rows"]})
    timing = "CUDA-graph replays" if any(
        r.get("timing") == "cuda-graph" for r in case["rows"]) else "eager runs"  # fmt: skip
    lines = [
        f"### Split FFN layer {case['label']} ({payload['date']})",
        "",
        f"{_versions(payload)}; copy bandwidth {payload['copy_GBps']:.0f} GB/s (read + write). "
        f"Command: `{payload['command']}`. Weight bytes: "
        + ", ".join(f"{k} {v / 1e6:.4g} MB" for k, v in case["weight_bytes"].items())
        + f". Medians of {timing} over {case['copies']} rotating weight copies (reference: eager)."
        + (" **Smoke run: not timings to report.**" if payload["smoke"] else ""),
        "",
        "| M | dense fp16 us | torch int4 us | ffnsplit us | reference us | ffnsplit vs dense "
        "| ffnsplit GB/s | ffnsplit x floor | kernel A us (x floor) | kernel B us (x floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def us(m: int, method: str) -> str:
        return _fmt(by[(m, method)]["us"]) if (m, method) in by else "-"

    def with_floor(m: int, method: str) -> str:
        row = by.get((m, method))
        return "-" if row is None else f"{row['us']:.1f} ({row['x_floor']:.2f})"

    for m in ms:
        split = by.get((m, "ffnsplit"))
        lines.append(
            f"| {m} | {us(m, 'dense')} | {us(m, 'torch_int4')} | {us(m, 'ffnsplit')} | "
            f"{us(m, 'reference')} | {_fmt(split and split['vs_dense'], '.2f', 'x')} | "
            f"{_fmt(split and split['GBps'], '.0f')} | {_fmt(split and split['x_floor'], '.2f')} "
            f"| {with_floor(m, 'kernel_A')} | {with_floor(m, 'kernel_B')} |"
        )
    w4 = [by[(m, W4A8_METHOD)] for m in ms if (m, W4A8_METHOD) in by]
    if w4:
        lines += ["", f"{W4A8_METHOD} (int8 light activations): " + ", ".join(
            f"M = {r['m']} {r['us']:.1f} us ({_fmt(r['vs_dense'], '.2f', 'x')} dense, path "
            f"{r.get('path', '?')})" for r in w4) + "."]  # fmt: skip
    errors = max_errors(case)
    lines += ["", "Checks (largest relative error vs fp32 over M): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + "."]  # fmt: skip
    failures = [f"M={r['m']} {r['method']}: {r['error']}" for r in case["rows"] if "error" in r]
    for note in case["notes"] + failures:
        lines.append(f"Note: {note}.")
    return lines + [""]


def _e2e_markdown(run: dict, payload: dict) -> list[str]:
    d, c = run["dense"], run["compressed"]
    twin = run["twin"]
    what = (f"compressed twin: every FFN split in place, {twin['heavy_fraction']:.0%} random heavy "
            f"neurons {twin['heavy_dtype']} + {twin['light']} ({twin['method'].upper()})") if twin else (
            "compressed model against its dense original")  # fmt: skip
    lines = [
        f"### End-to-end: {run['source']}, batch {run['batch']}, prompt {run['prompt_len']}, "
        f"{run['decode_steps']} decode steps ({payload['date']})",
        "",
        f"{_versions(payload)}. Command: `{payload['command']}`. {run['dtype']}; {what}. Prefill: "
        f"one forward of the prompt ({d.get('prefill_timing', 'eager')} dense, "
        f"{c.get('prefill_timing', 'eager')} compressed); decode: greedy steps over a static KV "
        f"cache ({d['decode_timing']} dense, {c['decode_timing']} compressed); medians."
        + (" **Smoke run: not timings to report.**" if payload["smoke"] else ""),
        "",
        "| model | weights GiB | FFN GiB | prefill tok/s | decode tok/s | decode ms/step "
        "| peak GPU GiB |",
        "|---|---|---|---|---|---|---|",
    ]

    def gib(value: float | None) -> str:
        return _fmt(None if value is None else value / 2**30, ".2f")

    for label, m in (("dense", d), ("compressed", c)):
        lines.append(
            f"| {label} | {gib(m['weights_bytes'])} | {gib(m['ffn_bytes'])} | "
            f"{m['prefill_tokens_per_s']:,.0f} | {m['decode_tokens_per_s']:,.1f} | "
            f"{m['decode_ms_per_step']:.2f} | {gib(m['peak_memory_bytes'])} |"
        )
    lines.append(
        f"| compressed / dense | {_fmt(run['weights_ratio'], '.2f', 'x')} | - | "
        f"{_fmt(run['prefill_speedup'], '.2f', 'x')} | {_fmt(run['decode_speedup'], '.3f', 'x')} "
        f"| - | {_fmt(run['peak_memory_ratio'], '.2f', 'x')} |"
    )
    lines += ["", logits_line(run) + ".", ""]
    return lines


def logits_line(run: dict) -> str:
    """How far the compressed model's logits are from the dense one's (first prompt tokens); for
    a random-weight model, why that says nothing about quality."""
    line = (f"compressed vs dense logits (first prompt tokens): relative error "
            f"{run['logits_rel_err']:.2e}, top-1 agreement {run['top1_agreement']:.1%}")  # fmt: skip
    if "random weights" in run.get("source", ""):
        line += (" (random weights: RTN int4 of Gaussian matrices errs ~10% a matrix and a random "
                 "stack compounds it, so this only shows the split model runs; `ffnsplit eval` "
                 "measures quality on real models)")  # fmt: skip
    return line


def markdown(payload: dict) -> str:
    """A markdown section per layer case and per end-to-end run, with card, versions, date
    and the command that reproduces them."""
    lines: list[str] = []
    for case in payload["layers"]:
        lines += _layer_markdown(case, payload)
    for run in payload["e2e"]:
        lines += _e2e_markdown(run, payload)
    lines += [f"Note: {note}." for note in payload["notes"] if "smoke" not in note]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_outputs(
    payload: dict,
    json_path: str | os.PathLike | None = None,
    append: str | os.PathLike | None = None,
) -> None:
    """JSON of the whole payload, and/or its markdown appended to a results file (atomic)."""
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(payload, indent=1) + "\n")
    if append is not None:
        path = Path(append)
        old = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
        atomic_write_text(path, old.rstrip("\n") + "\n\n" + markdown(payload))
