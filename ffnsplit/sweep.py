"""FFSplit against plain baselines at equal FFN bytes, over several budgets (`ffnsplit sweep`).

Each budget point is a uniform light format U (no split, the same format everywhere: the
"uniform" baseline). FFSplit and the two heavy-set baselines use the next cheaper format of the
same bit width (group 128 instead of 64 or 32) for their light neurons and spend the bytes saved
on a dense fp16 heavy set: the largest heavy fraction whose FFN bytes do not exceed U's, so every
method at a point stores at most the same number of FFN bytes (measured from the plan's byte
model, which equals the saved tensors). The heavy set is chosen by output norm (FFSplit), at
random, or by weight norm alone. Budget mode (`--target-bits`) is one more method: FFSplit's
per-layer allocation at U's average bits.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import asdict, dataclass, field

from torch import nn

from ffnsplit import apply, plan
from ffnsplit.errors import OptionError

METHODS = ("uniform", "ffsplit", "random", "weight-norm", "budget")
_SELECTION = {"ffsplit": "output_norm", "random": "random", "weight-norm": "weight_norm"}


@dataclass
class SweepPoint:
    point: str  # the uniform format naming the budget, e.g. "int4-g64"
    method: str
    light: str
    heavy_fraction: float
    ffn_bytes: int
    average_bits: float
    metrics: dict = field(default_factory=dict)


def light_for(uniform: plan.LightFormat) -> plan.LightFormat:
    """The format the split methods use for light neurons at a uniform point: group 128."""
    _quantized(uniform)
    if uniform.group_size == 128 or uniform.group_size == -1:
        raise OptionError(
            f"sweep point {uniform.label()} leaves no bytes for a heavy set at group 128: "
            "use group 32 or 64 points (e.g. int4-g64)"
        )
    return plan.LightFormat(bits=uniform.bits, group_size=128, symmetric=uniform.symmetric)


def _quantized(uniform: plan.LightFormat) -> None:
    if uniform.kind != "quant":
        raise OptionError(f"sweep points are quantized formats (intB-gG), not {uniform.label()}")


def _needs_split(methods: tuple[str, ...]) -> bool:
    """Whether a method takes a heavy set at the point's group-128 light format."""
    return any(m not in ("uniform", "budget") for m in methods)


def check_options(points: list[str] | tuple[str, ...], methods: tuple[str, ...]) -> None:
    """Every point and method checked before any model is loaded or compressed."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"unknown sweep method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    for label in points:
        uniform = plan.parse_light_format(label)
        _quantized(uniform)
        if _needs_split(methods):
            light_for(uniform)


def _plan(profile, geometry, light, fraction, selection, weight_norms, seed):
    return plan.make_plan(
        profile,
        geometry=geometry,
        light=light,
        heavy_fraction=fraction,
        selection=selection,
        weight_norms=weight_norms,
        seed=seed,
    )


def matched_heavy_fraction(profile, geometry, light, budget_bytes: int) -> float:
    """The largest heavy fraction (to 1e-4) whose plan stays within `budget_bytes`."""
    low, high = 0.0, 1.0
    for _ in range(14):
        middle = (low + high) / 2
        candidate = _plan(profile, geometry, light, middle, "output_norm", None, 0)
        if sum(plan.plan_ffn_bytes(candidate)) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def sweep(
    model: nn.Module,
    tokenizer,
    profile,
    points: list[str],
    *,
    evaluate_fn,
    methods: tuple[str, ...] = ("uniform", "ffsplit", "random", "weight-norm"),
    seed: int = 0,
    calib_ids=None,
    progress=None,
) -> list[SweepPoint]:
    """Compress a copy of `model` for every (point, method) and evaluate it with `evaluate_fn`.

    `evaluate_fn(model, tokenizer) -> dict of metrics`. The dense model is left untouched.
    `calib_ids` (token blocks) are needed by the budget method's error measurements.
    """
    check_options(points, methods)
    profile.check_model(model)
    geometry = apply.ffn_geometry(model)
    weight_norms = apply.weight_norm_scores(model)
    if "budget" in methods and calib_ids is None:
        raise OptionError("the budget method measures errors on calibration tokens: pass calib_ids")
    errors = apply.measure_errors(model, calib_ids) if "budget" in methods else None
    results: list[SweepPoint] = []
    total = len(points) * len(methods)
    for label in points:
        uniform = plan.parse_light_format(label)
        uniform_plan = _plan(profile, geometry, uniform, 0.0, "none", None, seed)
        budget = sum(plan.plan_ffn_bytes(uniform_plan))
        light, fraction = uniform, 0.0
        if _needs_split(methods):
            light = light_for(uniform)
            fraction = matched_heavy_fraction(profile, geometry, light, budget)
        for method in methods:
            if method == "uniform":
                split_plan = uniform_plan
            elif method == "budget":
                split_plan = plan.plan_for_budget(
                    profile,
                    geometry=geometry,
                    target_bits=plan.average_bits(uniform_plan),
                    neuron_errors=errors,
                    seed=seed,
                )
            else:
                split_plan = _plan(
                    profile, geometry, light, fraction, _SELECTION[method], weight_norms, seed
                )
            compressed = copy.deepcopy(model)
            apply.compress_model(compressed, split_plan)
            metrics = evaluate_fn(compressed, tokenizer)
            del compressed
            gc.collect()
            results.append(
                SweepPoint(
                    point=label,
                    method=method,
                    light={"uniform": uniform.label(), "budget": "mixed"}.get(
                        method, light.label()
                    ),
                    heavy_fraction=0.0 if method in ("uniform", "budget") else fraction,
                    ffn_bytes=sum(plan.plan_ffn_bytes(split_plan)),
                    average_bits=plan.average_bits(split_plan),
                    metrics=metrics,
                )
            )
            if progress is not None:
                progress(len(results), total)
    return results


def results_dict(results: list[SweepPoint]) -> list[dict]:
    return [asdict(r) for r in results]


def plot_sweep(
    results: list[SweepPoint], metric: str, path, *, reference: float | None = None, title=""
) -> None:
    """Metric against average FFN bits, one line per method, to a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ffnsplit.fsutil import atomic_path

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.average_bits)
        axes.plot(
            [r.average_bits for r in rows],
            [r.metrics[metric] for r in rows],
            marker="o",
            label=method,
        )
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", label="dense")
    if metric.startswith("ppl") or metric.startswith("embedding"):
        axes.set_yscale("log")  # errors span orders of magnitude across bit widths
    axes.set_xlabel("average stored bits per FFN weight")
    axes.set_ylabel(metric)
    axes.set_title(title or f"{metric} vs FFN size")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
