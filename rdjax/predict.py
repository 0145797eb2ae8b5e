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

from rdjax.data.preprocess import IMAGE_EXTENSIONS
from rdjax.errors import DataError, WorkdirError


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
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from rdjax import inference, outputs, webpage
    from rdjax.workdir import atomic_path, write_csv

    files = find_inputs(pattern)
    if not files:
        raise DataError(f"{pattern}: no image files found")
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"{out}: exists and is not a folder; choose another --output")
    model = inference.load(workdir, dtype=dtype)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if model.calibration is not None:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    else:
        print(f"warning: {workdir} has no calibration.json: no decisions or masks", file=sys.stderr)
    root = Path(pattern) if Path(pattern).is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    names = dict(zip(files, output_names(files, root)))
    rows, done, scores, skipped, lo_hi = [], [], [], 0, None
    bar = tqdm(total=len(files), unit="img", desc="predicting", disable=None)
    for start in range(0, len(files), batch_size):
        chunk, arrays = [], []
        for f in files[start : start + batch_size]:
            try:
                arrays.append(inference.as_images(f)[0])
                chunk.append(f)
            except DataError as e:
                skipped += 1
                tqdm.write(f"skipped {e}", file=sys.stderr)
                bar.update(1)
        if not chunk:
            continue
        pred = model.predict(arrays, batch_size, resize, tile_size, overlap)
        if lo_hi is None:  # one colour scale for the whole run: the calibration range if known
            cal = model.calibration
            lo_hi = (
                (cal["pixel_min"], cal["pixel_max"])
                if cal
                else (float(min(m.min() for m in pred.maps)), float(max(m.max() for m in pred.maps)))
            )
        for i, f in enumerate(chunk):
            calibrated = pred.decisions is not None
            picture = outputs.decision_picture(
                arrays[i],
                pred.maps[i],
                *lo_hi,
                score=float(pred.scores[i]),
                anomalous=bool(pred.decisions[i]) if calibrated else None,
                normalized=float(pred.normalized_scores[i]) if calibrated else None,
                mask=pred.masks[i] if calibrated else None,
                caption=names[f],
            )
            with atomic_path(out / "overlays" / f"{names[f]}.png") as tmp:
                Image.fromarray(picture).save(tmp)
            row = {"file": str(f), "score": f"{pred.scores[i]:.6f}", "normalized_score": "", "decision": ""}
            if calibrated:
                with atomic_path(out / "masks" / f"{names[f]}_mask.png") as tmp:
                    Image.fromarray((pred.masks[i] * 255).astype(np.uint8)).save(tmp)
                row["normalized_score"] = f"{pred.normalized_scores[i]:.6f}"
                row["decision"] = "anomalous" if pred.decisions[i] else "normal"
            rows.append(row)
            done.append(f)
            scores.append(float(pred.scores[i]))
        bar.update(len(chunk))
    bar.close()
    write_csv(out / "scores.csv", ["file", "score", "normalized_score", "decision"], rows)
    if done:
        webpage.write_page(
            out / "report.html",
            f"rdjax predict: {workdir}",
            None,
            None,
            np.array(scores),
            [names[f] for f in done],
            lambda idx: [inference.as_images(done[i])[0] for i in idx],
            model.image_threshold,
            None,
            None,
            {i: f"overlays/{names[f]}.png" for i, f in enumerate(done)},
        )
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous, {skipped} skipped (unreadable) -> {out / 'scores.csv'}")


if __name__ == "__main__":
    from rdjax import cli

    sys.exit(cli.run(["predict", *sys.argv[1:]]))
