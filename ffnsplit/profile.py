"""Profile the FFN neurons of a model on calibration text: which few carry most of the output.

Definitions (per FFN layer with intermediate size I; every position of every calibration block is a
token t = 1..T, there is no padding). `a_t` in R^I is the input of the down projection for token t
(act(gate x) * up x, or act(up x)), taken in the dtype the model runs in and converted to float32
before any arithmetic; `c_i = ||W_down[:, i]||_2` is the norm of neuron i's down column, computed
once in float32. All sums are float32 running sums over every token.

- `out_norm_mean[i]`  = (1/T) sum_t |a_ti| c_i: mean norm of neuron i's contribution
  a_ti W_down[:, i] to the FFN output (the FFSplit heavy-hitter score).
- `abs_mean[i]`       = (1/T) sum_t |a_ti|
- `abs_max[i]`        = max_t |a_ti|
- `sq_mean[i]`        = (1/T) sum_t a_ti^2
- `topk_freq[i]`      = (1/T) #{t : i is among the k = ceil(topk_fraction * I) neurons with the
  largest |a_ti| c_i for token t} (exactly k per token; of neurons tied at the k-th largest
  value, the lowest indices are counted).
- `out_norm_mean_first_half` / `out_norm_mean_second_half`: `out_norm_mean` over the first
  floor(n_blocks / 2) calibration blocks / over the remaining blocks (disjoint token sets).
- `down_col_norm[i]`  = c_i.

Summaries: the *top-p share* of a layer is the sum of `out_norm_mean` over its ceil(p * I) largest
neurons divided by the sum over all I; the *overlap at p* is |A & B| / |A| where A and B are the
ceil(p * I) neurons with the largest `out_norm_mean_first_half` and `out_norm_mean_second_half`.

Statistics are gathered by forward pre-hooks on each FFN's down projection (always removed): on
CUDA by Triton kernels per FFN and batch (`kernels.profile_stats`, I <= its MAX_SIZE), elsewhere
by torch ops giving the same numbers. In normal mode the batches are those of a plain forward: a
batch that straddles the two calibration halves is split by rows in the hooks (sequential mode runs
each half in batches of its own). The sums of all FFNs of one
size live in one allocation, reduced and brought to the host once at the end of the run, where the
NaN/Inf check reads them (one sync per run; per layer in sequential mode): NaN/Inf stays in the
running sums, and the first layer holding it is named. A model larger than the GPU is run layer by layer (`sequential=True`): only one decoder layer
and the calibration activations are on the device at a time, as in llm-compressor's sequential
pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress, ProgressColumn, Task
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from ffnsplit import __version__
from ffnsplit.arch import (
    FFNBlock,
    decoder_layers,
    fingerprint_id,
    fingerprint_matches,
    get_ffn_blocks,
    model_fingerprint,
)
from ffnsplit.errors import CheckpointError, NumericalError, OptionError
from ffnsplit.fsutil import atomic_path
from ffnsplit.runtime import dtype_name, resolve_device, resolve_dtype

PROFILE_FORMAT_VERSION = 1
HEADER_KEY = "ffnsplit"
PROFILE_KIND = "ffnsplit-profile"
SHARE_FRACTIONS = (0.01, 0.05, 0.10)

DEFINITIONS: dict[str, str] = {
    "out_norm_mean": "(1/T) sum_t |a_ti| * ||W_down[:, i]||_2",
    "abs_mean": "(1/T) sum_t |a_ti|",
    "abs_max": "max_t |a_ti|",
    "sq_mean": "(1/T) sum_t a_ti^2",
    "topk_freq": "(1/T) #{t: i in the ceil(topk_fraction * I) largest |a_ti| * ||W_down[:, i]||_2}"
    " (ties at the k-th value: lowest indices)",
    "out_norm_mean_first_half": "out_norm_mean over the first floor(n_blocks / 2) blocks",
    "out_norm_mean_second_half": "out_norm_mean over the remaining blocks",
    "down_col_norm": "||W_down[:, i]||_2",
    "a": "input of the down projection, converted to float32; T = all calibration tokens",
}

# Score names accepted by `heavy_indices` and friends -> stored statistic.
SCORES: dict[str, str] = {
    "out_norm": "out_norm_mean",
    "abs_mean": "abs_mean",
    "abs_max": "abs_max",
    "sq_mean": "sq_mean",
    "topk_freq": "topk_freq",
    "weight_norm": "down_col_norm",
}

# Wall-clock measurements kept in memory (for reports) but not written: the same model, corpus,
# options and seed must give a byte-identical profile file.
RUN_TIMING_KEYS = frozenset({"run_seconds", "tokens_per_second", "elapsed_seconds"})

ProgressCallback = Callable[[float, int], None]


@dataclass(eq=False)
class LayerStats:
    """Per-neuron float32 statistics of one FFN (see the module docstring for definitions)."""

    name: str
    out_norm_mean: Tensor
    abs_mean: Tensor
    abs_max: Tensor
    sq_mean: Tensor
    topk_freq: Tensor
    out_norm_mean_first_half: Tensor
    out_norm_mean_second_half: Tensor
    down_col_norm: Tensor

    @property
    def intermediate_size(self) -> int:
        return self.out_norm_mean.numel()

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


STAT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LayerStats) if f.name != "name")


def _count(fraction: float, size: int) -> int:
    """Number of neurons in the top `fraction` of `size`: ceil, within [0, size]."""
    if not 0.0 <= fraction <= 1.0:
        raise OptionError(f"fraction {fraction} is out of range: use a value in [0, 1]")
    return min(size, math.ceil(fraction * size - 1e-9))


@dataclass(eq=False)
class Profile:
    """Per-layer neuron statistics of a model on calibration text, plus what produced them."""

    layers: list[LayerStats]
    meta: dict[str, Any]
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from

    # ----- queries -----
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fingerprint(self) -> dict:
        return self.meta["model"]

    def score(self, layer: int, score: str = "out_norm") -> Tensor:
        """The per-neuron score `score` (a key of SCORES) of FFN layer `layer`."""
        if score not in SCORES:
            raise OptionError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
        return getattr(self.layers[layer], SCORES[score])

    def heavy_indices(
        self,
        layer: int,
        fraction: float | None = None,
        share: float | None = None,
        score: str = "out_norm",
    ) -> Tensor:
        """Heavy neurons of `layer`, sorted by score descending.

        Either the top `fraction` of the neurons (ceil(fraction * I) of them), or the fewest
        neurons whose scores add up to at least `share` of the layer's total score.
        """
        if (fraction is None) == (share is None):
            raise OptionError("give exactly one of a heavy fraction or a heavy share")
        values = self.score(layer, score)
        order = torch.argsort(values, descending=True, stable=True)
        if fraction is not None:
            return order[: _count(fraction, values.numel())]
        if not 0.0 <= share <= 1.0:
            raise OptionError(f"heavy share {share} is out of range: use a value in [0, 1]")
        if share == 0.0:
            return order[:0]
        cumulative = torch.cumsum(values[order].double(), 0)
        target = share * cumulative[-1].item()
        count = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
        return order[: min(values.numel(), count + 1)]

    def top_share(self, layer: int, fraction: float, score: str = "out_norm") -> float:
        """Share of the layer's total score carried by its top `fraction` of neurons."""
        values = self.score(layer, score).double()
        total = values.sum().item()
        top = torch.topk(values, _count(fraction, values.numel())).values.sum().item()
        return top / total if total > 0 else 0.0

    def overlap(self, layer: int, fraction: float) -> float:
        """|A & B| / |A| of the top-`fraction` sets by output norm on the two calibration halves."""
        stats = self.layers[layer]
        k = _count(fraction, stats.intermediate_size)
        if k == 0:
            return 1.0
        first = torch.topk(stats.out_norm_mean_first_half, k).indices
        second = torch.topk(stats.out_norm_mean_second_half, k).indices
        return torch.isin(first, second).sum().item() / k

    def summary_rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per layer: size, top-1/5/10% shares, overlaps, max |a|."""
        rows = []
        for index, stats in enumerate(self.layers):
            row: dict[str, Any] = {
                "layer": index,
                "name": stats.name,
                "intermediate_size": stats.intermediate_size,
            }
            for fraction in SHARE_FRACTIONS:
                row[f"top{round(fraction * 100)}_share"] = self.top_share(index, fraction)
            for fraction in SHARE_FRACTIONS:
                row[f"overlap{round(fraction * 100)}"] = self.overlap(index, fraction)
            row["abs_max"] = stats.abs_max.max().item()
            rows.append(row)
        return rows

    # ----- checks -----
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this profile was made for (CheckpointError)."""
        current = model_fingerprint(model)
        if not fingerprint_matches(self.fingerprint, current):
            name = self.path.name if self.path is not None else "the profile"
            raise CheckpointError(
                f"{name} was made for another model (fingerprint "
                f"{fingerprint_id(self.fingerprint)}, this model {fingerprint_id(current)}): "
                "run ffnsplit profile on this model"
            )

    # ----- files -----
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (keys `layer.{i}.{stat}`) with a JSON header; atomic."""
        from safetensors.torch import save

        # a copy each: the statistics of a run are views into tensors shared by its layers
        tensors = {
            f"layer.{index}.{name}": tensor.detach()
            .to("cpu", torch.float32)
            .clone(memory_format=torch.contiguous_format)
            for index, stats in enumerate(self.layers)
            for name, tensor in stats.tensors().items()
        }
        header = {
            **{k: v for k, v in self.meta.items() if k not in RUN_TIMING_KEYS},
            "kind": PROFILE_KIND,
            "format_version": PROFILE_FORMAT_VERSION,
            "ffnsplit_version": __version__,
            "layers": [
                {"name": s.name, "intermediate_size": s.intermediate_size} for s in self.layers
            ],
            "checksum": _checksum(tensors),
        }
        data = save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read and validate a profile written by `save`; any defect is a CheckpointError."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no profile at {path}: run ffnsplit profile first")
        data = path.read_bytes()
        header = _read_header(data, path)
        tensors = _read_tensors(data, path)
        if header.get("checksum") != _checksum(tensors):
            raise CheckpointError(
                f"{path} is corrupt (checksum mismatch): run ffnsplit profile again"
            )
        layers = []
        try:
            for index, layer in enumerate(header["layers"]):
                size = int(layer["intermediate_size"])
                stats = {}
                for name in STAT_NAMES:
                    tensor = tensors.pop(f"layer.{index}.{name}")
                    if tensor.shape != (size,) or tensor.dtype != torch.float32:
                        raise ValueError(f"layer.{index}.{name} has shape {tuple(tensor.shape)}")
                    stats[name] = tensor
                layers.append(LayerStats(name=str(layer["name"]), **stats))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is not a valid profile ({exc}): run ffnsplit profile again"
            ) from None
        if tensors:
            raise CheckpointError(
                f"{path} has unexpected tensors ({next(iter(tensors))}): run ffnsplit profile again"
            )
        meta = {k: v for k, v in header.items() if k not in ("layers", "checksum", "kind")}
        return cls(layers=layers, meta=meta, path=path)


def _checksum(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_header(data: bytes, path: Path) -> dict:
    corrupt = CheckpointError(
        f"{path} is truncated or not a profile file: run ffnsplit profile again"
    )
    if len(data) < 8:
        raise corrupt
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise corrupt
    try:
        raw = json.loads(data[8 : 8 + length])
        header = json.loads(raw["__metadata__"][HEADER_KEY])
    except (ValueError, KeyError, TypeError):
        raise corrupt from None
    if not isinstance(header, dict) or header.get("kind") != PROFILE_KIND:
        raise corrupt
    version = header.get("format_version")
    if not isinstance(version, int):
        raise corrupt
    if version > PROFILE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer ffnsplit ({header.get('ffnsplit_version')}, profile "
            f"format {version}; this ffnsplit {__version__} reads up to {PROFILE_FORMAT_VERSION}): "
            "upgrade ffnsplit"
        )
    return header


def _read_tensors(data: bytes, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise CheckpointError(
            f"{path} is truncated or corrupt: run ffnsplit profile again"
        ) from None


# ---------------------------------------------------------------------------------------------
# Statistics collection


class _RunState:
    """The batch being run (read by the hooks): its blocks, of which the first `first_half` belong
    to the first calibration half (a batch may straddle the halves: the batches are those of a
    plain forward)."""

    blocks = 1
    first_half = 1

    def split(self, rows: int) -> int:
        """Rows of a batch's activations [rows, I] (block after block) in the first half."""
        if self.first_half in (0, self.blocks):
            return rows if self.first_half else 0
        if rows % self.blocks:
            raise RuntimeError(f"activations of {rows} rows for a batch of {self.blocks} blocks")
        return rows // self.blocks * self.first_half


def _use_kernels(a: Tensor, size: int) -> bool:
    """Whether the Triton statistics kernels run this FFN (CUDA, I <= their MAX_SIZE)."""
    return a.is_cuda and size <= _kernel_max_size()


def _stats_partials(slots: int):  # noqa: ANN202 - kernels.profile_stats.StatsPartials (triton)
    from ffnsplit.kernels.profile_stats import StatsPartials

    return StatsPartials(slots)


def _kernel_max_size() -> int:
    """Largest FFN the fused Triton statistics kernel takes (0 without Triton)."""
    try:
        from ffnsplit.kernels.profile_stats import MAX_SIZE
    except ImportError:
        return 0
    return MAX_SIZE


def accumulate_stats_torch(
    a: Tensor,
    col_norm: Tensor,
    k: int,
    abs_sum: Tensor,
    sq_sum: Tensor,
    abs_max: Tensor,
    topk_count: Tensor,
) -> None:
    """Add the statistics of activations `a` [T, I] to the accumulators, in place (torch ops).

    The reference for `kernels.profile_stats.accumulate_stats` (same arguments and results): the
    top-k set of a token is the neurons with o > the k-th largest o, plus the lowest-indexed
    neurons with o equal to it until there are exactly k.
    """
    magnitude = a.abs()
    abs_sum += magnitude.sum(0, dtype=torch.float32)
    torch.maximum(abs_max, magnitude.amax(0), out=abs_max)
    sq_sum += torch.linalg.vector_norm(a, dim=0, dtype=torch.float32).square_()
    out_norm = torch.mul(magnitude, col_norm)  # promotes to float32
    kth = out_norm.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    selected = out_norm >= kth
    counts = selected.sum(1, keepdim=True)
    if bool((counts > k).any()):  # ties across the k-th value: keep the lowest tied indices
        tied = out_norm == kth
        selected &= ~tied | (tied.cumsum(1) <= k - (counts - tied.sum(1, keepdim=True)))
    topk_count += selected.sum(0)


# Bytes of down weights stacked at once to compute their column norms in one reduction.
_NORM_CHUNK_BYTES = 1 << 28
# Rows of a store's `stats`: abs_sum of the first and second half, sq_sum, abs_max, col_norm.
_ABS, _SQ, _MAX, _COL = 0, 2, 3, 4


def _down_weight(block: FFNBlock, size: int) -> Tensor:
    """W_down [H, I] of a block (the live weight of an nn.Linear, else a canonical copy)."""
    down = block.down_module
    weight = getattr(down, "weight", None)
    if isinstance(down, nn.Linear) and weight.shape[1] == size:
        return weight.detach()
    return block.parts().down


class _Store:
    """The running statistics of every FFN of one intermediate size `size`, allocated together on
    the device at the first hook call of any of them: `stats` [5, n, I] float32 (rows _ABS,
    _ABS + 1: sum |a| over the first and second half; _SQ, _MAX; _COL: the column norms, computed
    at once for every FFN whose weight is on that device, stacked) and `counts` [n, I] int64.
    On the kernel path the column kernel adds into running partials, a slot per FFN and half (one
    per half in sequential mode: a layer's slots are flushed before the next layer runs), which
    are flushed into the sums at the end of the run (or of a layer), one launch per half."""

    def __init__(self, blocks: list[FFNBlock], size: int, sequential: bool) -> None:
        self.blocks = blocks
        self.size = size
        self.sequential = sequential
        self.slots = 1 if sequential else len(blocks)  # partials' slots per half
        self.stats: Tensor | None = None
        self.counts: Tensor | None = None
        self.partials: Any = None  # kernels.profile_stats.StatsPartials on the kernel path
        self.has_norm = [False] * len(blocks)
        self.dirty = False  # tokens in the partials
        self.slot_row = 0  # sequential mode: the FFN whose tokens are in the slots (else 0)
        self.host: tuple[Tensor, Tensor] | None = None
        self.ready: Any = None  # torch.cuda.Event: the transfer to `host` is done

    def allocate(self, device: torch.device, kernels: bool) -> None:
        n = len(self.blocks)
        self.stats = torch.zeros(5, n, self.size, dtype=torch.float32, device=device)
        self.counts = torch.zeros(n, self.size, dtype=torch.int64, device=device)
        self.partials = _stats_partials(2 * self.slots) if kernels else None
        self.col_norms(device, range(n))

    def col_norms(self, device: torch.device, rows: Iterable[int]) -> None:
        """Column norms of those of `rows` without one whose weight is on `device`: runs of
        consecutive FFNs with weights of one shape and dtype are stacked (a few launches for all
        layers of a model on the device)."""
        run: list[tuple[int, Tensor]] = []

        def norms() -> None:
            if len(run) == 1:  # one layer (sequential mode): no stacked copy
                row, weight = run[0]
                out = self.stats[_COL, row]
                torch.linalg.vector_norm(weight, dim=0, dtype=torch.float32, out=out)
            elif run:
                first = run[0][0]
                weights = torch.stack([w for _, w in run])
                out = self.stats[_COL, first : first + len(run)]
                torch.linalg.vector_norm(weights, dim=1, dtype=torch.float32, out=out)
            run.clear()

        for row in rows:
            block = self.blocks[row]
            live = getattr(block.down_module, "weight", None)
            if self.has_norm[row] or (isinstance(live, Tensor) and live.device != device):
                norms()
                continue
            weight = _down_weight(block, self.size)
            if weight.device != device:
                norms()
                continue
            last = run[-1] if run else None
            if last is not None and (
                last[0] != row - 1
                or last[1].shape != weight.shape
                or last[1].dtype != weight.dtype
                or (len(run) + 1) * weight.numel() * weight.element_size() > _NORM_CHUNK_BYTES
            ):
                norms()
            run.append((row, weight))
            self.has_norm[row] = True
        norms()

    def flush(self) -> None:
        """Add the kernels' running partials into the sums (a launch per half; no-op if none)."""
        if not self.dirty:
            return
        first = self.slot_row
        last = first + self.slots
        stats = self.stats
        for half in (0, 1):
            self.partials.flush(
                stats[_ABS + half, first:last],
                stats[_SQ, first:last],
                stats[_MAX, first:last],
                self.counts[first:last],
                first=half * self.slots,
            )
        self.dirty = False

    def bad_rows(self, rows: list[int]) -> list[int]:
        """Those of `rows` whose sums hold NaN/Inf (from the host copy if made, else one sync)."""
        if self.host is not None:
            flags = self.wait()[1][rows]
        else:
            self.flush()
            flags = _finite_rows(self.stats[_ABS : _ABS + 2, rows]).cpu()
        return [row for row, ok in zip(rows, flags.tolist(), strict=True) if not ok]

    def to_host(self, tokens: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The final statistics [len(STAT_NAMES), n, I] float32 and the rows' finite flags [n] (1.0
        or 0.0), computed on the device from `tokens` (each row's tokens per half) after a flush,
        and brought to the host in one transfer (done once). From a GPU the transfer is queued
        behind the forward into pinned memory: the views returned hold data only after `wait`."""
        if self.host is None:
            self.flush()
            stats, counts = self.stats, self.counts
            n, size = counts.shape
            cut = len(STAT_NAMES) * n * size  # the statistics, then the flags
            packed = torch.empty(cut + n, dtype=torch.float32, device=stats.device)
            values = packed[:cut].view(len(STAT_NAMES), n, size)
            host_tokens = torch.tensor(
                [[first, second, first + second] for first, second in tokens], dtype=torch.float64
            )
            if stats.is_cuda:  # no sync: the forward may still be running
                host_tokens = host_tokens.pin_memory().to(stats.device, non_blocking=True)
            total = host_tokens[:, 2:]
            halves = host_tokens[:, :2].float()
            total_float = total.float()
            col = stats[_COL]
            abs_mean = values[STAT_NAMES.index("abs_mean")]
            torch.div(stats[_ABS] + stats[_ABS + 1], total_float, out=abs_mean)
            torch.mul(abs_mean, col, out=values[STAT_NAMES.index("out_norm_mean")])
            values[STAT_NAMES.index("abs_max")].copy_(stats[_MAX])
            torch.div(stats[_SQ], total_float, out=values[STAT_NAMES.index("sq_mean")])
            values[STAT_NAMES.index("topk_freq")].copy_(counts.double() / total)
            for half, name in enumerate(("first_half", "second_half")):
                out = values[STAT_NAMES.index(f"out_norm_mean_{name}")]
                torch.mul(stats[_ABS + half] / halves[:, half : half + 1], col, out=out)
            values[STAT_NAMES.index("down_col_norm")].copy_(col)
            packed[cut:].copy_(_finite_rows(stats[_ABS : _ABS + 2]))
            if packed.is_cuda:
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(torch.cuda.current_stream(packed.device))
                packed = host
            self.host = (packed[:cut].view(len(STAT_NAMES), n, size), packed[cut:])
        return self.host

    def wait(self) -> tuple[Tensor, Tensor]:
        """`host` (made by `to_host`), once its transfer is done."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.host


def _finite_rows(sums: Tensor) -> Tensor:
    """Per row of `sums` [2, rows, I]: whether all its values are finite (bool [rows])."""
    return torch.isfinite(sums).all(2).all(0)


class _Accumulator:
    """Forward pre-hook on one down projection: adds its activations to row `row` of `store`."""

    # Tokens per chunk so that one float32 [chunk, I] temporary stays near 256 MiB.
    CHUNK_ELEMENTS = 1 << 26

    def __init__(
        self, block: FFNBlock, topk_fraction: float, state: _RunState, store: _Store, row: int
    ) -> None:
        self.block = block
        self.state = state
        self.store = store
        self.row = row
        slot = 0 if store.sequential else row
        self.slots = (slot, store.slots + slot)  # the partials' slot for each half
        self.slot_owner = row if store.sequential else 0  # store.slot_row after this adds
        size = store.size
        self.k = max(1, math.ceil(topk_fraction * size - 1e-9))
        self.chunk = max(1, self.CHUNK_ELEMENTS // size)
        self.tokens = [0, 0]
        self.col_norm: Tensor | None = None
        self.sums: list[tuple[Tensor, ...]] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        a = args[0].detach()
        store = self.store
        size = store.size
        if a.shape[-1] != size:
            raise RuntimeError(f"{self.block.name}: activations of size {a.shape[-1]}, not {size}")
        if self.col_norm is None:
            self._init(a)
        flat = a.reshape(-1, size)
        rows = flat.shape[0]
        split = self.state.split(rows)
        parts = (flat, None) if split == rows else (None, flat) if split == 0 else None
        if parts is None:  # a batch straddling the two halves
            parts = (flat[:split], flat[split:])
        partials = store.partials
        if partials is not None and store.dirty and store.slot_row != self.slot_owner:
            store.flush()  # sequential: the previous layer's tokens are in the slots
        for half, part in enumerate(parts):
            if part is None:
                continue
            if partials is not None:
                partials.add(part, self.col_norm, self.k, self.slots[half])
            else:
                for chunk in part.split(self.chunk):
                    accumulate_stats_torch(chunk, self.col_norm, self.k, *self.sums[half])
        if partials is not None:
            store.dirty = True
            store.slot_row = self.slot_owner
        self.tokens[0] += split
        self.tokens[1] += rows - split

    def _init(self, a: Tensor) -> None:
        store, row = self.store, self.row
        if store.stats is None:
            store.allocate(a.device, _use_kernels(a, store.size))
        elif store.stats.device != a.device:
            raise RuntimeError(
                f"{self.block.name}: activations on {a.device}, not {store.stats.device}"
            )
        if not store.has_norm[row]:
            store.col_norms(a.device, [row])
        stats = store.stats
        self.col_norm = stats[_COL, row]
        self.sums = [
            (stats[_ABS + h, row], stats[_SQ, row], stats[_MAX, row], store.counts[row])
            for h in (0, 1)
        ]


def _make_accumulators(
    blocks: list[FFNBlock], topk_fraction: float, state: _RunState, sequential: bool
) -> tuple[list[_Accumulator], list[_Store]]:
    """One accumulator per FFN, those of one intermediate size sharing a store."""
    sizes = [_down_weight_size(block) for block in blocks]
    stores = {
        size: _Store([b for b, s in zip(blocks, sizes, strict=True) if s == size], size, sequential)
        for size in dict.fromkeys(sizes)
    }
    rows = dict.fromkeys(stores, 0)
    accumulators = []
    for block, size in zip(blocks, sizes, strict=True):
        accumulators.append(_Accumulator(block, topk_fraction, state, stores[size], rows[size]))
        rows[size] += 1
    return accumulators, list(stores.values())


def _down_weight_size(block: FFNBlock) -> int:
    """Intermediate size I of a block (the input size of its down projection)."""
    weight = getattr(block.down_module, "weight", None)
    if isinstance(block.down_module, nn.Linear):
        return weight.shape[1]
    return block.parts().down.shape[1]


def _check_tokens(accumulators: Sequence[_Accumulator]) -> None:
    """Raise RuntimeError if an FFN saw no tokens in a calibration half."""
    for acc in accumulators:
        if acc.col_norm is None or min(acc.tokens) == 0:
            raise RuntimeError(f"{acc.block.name}: the FFN saw tokens {acc.tokens} per half")


def _results(accumulators: Sequence[_Accumulator], stores: Sequence[_Store]) -> list[LayerStats]:
    """Every layer's LayerStats, computed per store on the device and brought to the host in one
    transfer (`_Store.to_host`). The tensors of one store are views into one shared tensor.
    The caller has checked that every FFN saw tokens in both halves (`_check_tokens`)."""
    per_block: dict[int, LayerStats] = {}
    for store in stores:
        members = [acc for acc in accumulators if acc.store is store]
        values, _ = store.to_host([acc.tokens for acc in members])
        rows = dict(zip(STAT_NAMES, (value.unbind() for value in values), strict=True))
        for acc in members:
            per_block[id(acc)] = LayerStats(
                name=acc.block.name, **{name: v[acc.row] for name, v in rows.items()}
            )
    return [per_block[id(acc)] for acc in accumulators]


# ---------------------------------------------------------------------------------------------
# Running calibration batches (whole model, or one decoder layer at a time)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (after the last decoder layer)."""


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _module_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def split_batches(input_ids: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive batches of at most `batch_size` blocks."""
    if batch_size < 1:
        raise OptionError(f"batch size must be at least 1, got {batch_size}")
    return list(input_ids.split(batch_size))


def _call_model(model: nn.Module, input_ids: Tensor) -> None:
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the forward pass did not reach the last decoder layer")


@dataclass
class _LayerCall:
    """The arguments one decoder layer received besides its hidden states."""

    args: tuple
    kwargs: dict
    hidden_key: str | None  # None: hidden states are the first positional argument


def _capture_layer_calls(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[Tensor]
) -> tuple[list[Tensor], list[list[_LayerCall]]]:
    """Run the model up to the decoder layers with every layer stubbed out.

    Returns the hidden states entering the first layer (one per batch) and, for every layer and
    batch, the other arguments the model passes it (attention mask, position embeddings, ...):
    these may differ per layer (sliding-window layers of Gemma, Qwen 3).
    """
    calls: list[list[_LayerCall]] = [[] for _ in layers]
    first_hidden: list[Tensor] = []
    last = len(layers) - 1

    def stub_for(index: int) -> Callable[..., Tensor]:
        def stub(*args: Any, **kwargs: Any) -> Tensor:
            if args:
                hidden, rest, key = args[0], args[1:], None
            else:
                key = "hidden_states"
                hidden, rest = kwargs.pop(key), ()
            calls[index].append(_LayerCall(rest, kwargs, key))
            if index == 0:
                first_hidden.append(hidden)
            if index == last:
                raise _StopForward
            return hidden

        return stub

    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = stub_for(index)
        embed_device = model.get_input_embeddings().weight.device
        for ids in batches:
            _call_model(model, ids.to(embed_device))
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return first_hidden, calls


def _to_device(obj: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """Move tensors nested in tuples/lists/dicts to `device`, each shared tensor only once."""
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to_device(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [_to_device(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move `module` to `device` for the block, then put back its original tensors (no copy)."""
    params = [
        (m, n, p, p.data)
        for m in module.modules()
        for n, p in m._parameters.items()
        if p is not None
    ]
    buffers = [(m, n, b) for m in module.modules() for n, b in m._buffers.items() if b is not None]
    module.to(device)
    try:
        yield
    finally:
        for owner, name, param, data in params:
            param.data = data
            owner._parameters[name] = param
        for owner, name, buffer in buffers:
            owner._buffers[name] = buffer


def _hidden_store(
    device: torch.device, hidden: Sequence[Tensor], layers: nn.ModuleList
) -> torch.device:
    """Keep activations between layers on the device when they fit comfortably, else on the CPU."""
    if device.type != "cuda":
        return device
    needed = sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(device)
    layer_bytes = max(_module_bytes(layer) for layer in layers)
    return device if needed <= 0.5 * (free - layer_bytes) else torch.device("cpu")


def run_calibration(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    device: torch.device | str,
    sequential: bool = False,
    before_batch: Callable[[int], None] | None = None,
    after_batch: Callable[[int, int | None], None] | None = None,
) -> None:
    """Run calibration batches through the decoder layers, for hooks placed by the caller to see.

    The forward stops after the last decoder layer (no final norm or LM head). Normal mode moves
    the model to `device`. Sequential mode leaves the model where it is and moves one decoder layer
    at a time to `device`, running every batch through it before the next; its outputs become the
    next layer's inputs; once a layer is done its original (host) tensors are put back without a
    copy from the device, so in-place changes to its parameters made meanwhile are dropped (a
    replacement module must be installed on the layer's original device). `before_batch(batch)`
    is called before each batch, `after_batch(batch, layer)` after it (`layer` is None in normal
    mode, the decoder layer's index in sequential mode).
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    with torch.no_grad():
        if not sequential:
            model.to(device)
            handle = layers[-1].register_forward_hook(_raise_stop)
            try:
                for index, ids in enumerate(batches):
                    if before_batch:
                        before_batch(index)
                    _call_model(model, ids.to(device))
                    if after_batch:
                        after_batch(index, None)
            finally:
                handle.remove()
            return
        hidden, calls = _capture_layer_calls(model, layers, batches)
        store = _hidden_store(device, hidden, layers)
        memo: dict[int, Any] = {}
        hidden = [h.to(store) for h in hidden]
        for layer_index, layer in enumerate(layers):
            layer_calls = [
                _LayerCall(
                    _to_device(call.args, device, memo),
                    _to_device(call.kwargs, device, memo),
                    call.hidden_key,
                )
                for call in calls[layer_index]
            ]
            with _on_device(layer, device):
                for index, call in enumerate(layer_calls):
                    if before_batch:
                        before_batch(index)
                    states = hidden[index].to(device)
                    if call.hidden_key is None:
                        output = layer(states, *call.args, **call.kwargs)
                    else:
                        output = layer(*call.args, **{call.hidden_key: states}, **call.kwargs)
                    if isinstance(output, tuple | list):
                        output = output[0]
                    hidden[index] = output.to(store)
                    if after_batch:
                        after_batch(index, layer_index)


def _raise_stop(module: nn.Module, args: tuple, output: Any) -> None:
    raise _StopForward


# ---------------------------------------------------------------------------------------------
# The profiler


def _fits_on_device(model: nn.Module, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return _module_bytes(model) <= 0.8 * free


def _choose_sequential(model: nn.Module, device: torch.device, sequential: bool | None) -> bool:
    if sequential is not None:
        return sequential
    on_cpu = _model_device(model).type == "cpu"
    return device.type == "cuda" and on_cpu and not _fits_on_device(model, device)


class TokensPerSecondColumn(ProgressColumn):
    """A rich progress column: tokens done per second of the task so far (a steady average)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "tok")  # None: a task that does not count tokens
        if unit is None:
            return Text("")
        elapsed = task.elapsed
        if not elapsed or not task.completed:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.0f} {unit}/s", style="progress.data.speed")


def _progress_callback(
    progress: ProgressCallback | Progress | None, total: int
) -> ProgressCallback:
    if progress is None:
        return lambda done, total: None
    if isinstance(progress, Progress):
        task = progress.add_task("profiling", total=total)
        return lambda done, total: progress.update(task, completed=done)
    return progress


def profile_model(
    model: nn.Module,
    input_ids: Tensor,
    *,
    topk_fraction: float = 0.05,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    sequential: bool | None = None,
    progress: ProgressCallback | Progress | None = None,
    corpus_meta: dict | None = None,
    fingerprint: dict | None = None,
) -> Profile:
    """Profile every FFN of `model` on calibration blocks `input_ids` [n_blocks, seq_len].

    `device` None keeps the model where it is; "auto" picks CUDA when available. `dtype` casts the
    model in place first. `sequential` None runs layer by layer only when the model sits on the CPU
    and does not fit in the GPU's free memory. `progress` is a rich Progress (a task showing
    tokens/s is added) or a callback `(tokens_done, tokens_total)`. `corpus_meta` (name, checksum)
    is stored in the profile's header. `fingerprint` is `arch.model_fingerprint(model)` when the
    caller already has it (hashing a large model's FFN weights takes a while). Raises
    NumericalError naming the first layer whose activations hold NaN/Inf.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise OptionError("calibration input must be a LongTensor [n_blocks, seq_len]")
    n_blocks, seq_len = input_ids.shape
    if n_blocks < 2 or seq_len < 1:
        raise OptionError(
            f"need at least 2 calibration blocks (got {n_blocks} of {seq_len} tokens) to measure "
            "stability on two halves: raise --tokens or lower --seq-len"
        )
    if not 0.0 < topk_fraction <= 1.0:
        raise OptionError(f"top-k fraction {topk_fraction} is out of range: use a value in (0, 1]")
    started = time.perf_counter()
    blocks = get_ffn_blocks(model)
    if fingerprint is None:
        fingerprint = model_fingerprint(model)
    run_device = _model_device(model) if device is None else resolve_device(str(device))
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    sequential = _choose_sequential(model, run_device, sequential)
    layers = decoder_layers(model)

    state = _RunState()
    accumulators, stores = _make_accumulators(blocks, topk_fraction, state, sequential)
    layer_of_block = _decoder_layer_index(layers, blocks) if sequential else []
    half_point = n_blocks // 2
    if sequential:  # each half in batches of its own (measured faster there: RESULTS.md)
        batches = split_batches(input_ids[:half_point], batch_size)
        batches += split_batches(input_ids[half_point:], batch_size)
    else:  # those of a plain forward: one batch may straddle the halves
        batches = split_batches(input_ids, batch_size)
    starts = [0]
    for batch in batches[:-1]:
        starts.append(starts[-1] + batch.shape[0])
    total_tokens = n_blocks * seq_len
    report = _progress_callback(progress, total_tokens)
    done = 0.0

    def before_batch(index: int) -> None:
        state.blocks = batches[index].shape[0]
        state.first_half = min(max(half_point - starts[index], 0), state.blocks)

    def after_batch(index: int, layer: int | None) -> None:
        nonlocal done
        tokens = batches[index].numel()
        if layer is None:
            if index == len(batches) - 1:  # queued behind the forward; checked after it
                _launch_to_host(accumulators)
            done += tokens
        else:
            if index == len(batches) - 1:
                _check_finite(
                    [a for a, li in zip(accumulators, layer_of_block, strict=True) if li == layer],
                    to_host=False,
                )
            done += tokens / len(layers)
        report(done, total_tokens)

    # eval() and train() set a flag on every module (host time with the GPU idle): only if needed
    was_training = model.training
    set_eval = _any_training(model)
    if set_eval:
        model.eval()
    handles = [
        b.down_module.register_forward_pre_hook(acc)
        for b, acc in zip(blocks, accumulators, strict=True)
    ]
    run_started = time.perf_counter()
    try:
        run_calibration(
            model,
            batches,
            device=run_device,
            sequential=sequential,
            before_batch=before_batch,
            after_batch=after_batch,
        )
    finally:
        for handle in handles:
            handle.remove()
        if set_eval:
            model.train(was_training)
    try:
        _check_tokens(accumulators)
    except RuntimeError:
        _check_finite(accumulators, to_host=True)  # NaN/Inf is reported first
        raise
    stats = _results(accumulators, stores)  # views: the device may still be running (no sync)
    meta = {
        "model_name": Path(str(getattr(model, "name_or_path", "") or "")).name or None,
        "model": fingerprint,
        "corpus": corpus_meta,
        "tokens": total_tokens,
        "n_blocks": n_blocks,
        "seq_len": seq_len,
        "tokens_per_half": [half_point * seq_len, (n_blocks - half_point) * seq_len],
        "topk_fraction": topk_fraction,
        "dtype": dtype_name(_model_dtype(model)),
        "device": run_device.type,
        "sequential": sequential,
        "definitions": DEFINITIONS,
    }
    result = Profile(layers=stats, meta=meta)
    _check_finite(accumulators, to_host=True)  # one host sync per run: waits for the transfers
    run_seconds = time.perf_counter() - run_started
    meta["run_seconds"] = run_seconds
    meta["tokens_per_second"] = total_tokens / run_seconds if run_seconds > 0 else None
    meta["elapsed_seconds"] = time.perf_counter() - started
    return result


profile = profile_model


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _any_training(model: nn.Module) -> bool:
    """Whether any module of `model` is in training mode (a walk over the children dicts: a
    third of the time of `any(m.training for m in model.modules())`, which builds every name)."""
    stack, seen = [model], {id(model)}
    while stack:
        module = stack.pop()
        if module.training:
            return True
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return False


def _decoder_layer_index(layers: nn.ModuleList, blocks: list[FFNBlock]) -> list[int]:
    """For each FFN block, the index of the decoder layer holding it."""
    owner = {}
    for index, layer in enumerate(layers):
        for module in layer.modules():
            owner[id(module)] = index
    return [owner[id(block.down_module)] for block in blocks]


def _launch_to_host(accumulators: Sequence[_Accumulator]) -> None:
    """Queue each store's final statistics and their transfer (`_Store.to_host`), no sync."""
    for store in dict.fromkeys(acc.store for acc in accumulators):
        if store.stats is not None:
            store.to_host([acc.tokens for acc in accumulators if acc.store is store])


def _check_finite(accumulators: Sequence[_Accumulator], *, to_host: bool) -> None:
    """Raise NumericalError naming the first of `accumulators` whose sums hold NaN/Inf.

    to_host: read the finite flags made with the final statistics of their stores (the end of a
    run: one transfer per store, which the results are views of; waits for it, making it first if
    not yet queued); else read only the rows checked (one sync)."""
    if to_host:
        _launch_to_host(accumulators)
    bad: set[int] = set()
    for store in dict.fromkeys(acc.store for acc in accumulators):
        if store.stats is None:
            continue
        rows = [acc.row for acc in accumulators if acc.store is store]
        bad.update(id(store.blocks[row]) for row in store.bad_rows(rows))
    for acc in accumulators:
        if id(acc.block) in bad:
            raise NumericalError(
                f"NaN/Inf in the FFN activations of layer {acc.block.layer} ({acc.block.name}): "
                "check the model's weights, or run in float32 (--dtype float32)"
            )


# ---------------------------------------------------------------------------------------------
# Reporting


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def summary_table(profile: Profile) -> Table:
    """Per layer: size, output-norm share of the top 1/5/10% neurons, overlap, max |a|."""
    meta = profile.meta
    corpus = (meta.get("corpus") or {}).get("name", "?")
    model = meta.get("model_name") or (meta.get("model") or {}).get("model_type", "?")
    table = Table(
        title=f"FFN heavy hitters of {model}: {meta.get('tokens', 0):,} tokens of {corpus}, "
        f"seq len {meta.get('seq_len', '?')}",
        caption="share = part of the layer's summed mean output norm carried by its top neurons; "
        "overlap = top-5% sets on two disjoint halves of the tokens",
    )
    for column in ("layer", "I", "top 1%", "top 5%", "top 10%", "overlap 5%", "max |a|"):
        table.add_column(column, justify="right")
    rows = profile.summary_rows()
    for row in rows:
        table.add_row(
            str(row["layer"]),
            str(row["intermediate_size"]),
            _percent(row["top1_share"]),
            _percent(row["top5_share"]),
            _percent(row["top10_share"]),
            _percent(row["overlap5"]),
            f"{row['abs_max']:.3g}",
        )
    if rows:

        def mean(key: str) -> float:
            return sum(r[key] for r in rows) / len(rows)

        table.add_section()
        table.add_row(
            "mean",
            "",
            _percent(mean("top1_share")),
            _percent(mean("top5_share")),
            _percent(mean("top10_share")),
            _percent(mean("overlap5")),
            f"{max(r['abs_max'] for r in rows):.3g}",
        )
    return table
