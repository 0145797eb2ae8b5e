"""Score new images with a trained workdir: `rdjax predict --workdir=DIR
--input=FOLDER_OR_GLOB --output=OUT`.

Writes OUT/overlays/<name>.png (the decision picture: OK/NG, score, normalized score,
the image blended with its map on one colour scale for the run, the mask outlined, the
map's peak marked, a colour bar; rdjax.outputs.decision_picture),
OUT/masks/<name>_mask.png (when the workdir is calibrated;
rdjax.calibration.explanation_masks), OUT/scores.csv (file, score, normalized score,
decision) and OUT/report.html (every image with its score and a threshold slider;
rdjax.webpage). <name> is the file's path under the input folder with '/' as '_'; files
that differ only in their extension (part.png, part.jpg) keep it (part_png, part_jpg),
so no output overwrites another. Unreadable files are reported and skipped; the last
line counts them. scores.csv and report.html appear only when every image has been
processed."""

from __future__ import annotations

import collections
import glob
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rdjax.data.preprocess import IMAGE_EXTENSIONS
from rdjax.errors import DataError, WorkdirError

if TYPE_CHECKING:
    from rdjax.inference import Model as Predictor


def find_inputs(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def output_names(files: list[Path], root: Path) -> list[str]:
    """One distinct output name per input file (see the module docstring)."""
    stems = [str(f.relative_to(root).with_suffix("")).replace(os.sep, "_") for f in files]
    counts = collections.Counter(stems)
    return [s if counts[s] == 1 else f"{s}_{f.suffix.lstrip('.').lower()}" for s, f in zip(stems, files)]


def _decode(files: list[Path], bar: Any) -> tuple[list[Path], list[np.ndarray]]:
    """The readable files of a chunk and their images; the others are reported and counted."""
    from tqdm import tqdm

    from rdjax import inference

    kept, arrays = [], []
    for f in files:
        try:
            arrays.append(inference.as_images(f)[0])
            kept.append(f)
        except DataError as e:
            tqdm.write(f"skipped {e}", file=sys.stderr)
            bar.update(1)
    return kept, arrays


def _colour_range(model: Predictor, maps: list[np.ndarray]) -> tuple[float, float]:
    """One colour scale for the whole run: the calibration's range if known, else the
    first batch's."""
    cal = model.calibration
    if cal:
        return cal["pixel_min"], cal["pixel_max"]
    return float(min(m.min() for m in maps)), float(max(m.max() for m in maps))


def predict_folder(
    workdir: str,
    pattern: str,
    out: Path,
    batch_size: int = 32,
    dtype: str | None = None,
    resize: str | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
) -> None:
    from tqdm import tqdm

    from rdjax import inference, outputs

    files = find_inputs(pattern)
    if not files:
        raise DataError(f"{pattern}: no image files found")
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"{out}: exists and is not a folder; choose another --output")
    model = inference.load(workdir, dtype=dtype)
    if model.calibration is None:
        print(f"warning: {workdir} has no calibration.json: no decisions or masks", file=sys.stderr)
    root = Path(pattern) if Path(pattern).is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    names = dict(zip(files, output_names(files, root)))
    rows: list[dict] = []
    scores: list[float] = []
    done: list[Path] = []
    lo_hi = None
    bar = tqdm(total=len(files), unit="img", desc="predicting", disable=None)
    for start in range(0, len(files), batch_size):
        chunk, arrays = _decode(files[start : start + batch_size], bar)
        if not chunk:
            continue
        pred = model.predict(arrays, batch_size, resize, tile_size, overlap)
        lo_hi = lo_hi or _colour_range(model, pred.maps)
        for i, f in enumerate(chunk):
            rows.append(outputs.write_prediction(out, names[f], str(f), arrays[i], pred, i, lo_hi))
            scores.append(float(pred.scores[i]))
            done.append(f)
        bar.update(len(chunk))
    bar.close()
    outputs.write_prediction_summary(out, f"rdjax predict: {workdir}", rows, scores, [names[f] for f in done],
                                     lambda idx: [inference.as_images(done[i])[0] for i in idx],
                                     model.image_threshold)  # fmt: skip
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous, {len(files) - len(rows)} skipped (unreadable) "
          f"-> {out / 'scores.csv'}")  # fmt: skip


if __name__ == "__main__":  # 0.2.0's spelling: say the one that works, import nothing back
    raise SystemExit("error: `python -m rdjax.predict` is gone; use `rdjax predict` or `python -m rdjax predict`")
