"""Figures of the run report, drawn with matplotlib (Agg) and returned as PNG bytes."""
from __future__ import annotations

import io
import textwrap

import numpy as np

KIND_COLOURS = {"clean": "#2e7d32", "mismatched": "#c62828", "non_english": "#6a1b9a", "scene_text": "#ef6c00",
                "uninformative": "#5d4037", "bad_size": "#1565c0", "exact_duplicate": "#00838f",
                "near_duplicate": "#9e9d24", None: "#9e9e9e"}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    # labels come from the pool (captions) and from users (recipe, step and run names): "$5 … $10"
    # is text, and a "$\\undefined$" must not fail the figure
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def funnel(steps: list[dict], pool_size: int, subset_size: int) -> bytes:
    plt = _plt()
    labels = ["pool"] + [s["step"] for s in steps] + ["subset (with repeats)"]
    values = [pool_size] + [s["kept_after"] for s in steps] + [subset_size]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=["#607d8b"] + ["#1976d2"] * len(steps) + ["#43a047"])
    ax.set_yticks(y, labels)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("samples kept")
    ax.set_title("Funnel: samples kept after each step")
    return _png(fig)


def histogram(scores: np.ndarray, kinds: np.ndarray | None, title: str, threshold: float | None) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    scores = np.asarray(scores, dtype=float)
    ok = np.isfinite(scores)
    bins = np.linspace(scores[ok].min(), scores[ok].max(), 50) if ok.any() else 10
    if kinds is not None:
        for kind in sorted({k for k in kinds if k is not None}, key=str):
            m = ok & (kinds == kind)
            ax.hist(scores[m], bins=bins, histtype="step", linewidth=1.4, label=kind, color=KIND_COLOURS.get(kind))
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.hist(scores[ok], bins=bins, color="#1976d2")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
        ax.text(threshold, ax.get_ylim()[1] * 0.95, f" threshold {threshold:.3f}", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    return _png(fig)


def image_grid(images: list, captions: list[str], kinds: list, title: str, cols: int = 6) -> bytes:
    plt = _plt()
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 2.0))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, cap, kind in zip(np.atleast_1d(axes).ravel(), images, captions, kinds):
        ax.imshow(img)
        colour = KIND_COLOURS.get(kind, "#9e9e9e")
        for side in ax.spines.values():
            side.set_visible(True)
            side.set_color(colour)
            side.set_linewidth(4)
        ax.set_title("\n".join(textwrap.wrap(cap, 22)[:2]), fontsize=6)
        ax.text(0.02, 0.02, kind or "", transform=ax.transAxes, fontsize=6, color="white",
                bbox={"facecolor": colour, "pad": 1, "edgecolor": "none"})
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def bars(names: list[str], values: list[float], title: str, xlabel: str = "score") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1))
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color="#1976d2")
    ax.set_yticks(y, names)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, max(values, default=1) * 1.15))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(fig)


def runs_chart(labels: list[str], averages: list[float]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.2))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, averages, color=["#43a047"] + ["#90a4ae"] * (len(labels) - 1))
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("average over tasks")
    ax.set_title("This run (green) against earlier runs")
    return _png(fig)


def ablation(labels: list[str], means: list[float], stds: list[float], parts: list[str]) -> bytes:
    """Horizontal bars with ± std whiskers: cumulative variants blue, leave-one-out orange,
    baselines grey."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(labels) + 1.2))
    y = np.arange(len(labels))[::-1]
    colour = ["#90a4ae" if p == "baseline" else "#ef6c00" if p.startswith("−") else "#1976d2" for p in parts]
    ax.barh(y, means, xerr=stds, color=colour, capsize=3)
    ax.set_yticks(y, labels, fontsize=7)
    for yi, m in zip(y, means):
        ax.text(m, yi, f"  {m:.3f}", va="bottom", fontsize=7)
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(max(0.0, lo - 0.05), max(m + s for m, s in zip(means, stds)) + 0.03)
    ax.set_xlabel("average over tasks (mean over seeds)")
    ax.set_title("Components added (blue), left out (orange), baselines (grey)")
    return _png(fig)
