"""The evaluation report: one PNG sheet per evaluation, made with matplotlib.

A title (what was evaluated, its headline metrics, the threshold, where it came from, the
test images' true and false positives and negatives at it, and a warning where it rests
on few images). Top row: ROC curve (image level), PRO curve up to FPR 0.3 (MVTec
standard), histograms of good and defective image scores with the threshold. Then a row
of the highest-scoring good images and one of the lowest-scoring defective ones (the
candidates for false positives and false negatives), each image (at its map's size, the
truth outlined) beside its anomaly map, titled with what happened to it at the calibrated
threshold (true or false positive or negative); the maps share one colour scale, the
threshold in its middle (thresholds.colour_scale), and each row has its colour bar.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.outputs.pictures import Cases, fit_image, outcome
from rdjax.runtime.disk import atomic_path
from rdjax.scoring.metrics import METRIC_NAMES, TABLE_KEYS, PixelStats
from rdjax.scoring.thresholds import confusion, describe, few_images

WIDTH = 16.0  # inches; at the saved 80 dpi, 1280 px
CURVES_HEIGHT = 4.2  # inches: the curves' row
SUBTITLE_WIDTH = 120  # characters: a longer line of the subtitle is wrapped to stay on the sheet


def subtitle(
    metrics: Mapping[str, Any] | None, calibration: Mapping[str, Any] | None, counts: Mapping[str, int] | None = None
) -> str:
    """The lines under the sheet's title: the table's metrics (percent, those defined), the
    image level on one line and the pixel level on the next; then the image threshold and where it came from
    (rdjax.scoring.thresholds.describe), the test images' decisions at it (``counts``:
    thresholds.confusion) and the warning of a threshold on few images."""
    levels: list[list[str]] = [[], []]
    for key in TABLE_KEYS:
        value = None if metrics is None else metrics.get(key)
        if value is not None and np.isfinite(value):
            levels[not key.startswith("image_")].append(f"{METRIC_NAMES[key]} {100 * float(value):.1f}")
    lines = ["   |   ".join(parts) for parts in levels if parts]
    if calibration is not None:
        lines.append(f"image threshold {calibration['image_threshold']:.4g}   |   {describe(dict(calibration))}")
        if counts is not None:
            lines.append(
                f"test images at the threshold: {counts['true_positives']} true positives, "
                f"{counts['false_positives']} false positives, {counts['true_negatives']} true negatives, "
                f"{counts['false_negatives']} false negatives"
            )
        warning = few_images(dict(calibration))
        if warning:
            lines += textwrap.wrap(f"warning: {warning}", SUBTITLE_WIDTH)
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ScoredSet:
    """A test set as the evaluation pass scored it: its labels (0 = good), image scores
    and pixel statistics."""

    labels: np.ndarray
    scores: np.ndarray
    pixels: PixelStats


@dataclasses.dataclass(frozen=True)
class Curves:
    """``roc``: the image ROC curve (fpr, tpr), None with one class only; ``pro``: the PRO
    curve up to FPR 0.3, None without regions (computed once, shared with report.html)."""

    roc: tuple[np.ndarray, np.ndarray] | None
    pro: tuple[np.ndarray, np.ndarray] | None


def write_report(
    path: Path,
    scored: ScoredSet,
    cases: Cases,
    calibration: dict | None,
    curves: Curves,
    title: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """``title``: what was evaluated; ``metrics``: a result whose TABLE_KEYS head the sheet
    (None: the image AUROC and AUPRO the curves give)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score

    labels, scores = scored.labels, scored.scores
    auroc = None if curves.roc is None else float(roc_auc_score(labels, scores))
    aupro = None if curves.pro is None else scored.pixels.aupro()
    groups = [g for g in (np.flatnonzero(cases.labels == 0), np.flatnonzero(cases.labels != 0)) if len(g)]
    columns = 2 * max(4, *(len(g) for g in groups)) if groups else 8
    row_height = (WIDTH - 1.0) / columns + 0.9  # square images, two title lines and the row's title
    counts = None if calibration is None else confusion(labels, scores, calibration["image_threshold"])
    head = subtitle(metrics or {"image_auroc": auroc, "aupro": aupro}, calibration, counts)
    fig = plt.figure(
        figsize=(WIDTH, 0.8 + 0.25 * head.count("\n") + CURVES_HEIGHT + row_height * len(groups)),
        layout="constrained",
    )
    fig.suptitle(f"{title}\n{head}".strip(), fontsize=13)
    heights = [CURVES_HEIGHT] + [row_height] * len(groups)
    top, *rows = fig.subfigures(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    _draw_curves(top, scored, calibration, curves, auroc, aupro)
    threshold = None if calibration is None else calibration["image_threshold"]
    for sub, group in zip(rows, groups):
        _draw_cases(sub, cases, group, columns, threshold)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def _draw_curves(
    fig: Any, scored: ScoredSet, calibration: dict | None, curves: Curves, auroc: float | None, aupro: float | None
) -> None:
    labels, scores, roc, pro = scored.labels, scored.scores, curves.roc, curves.pro
    ax_roc, ax_pro, ax_hist = fig.subplots(1, 3, width_ratios=[1, 1, 1.6])
    if roc is not None:
        ax_roc.plot(*roc, label=f"AUROC {auroc:.3f}")
        ax_roc.legend(loc="lower right")
    ax_roc.plot([0, 1], [0, 1], ":", color="gray")
    ax_roc.set(title="ROC (images)", xlabel="false positive rate", ylabel="true positive rate")

    if pro is not None:
        ax_pro.plot(*pro, label=f"AUPRO {aupro:.3f}")
        ax_pro.legend(loc="lower right")
    ax_pro.set(title="PRO up to FPR 0.3 (pixels)", xlabel="false positive rate", ylabel="per-region overlap")
    ax_pro.set(xlim=(0, 0.3), ylim=(-0.02, 1.02))

    bins = np.linspace(scores.min(), scores.max(), 30).tolist()
    ax_hist.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good")
    ax_hist.hist(scores[labels != 0], bins=bins, alpha=0.6, label="defective")
    if calibration is not None:
        ax_hist.axvline(
            calibration["image_threshold"], color="k", linestyle="--", label=f"threshold ({calibration['method']})"
        )
    ax_hist.set(title="image scores", xlabel="score", ylabel="images")
    ax_hist.legend()


def _draw_cases(fig: Any, cases: Cases, group: np.ndarray, columns: int, threshold: float | None) -> None:
    """One row of hardest cases (all good or all defective), each image beside its map,
    and the maps' colour bar."""
    defective = bool(cases.labels[group[0]])
    fig.suptitle(
        "lowest-scoring defective images (false negative candidates); truth outlined in red"
        if defective
        else "highest-scoring good images (false positive candidates)",
        fontsize=11,
    )
    axes = fig.subplots(1, columns)
    heat = None
    for j, i in enumerate(group):
        kind = outcome(int(cases.labels[i]), None if threshold is None else bool(cases.scores[i] >= threshold))
        ax = axes[2 * j]
        ax.imshow(fit_image(cases.images[i], cases.maps[i].shape))  # the masks are at the map's size too
        if cases.masks[i].any():
            _outline(ax, cases.masks[i])
        ax.set_title(f"{kind}\n{cases.filenames[i]}", fontsize=8)
        ax = axes[2 * j + 1]
        heat = ax.imshow(cases.maps[i], cmap="jet", vmin=cases.lo, vmax=cases.hi)
        ax.set_title(f"score {cases.scores[i]:.4f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    bar = fig.colorbar(heat, ax=axes.tolist(), shrink=0.9, aspect=15, pad=0.01, label="pixel score")
    if threshold is not None:  # marked as on a decision picture's bar
        bar.ax.axhline(threshold, color="k", linewidth=1.5)
        ticks = [cases.lo, threshold, cases.hi]
        bar.set_ticks(ticks, labels=[f"{cases.lo:.3g}", f"{threshold:.3g} threshold", f"{cases.hi:.3g}"])


def _outline(ax: Any, mask: np.ndarray) -> None:
    """The mask's outline in red, over an image of the mask's size: the contour of the
    mask padded with a blank border, so a region reaching the image's edge (or filling the
    image, where a contour of the mask alone has no level to draw) is closed along it."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), padded, levels=[0.5], colors="red", linewidths=0.8)
    ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5))
