"""Score new images with a trained workdir.

  python -m rdjax.predict --workdir=DIR --input=FOLDER_OR_GLOB --output=OUT

Writes OUT/overlays/<name>.png (image blended with its map), OUT/masks/<name>_mask.png
(when the workdir is calibrated) and OUT/scores.csv (file, score, normalized score,
decision). Unreadable files are reported and skipped; the last line counts them.
scores.csv appears only when every image has been processed.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from pathlib import Path

from absl import app, flags, logging

from rdjax.data.preprocess import IMAGE_EXTENSIONS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir.")
flags.DEFINE_string("input", None, "A folder (searched recursively) or a glob of image files.")
flags.DEFINE_string("output", None, "Output folder.")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
flags.DEFINE_string("dtype", None, "Compute dtype (float32 or bfloat16); default: the workdir's.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def find_inputs(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from rdjax import evaluate, inference
    from rdjax.data.preprocess import DataError

    files = find_inputs(FLAGS.input)
    if not files:
        print(f"error: {FLAGS.input}: no image files found", file=sys.stderr)
        sys.exit(1)
    model = inference.load_or_exit(FLAGS.workdir, FLAGS.dtype)
    out = Path(FLAGS.output)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if model.calibration is not None:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    else:
        print(f"warning: {FLAGS.workdir} has no calibration.json: no decisions or masks", file=sys.stderr)
    root = Path(FLAGS.input) if Path(FLAGS.input).is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    rows, skipped, lo_hi = [], 0, None
    bar = tqdm(total=len(files), unit="img", desc="predicting", disable=None)
    for start in range(0, len(files), FLAGS.batch_size):
        chunk, arrays = [], []
        for f in files[start:start + FLAGS.batch_size]:
            try:
                arrays.append(inference.as_images(f)[0])
                chunk.append(f)
            except DataError as e:
                skipped += 1
                tqdm.write(f"skipped {e}", file=sys.stderr)
                bar.update(1)
        if not chunk:
            continue
        pred = model.predict(arrays, FLAGS.batch_size)
        if lo_hi is None:  # one colour scale for the whole run: the calibration range if known
            cal = model.calibration
            lo_hi = (cal["pixel_min"], cal["pixel_max"]) if cal else (float(min(m.min() for m in pred.maps)), float(max(m.max() for m in pred.maps)))
        for i, f in enumerate(chunk):
            name = str(f.relative_to(root).with_suffix("")).replace(os.sep, "_")
            Image.fromarray(evaluate.overlay(arrays[i], pred.maps[i], *lo_hi)).save(out / "overlays" / f"{name}.png")
            row = {"file": str(f), "score": f"{pred.scores[i]:.6f}", "normalized_score": "", "decision": ""}
            if pred.decisions is not None:
                Image.fromarray((pred.masks[i] * 255).astype(np.uint8)).save(out / "masks" / f"{name}_mask.png")
                row["normalized_score"] = f"{pred.normalized_scores[i]:.6f}"
                row["decision"] = "anomalous" if pred.decisions[i] else "normal"
            rows.append(row)
        bar.update(len(chunk))
    bar.close()
    tmp = out / "scores.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "score", "normalized_score", "decision"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "scores.csv")
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous, {skipped} skipped (unreadable) -> {out / 'scores.csv'}")


if __name__ == "__main__":
    app.run(main)
