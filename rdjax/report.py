"""The evaluation report: one PNG sheet per evaluation, made with matplotlib.

Top row: ROC curve (image level), PRO curve up to FPR 0.3 (MVTec standard), histograms
of good and defective image scores with the threshold. Bottom rows: the highest-scoring
good images and the lowest-scoring defective ones (the candidates for false positives and
false negatives), each with its anomaly map, titled with what happened to it at the
calibrated threshold (true or false positive or negative).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rdjax.metrics import PixelStats
from rdjax.outputs import Cases, outcome
from rdjax.workdir import atomic_path


def write_report(
    path: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    pixels: PixelStats,
    cases: Cases,
    calibration: dict | None,
    roc: tuple[np.ndarray, np.ndarray] | None,
    pro: tuple[np.ndarray, np.ndarray] | None,
) -> Path:
    """``roc``: the image ROC curve (fpr, tpr), None with one class only; ``pro``: the PRO
    curve up to FPR 0.3, None without regions (computed once, shared with report.html)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score

    worst = max(int(np.sum(cases.labels == 0)), int(np.sum(cases.labels != 0)), 4)
    fig = plt.figure(figsize=(16, 12))  # fixed margins: a constrained layout saves much slower
    fig.subplots_adjust(left=0.04, right=0.99, top=0.96, bottom=0.02, wspace=0.3, hspace=0.35)
    grid = fig.add_gridspec(3, 2 * worst)
    third = (2 * worst) // 3

    ax = fig.add_subplot(grid[0, :third])
    if roc is not None:
        ax.plot(*roc, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(title="ROC (images)", xlabel="false positive rate", ylabel="true positive rate")

    ax = fig.add_subplot(grid[0, third : 2 * third])
    if pro is not None:
        ax.plot(*pro, label=f"AUPRO {pixels.aupro():.3f}")
        ax.legend(loc="lower right")
    ax.set(title="PRO up to FPR 0.3 (pixels)", xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 0.3))

    ax = fig.add_subplot(grid[0, 2 * third :])
    bins = np.linspace(scores.min(), scores.max(), 30).tolist()
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good")
    ax.hist(scores[labels != 0], bins=bins, alpha=0.6, label="defective")
    if calibration is not None:
        ax.axvline(
            calibration["image_threshold"], color="k", linestyle="--", label=f"threshold ({calibration['method']})"
        )
    ax.set(title="image scores", xlabel="score", ylabel="images")
    ax.legend()

    _draw_cases(fig, grid, cases, None if calibration is None else calibration["image_threshold"])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


def _draw_cases(fig: Any, grid: Any, cases: Cases, threshold: float | None) -> None:
    """Rows 2 and 3: the good and the defective hardest cases, each image beside its map."""
    rows = [np.flatnonzero(cases.labels == 0), np.flatnonzero(cases.labels != 0)]
    for r, chosen in enumerate(rows, start=1):
        for j, i in enumerate(chosen):
            kind = outcome(int(cases.labels[i]), None if threshold is None else bool(cases.scores[i] >= threshold))
            ax = fig.add_subplot(grid[r, 2 * j])
            ax.imshow(cases.images[i])
            if cases.masks[i].any():
                ax.contour(cases.masks[i], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{kind}\n{cases.filenames[i]}", fontsize=8)
            ax.axis("off")
            ax = fig.add_subplot(grid[r, 2 * j + 1])
            ax.imshow(cases.maps[i], cmap="jet", vmin=cases.lo, vmax=cases.hi)
            ax.set_title(f"score {cases.scores[i]:.4f}", fontsize=8)
            ax.axis("off")
