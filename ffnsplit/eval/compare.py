"""Evaluate one model on every check that fits it, and compare models side by side.

Sizes are bytes as stored: parameters and persistent buffers in their own dtype (packed int32
planes, fp16 scales, ...), each shared tensor counted once. FFN bytes are those of the FFN modules'
tensors: the up (and gate) and down projections of a dense FFN with their biases, or everything a
compressed FFN's SplitFFN stores.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from ffnsplit import arch
from ffnsplit.errors import FFNSplitError, UnsupportedModelError
from ffnsplit.eval.perplexity import PerplexityResult, model_device, perplexity
from ffnsplit.eval.tasks import (
    PolarityResult,
    SimilarityResult,
    is_causal_lm,
    polarity_accuracy,
    similarity_spearman,
)
from ffnsplit.fsutil import atomic_write_text
from ffnsplit.modules import SplitFFN

DEFAULT_CORPORA = ("wiki-eval", "lee-news")
REPORT_VERSION = 1

StageProgress = Callable[[str, int, int], None]
"""Progress callback: (stage, done, total), e.g. ("perplexity wiki-eval", 2048, 16384)."""


def _unique_bytes(tensors: Iterable[Tensor], float_bits: int | None = None) -> int:
    """Bytes of distinct tensors; with `float_bits`, floating-point ones count at that width."""
    seen: set[tuple] = set()
    total = 0
    for tensor in tensors:
        pointer = tensor.data_ptr()
        key = (tensor.device, pointer, tensor.nbytes) if pointer else ("id", id(tensor))
        if key not in seen:
            seen.add(key)
            if float_bits is not None and tensor.is_floating_point():
                total += tensor.numel() * float_bits // 8
            else:
                total += tensor.nbytes
    return total


def _stored_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and persistent buffers (what a checkpoint of the module holds)."""
    return list(module.state_dict(keep_vars=True).values())


def total_bytes(model: nn.Module, float_bits: int | None = None) -> int:
    """Bytes of all parameters and persistent buffers as stored, shared tensors counted once.

    `float_bits` counts floating-point tensors at that width (e.g. 16: as deployed on a GPU,
    whatever dtype the model was loaded in for evaluation)."""
    return _unique_bytes(_stored_tensors(model), float_bits)


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The modules holding each FFN's tensors.

    Dense: the module that receives the FFN input (the whole FFN for most families, the up
    projection for FFNs spread over a layer) and the down projection. Compressed: the SplitFFN
    installed in each FFN's place (the rest of its old path is an identity).
    """
    try:
        blocks = arch.get_ffn_blocks(model)
    except UnsupportedModelError:
        replaced = arch.installed_ffns(model, SplitFFN)
        if not replaced or len(replaced) != len(arch.decoder_layers(model)):
            raise  # unsupported, or only some FFNs compressed (ffnsplit never writes that)
        return [module for _, _, module in replaced]
    return [module for block in blocks for module in (block.up_input_module, block.down_module)]


def ffn_bytes(model: nn.Module, float_bits: int | None = None) -> int:
    """Bytes of every FFN's stored tensors (dense weights and biases, or the replacement's)."""
    tensors = (t for module in _ffn_modules(model) for t in _stored_tensors(module))
    return _unique_bytes(tensors, float_bits)


def _main_dtype(model: nn.Module) -> str:
    counts: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "none"


@dataclass
class EvalReport:
    """Everything `evaluate` measured on one model; JSON-able through to_dict / from_dict."""

    model: str
    model_type: str
    dtype: str
    causal_lm: bool
    ffn_bytes: int
    total_bytes: int
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    polarity: PolarityResult | None = None
    similarity: SimilarityResult | None = None
    settings: dict = field(default_factory=dict)  # seq_len, max_tokens, batch_size, device
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds per stage
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "report_version": REPORT_VERSION,
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "causal_lm": self.causal_lm,
            "ffn_bytes": self.ffn_bytes,
            "total_bytes": self.total_bytes,
            "perplexity": {name: r.to_dict() for name, r in self.perplexity.items()},
            "polarity": None if self.polarity is None else self.polarity.to_dict(),
            "similarity": None if self.similarity is None else self.similarity.to_dict(),
            "settings": dict(self.settings),
            "timings_s": dict(self.timings_s),
            "wall_time_s": self.wall_time_s,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        try:
            version = data["report_version"]
            if version > REPORT_VERSION:
                raise FFNSplitError(
                    f"eval report version {version} is newer than this ffnsplit reads "
                    f"({REPORT_VERSION}): upgrade ffnsplit"
                )
            polarity, similarity = data["polarity"], data["similarity"]
            return cls(
                model=data["model"],
                model_type=data["model_type"],
                dtype=data["dtype"],
                causal_lm=data["causal_lm"],
                ffn_bytes=data["ffn_bytes"],
                total_bytes=data["total_bytes"],
                perplexity={
                    name: PerplexityResult.from_dict(r) for name, r in data["perplexity"].items()
                },
                polarity=None if polarity is None else PolarityResult.from_dict(polarity),
                similarity=None if similarity is None else SimilarityResult.from_dict(similarity),
                settings=dict(data["settings"]),
                timings_s=dict(data["timings_s"]),
                wall_time_s=data["wall_time_s"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise FFNSplitError(
                f"not an ffnsplit eval report (bad or missing field {exc}): write it with --json"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FFNSplitError(f"cannot read eval report {path}: {exc}") from None
        return cls.from_dict(data)


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    name: str | None = None,
    corpora: Sequence[str] = DEFAULT_CORPORA,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: StageProgress | None = None,
    size_float_bits: int | None = None,
) -> EvalReport:
    """Sizes plus perplexity on `corpora` and polarity accuracy (causal LMs) or similarity
    Spearman (encoders); `device` None runs where the model is. `size_float_bits` counts
    floating-point tensors at that width in the sizes (None: as loaded)."""
    start = time.perf_counter()
    if device is not None:
        model.to(device)
    config = getattr(model, "config", None)
    causal = is_causal_lm(model)
    report = EvalReport(
        model=name or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        model_type=str(getattr(config, "model_type", "unknown")),
        dtype=_main_dtype(model),
        causal_lm=causal,
        ffn_bytes=ffn_bytes(model, size_float_bits),
        total_bytes=total_bytes(model, size_float_bits),
        settings={
            "size_float_bits": size_float_bits,
            "seq_len": seq_len,
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "device": str(model_device(model)),
        },
    )

    def stage_progress(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)

    def timed(stage: str, run: Callable[[], object]) -> object:
        began = time.perf_counter()
        result = run()
        report.timings_s[stage] = time.perf_counter() - began
        return result

    if causal:
        for corpus in corpora:
            stage = f"perplexity {corpus}"
            report.perplexity[corpus] = timed(
                stage,
                lambda corpus=corpus, stage=stage: perplexity(
                    model,
                    tokenizer,
                    corpus,
                    seq_len=seq_len,
                    max_tokens=max_tokens,
                    batch_size=batch_size,
                    progress=stage_progress(stage),
                ),
            )
        report.polarity = timed(
            "polarity",
            lambda: polarity_accuracy(model, tokenizer, progress=stage_progress("polarity")),
        )
    else:
        report.similarity = timed(
            "similarity",
            lambda: similarity_spearman(model, tokenizer, progress=stage_progress("similarity")),
        )
    report.wall_time_s = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Metric:
    label: str
    value: Callable[[EvalReport], float | None]
    fmt: str
    better: int  # +1 higher is better, -1 lower is better, 0 neutral


def _metrics(reports: Sequence[EvalReport]) -> list[_Metric]:
    corpora: list[str] = []
    for report in reports:
        corpora += [c for c in report.perplexity if c not in corpora]
    metrics = [
        _Metric(
            f"perplexity {c}",
            lambda r, c=c: r.perplexity[c].ppl if c in r.perplexity else None,
            "{:.3f}",
            -1,
        )
        for c in corpora
    ]
    if any(r.polarity for r in reports):
        metrics += [
            _Metric("polarity accuracy", lambda r: r.polarity and r.polarity.accuracy, "{:.3f}", 1),
            _Metric(
                "polarity: share answered positive",
                lambda r: r.polarity and r.polarity.predicted_positive_share,
                "{:.3f}",
                0,
            ),
            _Metric(
                "polarity: share labelled positive",
                lambda r: r.polarity and r.polarity.positive_share,
                "{:.3f}",
                0,
            ),
        ]
    if any(r.similarity for r in reports):
        metrics.append(
            _Metric(
                "similarity Spearman",
                lambda r: r.similarity and r.similarity.spearman,
                "{:.4f}",
                1,
            )
        )
    mib = 1024**2
    metrics += [
        _Metric("FFN size (MiB)", lambda r: r.ffn_bytes / mib, "{:.2f}", -1),
        _Metric("total size (MiB)", lambda r: r.total_bytes / mib, "{:.2f}", -1),
        _Metric("wall time (s)", lambda r: r.wall_time_s, "{:.1f}", 0),
    ]
    return metrics


def _delta(value: float | None, reference: float | None, metric: _Metric) -> Text:
    if value is None or reference is None or not math.isfinite(value - reference):
        return Text("-", style="dim")
    diff = value - reference
    text = ("{:+" + metric.fmt[2:]).format(diff)
    if reference:
        text += f" ({diff / abs(reference):+.1%})"
    style = ""
    if metric.better and diff:
        style = "green" if diff * metric.better > 0 else "red"
    return Text(text, style=style)


def comparison_table(reports: dict[str, EvalReport]) -> Table:
    """Models side by side (the first is the reference), one row per metric, with deltas."""
    if not reports:
        raise FFNSplitError("nothing to compare: evaluate at least one model")
    names = list(reports)
    table = Table(title="ffnsplit eval", show_lines=False)
    table.add_column("metric")
    table.add_column(f"{names[0]} (ref)", justify="right")
    for name in names[1:]:
        table.add_column(name, justify="right")
        table.add_column(f"Δ {name}", justify="right")
    reference = reports[names[0]]
    protocol = ("seq_len", "max_tokens")
    differ = [
        name
        for name in names[1:]
        if any(reports[name].settings.get(k) != reference.settings.get(k) for k in protocol)
    ]
    if differ:
        table.caption = (
            f"not comparable: {', '.join(differ)} evaluated with another seq_len / max_tokens "
            f"than {names[0]}"
        )
        table.caption_style = "bold red"
    for metric in _metrics(list(reports.values())):
        ref_value = metric.value(reference)
        row: list[str | Text] = [metric.label, _format(ref_value, metric)]
        for name in names[1:]:
            value = metric.value(reports[name])
            row += [_format(value, metric), _delta(value, ref_value, metric)]
        table.add_row(*row)
    return table


def _format(value: float | None, metric: _Metric) -> str:
    return "-" if value is None else metric.fmt.format(value)
