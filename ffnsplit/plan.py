"""Split plans: which neurons of each FFN stay dense (heavy), which are compressed (light) and how.

Pure logic over a profile (no model): `make_plan` picks a heavy set per layer by a fixed fraction
or output-norm share; `plan_for_budget` allocates a heavy fraction, a heavy dtype (dense or int8)
and a light format per layer to fit a byte budget at the least estimated output error.
`plan_ffn_bytes` is the exact size of what `SplitFFN` stores for a plan (the zero neurons that pad
quantized parts to a multiple of 32 counted).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from ffnsplit.compress.quant import quantized_nbytes
from ffnsplit.errors import CheckpointError, OptionError
from ffnsplit.fsutil import atomic_write_text
from ffnsplit.kernels.format import PACK_ALIGN, SUPPORTED_BITS

PLAN_VERSION = 1
LIGHT_FORMAT_VERSION = 1
LIGHT_KINDS = ("quant", "lowrank", "dense", "pruned")
METHODS = ("rtn", "gptq")
SELECTIONS = ("output_norm", "weight_norm", "random", "none")
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HEAVY_DTYPES = (*DENSE_DTYPES, "int8")  # int8: per-channel symmetric, see HEAVY_INT8
SCALE_DTYPE = torch.float16  # quantization scales and zero points are stored in fp16


@dataclass(frozen=True)
class LightFormat:
    """How the light neurons of one FFN are stored (validated on construction).

    kind: "quant" (group quantization: bits, group_size (-1 = one group per channel), symmetric,
    method "rtn" or "gptq"), "lowrank" (truncated SVD of up, gate and down: `rank`, or
    `rank_fraction` of min(light neurons, hidden size); `weighted` = activation-weighted SVD),
    "dense" (kept in the heavy dtype: no compression) or "pruned" (removed outright).
    """

    kind: str = "quant"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    rank: int | None = None
    rank_fraction: float | None = None
    weighted: bool = False
    version: int = LIGHT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version > LIGHT_FORMAT_VERSION:
            raise OptionError(
                f"light format version {self.version} is newer than this ffnsplit reads "
                f"({LIGHT_FORMAT_VERSION}): upgrade ffnsplit"
            )
        if self.kind not in LIGHT_KINDS:
            raise OptionError(
                f"unknown light format kind {self.kind!r}: choose one of {', '.join(LIGHT_KINDS)}"
            )
        if self.kind == "quant":
            if self.bits not in SUPPORTED_BITS:
                raise OptionError(
                    f"unsupported bit width {self.bits}: choose one of "
                    f"{', '.join(map(str, SUPPORTED_BITS))}"
                )
            if self.group_size != -1 and (self.group_size <= 0 or self.group_size % PACK_ALIGN):
                raise OptionError(
                    f"group size {self.group_size} is not a multiple of {PACK_ALIGN}: use 32, 64, "
                    "128, ... (or intB-pc for one group per channel)"
                )
            if self.method not in METHODS:
                raise OptionError(
                    f"unknown quantization method {self.method!r}: choose one of "
                    f"{', '.join(METHODS)}"
                )
        if self.kind == "lowrank":
            if (self.rank is None) == (self.rank_fraction is None):
                raise OptionError(
                    "a low-rank light format needs exactly one of rank, rank_fraction"
                )
            if self.rank is not None and self.rank < 1:
                raise OptionError(f"low-rank rank must be >= 1, got {self.rank}")
            if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
                raise OptionError(f"rank fraction must lie in (0, 1], got {self.rank_fraction}")

    def label(self) -> str:
        """Short name, e.g. `int4-g128`, `int3-g64-sym-gptq`, `int8-pc`, `lowrank-r64-w`."""
        if self.kind == "quant":
            group = "pc" if self.group_size == -1 else f"g{self.group_size}"
            parts = [f"int{self.bits}", group]
            parts += ["sym"] if self.symmetric else []
            parts += [] if self.method == "rtn" else [self.method]
            return "-".join(parts)
        if self.kind == "lowrank":
            size = f"r{self.rank}" if self.rank is not None else f"{self.rank_fraction:g}"
            return f"lowrank-{size}" + ("-w" if self.weighted else "")
        return self.kind

    def light_rank(self, n_light: int, hidden_size: int) -> int:
        """The low-rank rank for `n_light` light neurons (0 when there are none)."""
        largest = min(n_light, hidden_size)
        if largest == 0:
            return 0
        if self.rank is not None:
            return min(self.rank, largest)
        return max(1, min(largest, round(self.rank_fraction * largest)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LightFormat:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"unknown light format field(s) {', '.join(unknown)}")
        return cls(**data)


HEAVY_INT8 = LightFormat(bits=8, group_size=-1, symmetric=True)
"""The format of an int8 heavy part: symmetric, one scale per output channel."""


def parse_light_format(text: str) -> LightFormat:
    """Parse a light format label: `int4-g128`, `int3-g64-sym-gptq`, `int8-pc`, `lowrank-r64`,
    `lowrank-0.25-w`, `dense`, `pruned` (the inverse of `LightFormat.label`)."""
    usage = (
        f"unknown light format {text!r}: use intB-gG[-sym][-gptq] (B in "
        f"{'/'.join(map(str, SUPPORTED_BITS))}, G a multiple of 32) or intB-pc[-sym][-gptq] (one "
        "group per channel), lowrank-rR[-w], lowrank-F[-w], dense or pruned"
    )
    parts = text.strip().lower().split("-")
    try:
        if parts == ["dense"] or parts == ["pruned"]:
            return LightFormat(kind=parts[0])
        if parts[0] == "lowrank" and len(parts) in (2, 3):
            if len(parts) == 3 and parts[2] != "w":
                raise OptionError(usage)
            size = parts[1]
            rank = int(size[1:]) if size.startswith("r") else None
            fraction = None if rank is not None else float(size)
            return LightFormat(
                kind="lowrank", rank=rank, rank_fraction=fraction, weighted=len(parts) == 3
            )
        if parts[0].startswith("int") and len(parts) >= 2 and parts[1][:1] in ("g", "p"):
            flags = parts[2:]
            if any(f not in ("sym", *METHODS) for f in flags) or len(set(flags)) != len(flags):
                raise OptionError(usage)
            method = next((f for f in flags if f in METHODS), "rtn")
            group = -1 if parts[1] in ("pc", "gpc") else int(parts[1][1:])
            return LightFormat(
                bits=int(parts[0][3:]), group_size=group, symmetric="sym" in flags, method=method
            )
    except ValueError:
        raise OptionError(usage) from None
    raise OptionError(usage)


@dataclass(frozen=True)
class FFNGeometry:
    """What the byte model needs to know of a model's FFNs besides the plan."""

    hidden_size: int
    gated: bool
    up_bias: bool = False
    gate_bias: bool = False
    down_bias: bool = False

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FFNGeometry:
        return cls(**data)


@dataclass
class LayerPlan:
    """One FFN's split: original neuron indices, heavy ones sorted by score (hottest first).

    heavy_dtype: float16 / bfloat16 / float32 (dense), or int8 (HEAVY_INT8: per-channel
    symmetric), which also sets the dtype of biases and low-rank factors (float16 for int8)."""

    layer: int
    heavy_idx: list[int]
    light_idx: list[int]
    pruned_idx: list[int]
    light: LightFormat
    heavy_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_heavy(self.heavy_dtype, self.light)

    @property
    def n_heavy(self) -> int:
        return len(self.heavy_idx)

    @property
    def n_light(self) -> int:
        return len(self.light_idx)

    @property
    def intermediate_size(self) -> int:
        return len(self.heavy_idx) + len(self.light_idx) + len(self.pruned_idx)

    def permutation(self) -> torch.Tensor:
        """New order [heavy | light | pruned]: new neuron j is original neuron perm[j]."""
        return torch.tensor(self.heavy_idx + self.light_idx + self.pruned_idx, dtype=torch.long)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "heavy_idx": list(self.heavy_idx),
            "light_idx": list(self.light_idx),
            "pruned_idx": list(self.pruned_idx),
            "light": self.light.to_dict(),
            "heavy_dtype": self.heavy_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        return cls(
            layer=int(data["layer"]),
            heavy_idx=[int(i) for i in data["heavy_idx"]],
            light_idx=[int(i) for i in data["light_idx"]],
            pruned_idx=[int(i) for i in data["pruned_idx"]],
            light=LightFormat.from_dict(data["light"]),
            heavy_dtype=str(data["heavy_dtype"]),
        )


@dataclass
class SplitPlan:
    """A split of every FFN of one model (identified by its fingerprint)."""

    layers: list[LayerPlan]
    selection: str
    fingerprint: dict
    geometry: FFNGeometry
    profile_meta: dict = field(default_factory=dict)
    seed: int = 0
    budget: dict | None = None  # plan_for_budget's target and estimate
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise OptionError(
                f"unknown heavy selection {self.selection!r}: choose one of {', '.join(SELECTIONS)}"
            )

    def permutation(self, layer: int) -> torch.Tensor:
        return self.layers[layer].permutation()

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "selection": self.selection,
            "fingerprint": self.fingerprint,
            "geometry": self.geometry.to_dict(),
            "profile_meta": self.profile_meta,
            "seed": self.seed,
            "budget": self.budget,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, one line per layer."""
        head = {k: v for k, v in self.to_dict().items() if k != "layers"}
        lines = [json.dumps(layer.to_dict(), sort_keys=True) for layer in self.layers]
        body = json.dumps(head, sort_keys=True, indent=1)[:-2]
        return body + ',\n "layers": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"

    @classmethod
    def from_dict(cls, data: dict) -> SplitPlan:
        """Rebuild and validate a plan; anything malformed is a one-line CheckpointError."""
        if not isinstance(data, dict):
            raise CheckpointError("plan is malformed: expected a JSON object")
        version = data.get("version")
        if not isinstance(version, int):
            raise CheckpointError("plan is malformed: no integer 'version'")
        if version > PLAN_VERSION:
            raise CheckpointError(
                f"plan written by ffnsplit plan format {version}, this ffnsplit reads <= "
                f"{PLAN_VERSION}: upgrade ffnsplit"
            )
        try:
            plan = cls(
                layers=[LayerPlan.from_dict(layer) for layer in data["layers"]],
                selection=data["selection"],
                fingerprint=dict(data["fingerprint"]),
                geometry=FFNGeometry.from_dict(data["geometry"]),
                profile_meta=dict(data.get("profile_meta") or {}),
                seed=int(data.get("seed", 0)),
                budget=data.get("budget"),
                version=version,
            )
        except KeyError as missing:
            raise CheckpointError(f"plan is malformed: missing key {missing}") from None
        except (TypeError, ValueError, OptionError) as exc:
            raise CheckpointError(f"plan is malformed: {exc}") from None
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str) -> SplitPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"plan is not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        return cls.from_dict(data)

    def validate(self) -> None:
        """Check layer numbering and that each layer's indices permute range(I)."""
        sizes = self.fingerprint.get("intermediate_sizes")
        if sizes is not None and len(sizes) != len(self.layers):
            raise CheckpointError(
                f"plan has {len(self.layers)} layers but its model has {len(sizes)} FFNs"
            )
        for index, layer in enumerate(self.layers):
            if layer.layer != index:
                raise CheckpointError(f"plan layer {index} is numbered {layer.layer}")
            size = layer.intermediate_size if sizes is None else int(sizes[index])
            perm = layer.heavy_idx + layer.light_idx + layer.pruned_idx
            if sorted(perm) != list(range(size)):
                raise CheckpointError(
                    f"plan layer {index}: heavy, light and pruned indices are not a permutation "
                    f"of range({size}): the plan is corrupt"
                )


def load_plan(path: str) -> SplitPlan:
    """Read and validate a plan.json."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read plan {path}: {exc.strerror}") from None
    try:
        return SplitPlan.from_json(text)
    except CheckpointError as exc:  # which file, and what to do
        raise CheckpointError(f"{path}: {exc}; compress the model again") from None


def save_plan(plan: SplitPlan, path: str) -> None:
    """Write plan.json atomically."""
    atomic_write_text(path, plan.to_json())


# ---------------------------------------------------------------------------------------------
# Byte model


def stored_light(n_light: int, light: LightFormat) -> int:
    """Light neurons stored beside the heavy part: a quantized light part is zero-padded to a
    multiple of 32, a dense one joins the heavy part, a pruned one is gone."""
    if light.kind == "quant":
        return _pad(n_light)
    return n_light if light.kind == "lowrank" else 0


def stored_heavy(n_heavy: int, n_light: int, light: LightFormat, heavy_dtype: str) -> int:
    """Heavy neurons as stored: an int8 heavy part is zero-padded to a multiple of 32; a dense
    light part is kept with a dense heavy part."""
    if heavy_dtype == "int8":
        return _pad(n_heavy)
    return n_heavy + (n_light if light.kind == "dense" else 0)


def _pad(count: int) -> int:
    return -(-count // PACK_ALIGN) * PACK_ALIGN


def dense_dtype(heavy_dtype: str) -> torch.dtype:
    """The dtype of the dense tensors (dense heavy part, biases, low-rank factors)."""
    return DENSE_DTYPES.get(heavy_dtype, torch.float16)


def group_for(light: LightFormat, k: int) -> int:
    """The packed-format group size for input dimension K (-1 = per channel -> K)."""
    return k if light.group_size == -1 else light.group_size


def _quantized_ffn_bytes(neurons: int, light: LightFormat, geometry: FFNGeometry) -> int:
    """Bytes of `neurons` FFN neurons quantized in format `light` (up, gate rows; down columns)."""
    if not neurons:
        return 0
    hidden = geometry.hidden_size
    row = quantized_nbytes(
        neurons, hidden, light.bits, group_for(light, hidden), light.symmetric, SCALE_DTYPE
    )
    column = quantized_nbytes(
        hidden, neurons, light.bits, group_for(light, neurons), light.symmetric, SCALE_DTYPE
    )
    return (geometry.matrices - 1) * row + column


def layer_ffn_bytes(
    n_heavy: int, n_light: int, light: LightFormat, heavy_dtype: str, geometry: FFNGeometry
) -> int:
    """Bytes SplitFFN stores for one FFN: heavy part, light part, biases (dense dtype)."""
    hidden = geometry.hidden_size
    item = dense_dtype(heavy_dtype).itemsize
    heavy = stored_heavy(n_heavy, n_light, light, heavy_dtype)
    extra = stored_light(n_light, light)
    if heavy_dtype == "int8":
        total = _quantized_ffn_bytes(heavy, HEAVY_INT8, geometry)
    else:
        total = geometry.matrices * heavy * hidden * item
    if light.kind == "quant":
        total += _quantized_ffn_bytes(extra, light, geometry)
    elif light.kind == "lowrank":
        total += geometry.matrices * light.light_rank(n_light, hidden) * (n_light + hidden) * item
    biases = int(geometry.up_bias) + int(geometry.gate_bias and geometry.gated)
    total += biases * (heavy + extra) * item
    total += int(geometry.down_bias) * hidden * item
    return total


def plan_ffn_bytes(plan: SplitPlan) -> list[int]:
    """Per-layer bytes of the SplitFFN tensors the plan produces (exactly what is saved)."""
    return [
        layer_ffn_bytes(layer.n_heavy, layer.n_light, layer.light, layer.heavy_dtype, plan.geometry)
        for layer in plan.layers
    ]


def dense_ffn_weights(plan: SplitPlan) -> int:
    """Number of FFN weights of the dense model (biases excluded)."""
    mats = plan.geometry.matrices
    return sum(mats * layer.intermediate_size * plan.geometry.hidden_size for layer in plan.layers)


def dense_ffn_bytes(geometry: FFNGeometry, intermediate_sizes: Sequence[int]) -> int:
    """Bytes of the dense FFNs in fp16, biases included (the reference of `target_size`)."""
    dense = LightFormat(kind="dense")
    return sum(layer_ffn_bytes(0, size, dense, "float16", geometry) for size in intermediate_sizes)


def average_bits(plan: SplitPlan) -> float:
    """FFN bytes * 8 / dense FFN weight count: stored bits per FFN weight, all overheads in."""
    return 8 * sum(plan_ffn_bytes(plan)) / dense_ffn_weights(plan)


# ---------------------------------------------------------------------------------------------
# Plans from a profile


_PROFILE_META_KEYS = ("corpus", "tokens", "n_blocks", "seq_len", "topk_fraction", "dtype")


def _profile_meta(profile) -> dict:
    """What produced the profile (corpus, token count, ...), kept in the plan for the record."""
    return {key: profile.meta[key] for key in _PROFILE_META_KEYS if key in profile.meta}


def _heavy_count(profile, layer: int, fraction: float | None, share: float | None) -> int:
    """Heavy neurons of a layer: ceil(fraction * I), or the fewest carrying `share` of the
    layer's output norm (the profile's convention, so every tool counts alike)."""
    return int(profile.heavy_indices(layer, fraction=fraction, share=share).numel())


def _selection_orders(
    profile, selection: str, weight_norms: Sequence[torch.Tensor] | None, seed: int
) -> list[torch.Tensor]:
    """Per layer, all neurons from most to least preferred for the heavy set.

    output_norm: the profile's mean output norm (FFSplit). weight_norm: `weight_norms` when given
    (apply.weight_norm_scores), else the profile's down-column norms. random: seeded. none: any
    order (no heavy set is taken).
    """
    count = profile.num_layers
    if weight_norms is not None and len(weight_norms) != count:
        raise OptionError(f"weight_norms has {len(weight_norms)} layers, the profile has {count}")
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for layer in range(count):
        size = profile.layers[layer].intermediate_size
        if selection == "random":
            orders.append(torch.randperm(size, generator=generator))
            continue
        if selection == "weight_norm" and weight_norms is not None:
            scores = torch.as_tensor(weight_norms[layer]).flatten()
            if scores.numel() != size:
                raise OptionError(
                    f"weight_norms[{layer}] has {scores.numel()} entries, layer {layer} has "
                    f"{size} neurons"
                )
        else:
            scores = profile.score(
                layer, "weight_norm" if selection == "weight_norm" else "out_norm"
            )
        orders.append(torch.argsort(scores.to(torch.float64), descending=True, stable=True))
    return orders


def _layer_plan(
    layer: int,
    order: torch.Tensor,
    n_heavy: int,
    n_prune: int,
    scores: torch.Tensor,
    light: LightFormat,
    heavy_dtype: str,
) -> LayerPlan:
    heavy = order[:n_heavy]
    rest = torch.sort(order[n_heavy:]).values
    if n_prune:
        # The coldest remaining neurons by output norm are removed outright.
        coldest = torch.argsort(scores[rest], stable=True)[:n_prune]
        keep = torch.ones(rest.numel(), dtype=torch.bool)
        keep[coldest] = False
        pruned, rest = torch.sort(rest[~keep]).values, rest[keep]
    else:
        pruned = rest[:0]
    return LayerPlan(
        layer=layer,
        heavy_idx=heavy.tolist(),
        light_idx=rest.tolist(),
        pruned_idx=pruned.tolist(),
        light=light,
        heavy_dtype=heavy_dtype,
    )


def _check_geometry_fits(geometry: FFNGeometry, light: LightFormat) -> None:
    if light.kind == "quant" and geometry.hidden_size % PACK_ALIGN:
        raise OptionError(
            f"hidden size {geometry.hidden_size} is not a multiple of {PACK_ALIGN}: quantized "
            "light parts need it; use a lowrank, dense or pruned light format"
        )


def make_plan(
    profile,
    *,
    geometry: FFNGeometry,
    light: LightFormat,
    heavy_fraction: float | None = None,
    heavy_share: float | None = None,
    prune_fraction: float = 0.0,
    selection: str = "output_norm",
    weight_norms: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    heavy_dtype: str = "float16",
) -> SplitPlan:
    """One light format everywhere; per layer a heavy set chosen by `selection`.

    The heavy count is `heavy_fraction` of the layer's neurons, or the fewest neurons carrying
    `heavy_share` of its output norm (for the baselines `weight_norm` / `random` the count is the
    same, only the set differs). `selection="none"` is the uniform baseline: no heavy neurons.
    `prune_fraction` of the layer's neurons, the coldest light ones by output norm, are removed.
    `geometry` is `apply.ffn_geometry(model)`.
    """
    _check_selection(selection)
    if selection == "none":
        if heavy_fraction or heavy_share:
            raise OptionError(
                "the uniform baseline keeps no heavy neurons: drop --heavy-fraction / "
                "--heavy-share (or use another --baseline)"
            )
        heavy_fraction, heavy_share = 0.0, None
    elif (heavy_fraction is None) == (heavy_share is None):
        raise OptionError("give exactly one of heavy_fraction, heavy_share")
    if heavy_fraction is not None and not 0 <= heavy_fraction <= 1:
        raise OptionError(f"heavy fraction must lie in [0, 1], got {heavy_fraction}")
    if heavy_share is not None and not 0 < heavy_share <= 1:
        raise OptionError(f"heavy share must lie in (0, 1], got {heavy_share}")
    if not 0 <= prune_fraction < 1:
        raise OptionError(f"prune fraction must lie in [0, 1), got {prune_fraction}")
    _check_heavy(heavy_dtype, light)
    _check_geometry_fits(geometry, light)
    orders = _selection_orders(profile, selection, weight_norms, seed)
    layers = []
    for layer, order in enumerate(orders):
        size = order.numel()
        n_heavy = _heavy_count(profile, layer, heavy_fraction, heavy_share)
        n_prune = min(size, math.ceil(prune_fraction * size - 1e-9))
        if n_prune > size - n_heavy:
            raise OptionError(
                f"layer {layer}: cannot prune {n_prune} neurons, only {size - n_heavy} are light: "
                "lower the prune fraction or the heavy fraction"
            )
        scores = profile.score(layer, "out_norm")
        layers.append(_layer_plan(layer, order, n_heavy, n_prune, scores, light, heavy_dtype))
    return SplitPlan(
        layers=layers,
        selection=selection,
        fingerprint=dict(profile.fingerprint),
        geometry=geometry,
        profile_meta=_profile_meta(profile),
        seed=seed,
    )


def _check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise OptionError(
            f"unknown heavy selection {selection!r}: choose one of {', '.join(SELECTIONS)}"
        )


def _check_heavy(heavy_dtype: str, light: LightFormat) -> None:
    if heavy_dtype not in HEAVY_DTYPES:
        raise OptionError(
            f"unknown heavy dtype {heavy_dtype!r}: choose one of {', '.join(HEAVY_DTYPES)}"
        )
    if heavy_dtype == "int8" and light.kind == "dense":
        raise OptionError("an int8 heavy part with a dense light part makes no sense: use float16")


# ---------------------------------------------------------------------------------------------
# Budget mode

DEFAULT_HEAVY_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4)
DEFAULT_LIGHT_FORMATS = tuple(
    LightFormat(bits=bits, group_size=group) for bits in (2, 3, 4, 8) for group in (32, 64, 128)
)


@dataclass(frozen=True)
class Candidate:
    """One per-layer choice of budget mode: a heavy fraction (dense, or int8 when `heavy_int8`)
    and a light format."""

    heavy_fraction: float
    light: LightFormat
    heavy_int8: bool = False

    def label(self) -> str:
        if self.light.kind == "dense":
            return "dense"
        heavy = "-int8" if self.heavy_int8 else ""
        return f"{self.light.label()}+{self.heavy_fraction:.4g}heavy{heavy}"


def default_candidates() -> list[Candidate]:
    """Light int{2,3,4,8} x g{32,64,128} with no heavy part, or with 1/32, 1/16, 1/8 or 1/4 of
    the neurons heavy in the dense dtype or in int8; plus the dense FFN."""
    grid = [Candidate(0.0, light) for light in DEFAULT_LIGHT_FORMATS]
    grid += [
        Candidate(fraction, light, heavy_int8)
        for fraction in DEFAULT_HEAVY_FRACTIONS[1:]
        for heavy_int8 in (False, True)
        for light in DEFAULT_LIGHT_FORMATS
        if not (heavy_int8 and light.bits == 8)  # int8 heavy over int8 light gains nothing
    ]
    return [*grid, Candidate(0.0, LightFormat(kind="dense"))]


def candidate_formats(candidates: Sequence[Candidate]) -> list[LightFormat]:
    """The quantized formats whose errors budget mode needs measured (apply.measure_errors)."""
    formats = {c.light.label(): c.light for c in candidates if c.light.kind == "quant"}
    if any(c.heavy_int8 for c in candidates):
        formats[HEAVY_INT8.label()] = HEAVY_INT8
    return list(formats.values())


NeuronErrors = dict[str, torch.Tensor]
"""Per layer: format label (or "pruned") -> [I], neuron i's estimated contribution to the
model's output error when it is stored in that format (apply.measure_errors)."""


def analytic_rel_error(light: LightFormat, k: int) -> float:
    """Relative squared RTN error of a Gaussian row quantized in groups (fallback estimate).

    A group of g Gaussian weights spans about 2 sigma sqrt(2 ln g); rounding to a uniform grid of
    2^b - 1 steps over that span adds noise of variance step^2 / 12.
    """
    group = min(group_for(light, k), k)
    span = 2 * math.sqrt(2 * math.log(max(group, 2)))
    levels = 2**light.bits - (2 if light.symmetric else 1)
    return (span / levels) ** 2 / 12


def neuron_weights(profile, layer: int) -> torch.Tensor:
    """Each neuron's share of its layer's squared output norm, out_norm_mean_i^2 / sum ([I]).

    The squared mean output norm stands for neuron i's output energy (a second moment would be
    dominated by the rare tokens, BOS, that carry massive activations); shares are compared
    across layers because the FFN outputs grow with depth while what later layers see is
    normalised.
    """
    energy = profile.score(layer, "out_norm").to(torch.float64) ** 2
    total = float(energy.sum())
    return energy / total if total > 0 else energy


def _neuron_errors(
    light: LightFormat,
    geometry: FFNGeometry,
    weights: torch.Tensor,
    measured: NeuronErrors | None,
) -> torch.Tensor:
    """Each neuron's error contribution if it is stored in format `light` ([I], float64)."""
    if light.kind == "dense":
        return torch.zeros_like(weights)
    label = "pruned" if light.kind == "pruned" else light.label()
    if light.kind not in ("quant", "pruned"):
        raise OptionError(
            f"budget mode cannot estimate the error of {label}: use quant, dense or pruned"
        )
    if measured is not None:
        if label not in measured:
            raise OptionError(f"the measured errors lack format {label}: measure it too")
        return measured[label].to(torch.float64)
    if light.kind == "pruned":
        return weights
    up = analytic_rel_error(light, geometry.hidden_size) * (geometry.matrices - 1)
    return weights * (up + analytic_rel_error(light, weights.numel()))


def _choose(errors: list[torch.Tensor], costs: list[torch.Tensor], budget: float) -> list[int]:
    """Multiple-choice knapsack: per layer one candidate, sum(cost) <= budget, least error.

    Lagrangian relaxation (bisection on the price of a byte) finds the best allocation on the
    convex hull under the budget; a greedy pass then spends what is left on the upgrades that
    remove the most error per extra byte.
    """

    def pick(price: float) -> list[int]:
        choice = []
        for e, c in zip(errors, costs, strict=True):
            value = e + price * c
            best = value <= value.min() * (1 + 1e-12)  # ties go to the cheapest option
            choice.append(int(torch.argmin(torch.where(best, c, math.inf))))
        return choice

    def spent(choice: list[int]) -> float:
        return sum(float(c[i]) for c, i in zip(costs, choice, strict=True))

    low, high = 0.0, 1.0
    while spent(pick(high)) > budget and high < 1e300:
        high *= 16
    if spent(pick(low)) <= budget:
        high = low
    else:
        for _ in range(200):
            middle = (low + high) / 2
            if middle in (low, high):
                break
            if spent(pick(middle)) > budget:
                low = middle
            else:
                high = middle
    choice = pick(high)
    left = budget - spent(choice)
    while True:
        best, best_ratio = None, 0.0
        for layer, (e, c) in enumerate(zip(errors, costs, strict=True)):
            extra = c - c[choice[layer]]
            gain = e[choice[layer]] - e
            ok = (extra <= left) & (gain > 0)
            if not bool(ok.any()):
                continue
            ratio = torch.where(ok, gain / extra.clamp(min=1.0), -1.0)
            option = int(torch.argmax(ratio))
            if float(ratio[option]) > best_ratio:
                best, best_ratio = (layer, option), float(ratio[option])
        if best is None:
            return choice
        layer, option = best
        left -= float(costs[layer][option] - costs[layer][choice[layer]])
        choice[layer] = option


def plan_for_budget(
    profile,
    *,
    geometry: FFNGeometry,
    target_bits: float | None = None,
    target_size: float | None = None,
    candidates: Sequence[Candidate] | None = None,
    neuron_errors: Sequence[NeuronErrors] | None = None,
    selection: str = "output_norm",
    weight_norms: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    heavy_dtype: str = "float16",
) -> SplitPlan:
    """Per layer the (heavy fraction, heavy dtype, light format) that minimises the estimated
    output error of the whole model within a byte budget.

    Budget: `target_bits` average stored bits per FFN weight, or `target_size` a fraction of the
    dense fp16 FFN bytes. The estimated error of layer l with heavy set S in format G and light
    set L in format F adds per-neuron contributions (neurons and layers treated as independent):

        err(l) = sum_{i in S} E_i(G) + sum_{i in L} E_i(F)

    E_i(F) is measured when `neuron_errors` is given (apply.measure_errors): the first-order
    (Fisher) estimate of how much quantizing neuron i's up/gate rows and down column in F moves
    the model's predictions, from one forward and backward pass on calibration tokens; one unit
    for every layer, so no layer weighting is guessed (half of it predicts the KL a layer's
    quantization causes to within 20% on the tiny test models). A GPTQ candidate is estimated by
    its RTN error. Without measurements E_i(F) = w_i (e_up(F) + e_down(F)), w_i the neuron's
    output-energy share in its layer (`neuron_weights`) and e the relative weight errors of
    Gaussian weights (`analytic_rel_error`): much cruder, it weighs all layers alike and ignores
    that heavy neurons' rows are aligned with their inputs. A dense heavy part (`heavy_dtype`)
    and a dense light part count as error-free, an int8 heavy part as HEAVY_INT8, a pruned
    neuron loses its whole contribution.
    `selection` orders the heavy candidates; "none" keeps heavy fraction 0 only, which gives
    mixed-precision quantization without a split: the no-split baseline at equal bytes.
    """
    if (target_bits is None) == (target_size is None):
        raise OptionError("give exactly one of target_bits, target_size")
    _check_selection(selection)
    if heavy_dtype not in DENSE_DTYPES:
        raise OptionError(
            f"budget mode's dense heavy dtype must be one of {', '.join(DENSE_DTYPES)} (int8 "
            f"heavy parts are candidates of their own), got {heavy_dtype!r}"
        )
    count = profile.num_layers
    sizes = [stats.intermediate_size for stats in profile.layers]
    weights = sum(geometry.matrices * size * geometry.hidden_size for size in sizes)
    dense_bytes = dense_ffn_bytes(geometry, sizes)
    if target_bits is not None:
        budget, wanted = target_bits * weights / 8, f"target bits {target_bits:g}"
    else:
        budget, wanted = target_size * dense_bytes, f"target size {target_size:g}"
    options = list(candidates) if candidates is not None else default_candidates()
    if selection == "none":
        options = [c for c in options if c.heavy_fraction == 0]
    if not options:
        raise OptionError("budget mode needs at least one candidate")
    for option in options:
        _check_geometry_fits(geometry, option.light)
        _check_heavy("int8" if option.heavy_int8 else heavy_dtype, option.light)
        if not 0 <= option.heavy_fraction <= 1:
            raise OptionError(f"candidate heavy fraction {option.heavy_fraction} is not in [0, 1]")
    if neuron_errors is not None and len(neuron_errors) != count:
        raise OptionError(f"neuron_errors has {len(neuron_errors)} layers, the profile has {count}")
    orders = _selection_orders(profile, selection, weight_norms, seed)

    def dtype_of(option: Candidate) -> str:
        return "int8" if option.heavy_int8 else heavy_dtype

    errors, costs, heavy_counts = [], [], []
    for layer, order in enumerate(orders):
        measured = None if neuron_errors is None else neuron_errors[layer]
        size = sizes[layer]
        shares = neuron_weights(profile, layer)
        int8 = None
        if any(option.heavy_int8 for option in options):
            int8 = torch.cumsum(_neuron_errors(HEAVY_INT8, geometry, shares, measured)[order], 0)
        counts = [_heavy_count(profile, layer, option.heavy_fraction, None) for option in options]
        layer_errors, layer_costs = [], []
        for option, n_heavy in zip(options, counts, strict=True):
            per_neuron = _neuron_errors(option.light, geometry, shares, measured)[order]
            error = float(per_neuron[n_heavy:].sum())
            if option.heavy_int8 and n_heavy:
                error += float(int8[n_heavy - 1])
            layer_errors.append(error)
            layer_costs.append(
                layer_ffn_bytes(n_heavy, size - n_heavy, option.light, dtype_of(option), geometry)
            )
        errors.append(torch.tensor(layer_errors, dtype=torch.float64))
        costs.append(torch.tensor(layer_costs, dtype=torch.float64))
        heavy_counts.append(counts)

    lowest = sum(float(c.min()) for c in costs)
    highest = max(sum(float(c.max()) for c in costs), dense_bytes)
    if not lowest <= budget <= highest:
        raise OptionError(
            f"{wanted} cannot be met: these candidates give {8 * lowest / weights:.2f} to "
            f"{8 * highest / weights:.2f} average FFN bits ({lowest / dense_bytes:.3f} to "
            f"{highest / dense_bytes:.3f} of the dense fp16 FFN size)"
        )
    choice = _choose(errors, costs, budget)
    layers = [
        _layer_plan(
            layer,
            orders[layer],
            heavy_counts[layer][pick],
            0,
            profile.score(layer, "out_norm"),
            options[pick].light,
            dtype_of(options[pick]),
        )
        for layer, pick in enumerate(choice)
    ]
    return SplitPlan(
        layers=layers,
        selection=selection,
        fingerprint=dict(profile.fingerprint),
        geometry=geometry,
        profile_meta=_profile_meta(profile),
        seed=seed,
        budget={
            "target_bits": target_bits,
            "target_size": target_size,
            "budget_bytes": int(budget),
            "achieved_bytes": int(sum(float(c[i]) for c, i in zip(costs, choice, strict=True))),
            "estimated_error": sum(float(e[i]) for e, i in zip(errors, choice, strict=True)),
            "choices": [options[i].label() for i in choice],
        },
    )
