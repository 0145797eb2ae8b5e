"""Outputs a person reads: result tables (markdown) and pictures of the hardest cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rdjax.workdir import atomic_path


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def results_markdown(result: dict) -> str:
    lines = [
        f"# {result.get('category', '')} (epoch {result.get('epoch')})",
        "",
        "| image AUROC | pixel AUROC | AUPRO (MVTec, FPR<=0.3) | PRO (RD4AD per-image) | image F1-max |",
        "|---|---|---|---|---|",
        f"| {_fmt(result['image_auroc'])} | {_fmt(result['pixel_auroc'])} | {_fmt(result['aupro'])} "
        f"| {_fmt(result['pro_rd4ad_per_image'])} | {_fmt(result['image_f1_max'])} |",
        "",
        "| defect type | images | image AUROC |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v['count']} | {_fmt(v['image_auroc'])} |" for t, v in result["per_type"].items()]
    for w in result.get("warnings", []):
        lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


HEADERS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
           "image_auroc_sum": "image AUROC (sum of map)"}


def summary_markdown(results: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """One table over categories with a mean row, in the paper's layout (percent)."""
    keys = keys or ("image_auroc", "pixel_auroc", "aupro")
    lines = ["| category | " + " | ".join(HEADERS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    means = [float(np.nanmean([r[k] for r in results.values()])) for k in keys]
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(m)}**" for m in means) + " |")
    return "\n".join(lines) + "\n"


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 image blended half and half with the map in the 'jet' colour map (fixed lo..hi)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    return (np.clip(0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat, 0, 1) * 255).astype(np.uint8)


def hardest_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest-scoring good images and the ``k`` lowest-scoring
    defective ones: the candidates for false positives and false negatives."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    return good[np.argsort(-scores[good], kind="stable")][:k], bad[np.argsort(scores[bad], kind="stable")][:k]


@dataclasses.dataclass
class Cases:
    """The hardest cases of an evaluation with their maps: all a report shows, and all
    it keeps (the other maps of the pass are gone)."""

    rows: np.ndarray
    images: np.ndarray  # uint8 (k, S, S, 3)
    masks: np.ndarray  # bool (k, S, S)
    maps: np.ndarray  # float32 (k, S, S)
    scores: np.ndarray
    filenames: list[str]
    labels: np.ndarray
    lo: float  # the colour scale: the lowest and highest pixel score of the whole pass
    hi: float


def write_overlays(directory: Path, cases: Cases) -> list[Path]:
    """(image | ground truth | map) sheets for the hardest cases. Maps share one colour scale."""
    from PIL import Image

    paths = []
    for rank in range(len(cases.rows)):
        img, mask = cases.images[rank], cases.masks[rank]
        gt = img.astype(np.float32)
        gt[mask] = 0.5 * gt[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
        sheet = np.concatenate([img, gt.astype(np.uint8), overlay(img, cases.maps[rank], cases.lo, cases.hi)], axis=1)
        group = "good_high" if cases.labels[rank] == 0 else "defect_low"
        name = cases.filenames[rank].replace("/", "_").rsplit(".", 1)[0]
        path = directory / f"{rank:02d}_{group}_{name}_score{cases.scores[rank]:.4f}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(sheet).save(tmp)
        paths.append(path)
    return paths


def write_evaluation(workdir: Path, epoch: int, result: dict) -> Path:
    """An evaluation's metrics and table into eval/epoch_NNNN/, copied to the workdir's top
    (the latest evaluation), with its calibration as calibration.json."""
    from rdjax.workdir import CALIBRATION, write_json, write_text

    out = evaluation_dir(workdir, epoch)
    if "calibration" in result:
        write_json(workdir / CALIBRATION, result["calibration"])
    table = results_markdown(result)
    for folder in (out, workdir):
        write_json(folder / "metrics.json", result)
        write_text(folder / "results.md", table)
    return out


def evaluation_dir(workdir: Path, epoch: int) -> Path:
    return workdir / "eval" / f"epoch_{epoch:04d}"
