"""Figures of a Profile: where the heavy hitters are, layer by layer, at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from ffnsplit.errors import OptionError  # noqa: E402
from ffnsplit.fsutil import atomic_path  # noqa: E402
from ffnsplit.profile import SHARE_FRACTIONS, Profile  # noqa: E402

PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_format(path: str | os.PathLike) -> str:
    """The image format a plot path's suffix names (png without one); a one-line OptionError for
    a suffix matplotlib would not write as that format."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    if not suffix:
        return "png"
    if suffix not in PLOT_FORMATS:
        raise OptionError(
            f"--plot {path}: cannot draw a .{suffix} image; use .png, .pdf, .svg or .jpg"
        )
    return suffix


def plot_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Write an image in the format of path's suffix (plot_format): top-1/5/10% output-norm
    shares and half-to-half overlap per layer (left), and every layer's neurons sorted by mean
    output norm on a log scale (right)."""
    image_format = plot_format(path)
    rows = profile.summary_rows()
    layers = np.arange(len(rows))
    figure, (shares_axis, curves_axis) = plt.subplots(
        1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.3, 1]}
    )

    width = 0.8 / len(SHARE_FRACTIONS)
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(SHARE_FRACTIONS)))
    for position, (fraction, color) in enumerate(zip(SHARE_FRACTIONS, colors, strict=True)):
        percent = round(fraction * 100)
        shares = [100 * row[f"top{percent}_share"] for row in rows]
        offset = (position - (len(SHARE_FRACTIONS) - 1) / 2) * width
        shares_axis.bar(layers + offset, shares, width, color=color, label=f"top {percent}%")
        shares_axis.axhline(100 * fraction, color=color, linestyle=":", linewidth=1)
    overlap = [100 * row["overlap5"] for row in rows]
    shares_axis.plot(layers, overlap, "k.-", linewidth=1, label="overlap of top 5% (two halves)")
    shares_axis.set_xlabel("FFN layer")
    shares_axis.set_ylabel("% of the layer's summed mean output norm")
    shares_axis.set_ylim(0, 105)
    shares_axis.set_xticks(layers[:: max(1, len(rows) // 15)])
    shares_axis.set_title("Output norm carried by the heaviest neurons\n(dotted: a uniform layer)")
    shares_axis.legend(loc="center left", fontsize=8, framealpha=0.9)
    shares_axis.grid(axis="y", alpha=0.3)

    colormap = plt.get_cmap("plasma")
    norm = Normalize(vmin=0, vmax=max(1, len(rows) - 1))
    for index in range(profile.num_layers):
        scores = profile.score(index).double().sort(descending=True).values.numpy()
        mean = scores.mean()
        relative = scores / mean if mean > 0 else scores
        rank = np.arange(1, len(scores) + 1) / len(scores) * 100
        curves_axis.plot(rank, relative, color=colormap(norm(index)), linewidth=1, alpha=0.8)
    curves_axis.set_xscale("log")
    curves_axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    curves_axis.set_yscale("log")
    curves_axis.set_xlabel("neuron rank (% of the layer, heaviest first; log scale)")
    curves_axis.set_ylabel("mean output norm / layer mean")
    curves_axis.set_title("Sorted neuron scores per layer")
    curves_axis.grid(alpha=0.3, which="both")
    colorbar = figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), ax=curves_axis)
    colorbar.set_label("layer")

    meta = profile.meta
    corpus = (meta.get("corpus") or {}).get("name", "?")
    model = meta.get("model_name") or (meta.get("model") or {}).get("model_type", "?")
    figure.suptitle(
        f"{model}: {meta.get('tokens', 0):,} tokens of {corpus}, seq len {meta.get('seq_len', '?')}"
    )
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=image_format, dpi=120)
    finally:
        plt.close(figure)
