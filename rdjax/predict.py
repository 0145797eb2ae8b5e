"""Score new images with a trained workdir: `rdjax predict --workdir=DIR
--input=FOLDER_OR_GLOB --output=OUT`.

Writes OUT/overlays/<name>.png (the decision picture: OK/NG, score, normalized score,
the plain image beside the image blended with its map on one colour scale for the run,
the mask outlined, the map's peak marked, a colour bar; rdjax.outputs.decision_picture),
OUT/masks/<name>_mask.png (when the workdir is calibrated;
rdjax.calibration.explanation_masks), OUT/scores.csv and OUT/report.html (every image
with its heat map and score, a threshold slider and where the threshold came from;
rdjax.webpage).

<name> keeps the input's path under the input folder, folders included, with its
extension folded into the file name (line3/a/part.png -> line3/a/part_png): distinct
inputs have distinct names by construction, since an image extension holds no '_'.
Every file of the input is accounted for: scores.csv has a row for each, with status
`scored`, or `skipped` and the reason (not an image file, or an image that does not
decode), and report.html a card for each. scores.csv and report.html appear only when
every file has been processed. Each scored row names the category whose thresholds
decided it and that image threshold (`--category`: a unified model's category, 'global',
or 'auto' to recognise each image's product with the workdir's router, rdjax.router).

An --output that holds files already is refused unless --overwrite is given; then the
files predict writes (OWNED: overlays/, masks/, scores.csv, report.html; with
--format=mvtec_ad_2 that category's folders of maps) are removed first, and nothing else
there is touched, so no picture of an earlier run sits beside the new scores.

`--format=mvtec_ad_2` takes one category folder of MVTec AD 2 and writes only the maps of
its private test sets, in the layout MVTec's evaluation server takes
(rdjax.data.mvtec_ad2; docs/datasets.md)."""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rdjax.data.preprocess import IMAGE_EXTENSIONS
from rdjax.errors import DataError, WorkdirError

if TYPE_CHECKING:
    from rdjax.inference import Model as Predictor


OWNED = ("overlays", "masks", "scores.csv", "report.html")  # what predict_folder writes under --output


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an --output that is a file, or a folder with files in it unless
    ``overwrite``: checked before the model loads, so a refusal costs nothing."""
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"{out}: exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise WorkdirError(
            f"{out}: holds files already (an earlier run's?); choose a new --output, or pass --overwrite to "
            "replace what rdjax predict writes there"
        )


def clear_owned(owned: list[Path]) -> None:
    """Remove what this command writes under --output (--overwrite), and nothing else."""
    for path in owned:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def find_inputs(pattern: str) -> list[Path]:
    """Every file of a folder (searched recursively) or a glob, images or not."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def output_names(files: list[Path], root: Path) -> list[str]:
    """One output name per input file, distinct by construction (the module docstring)."""
    names = []
    for f in files:
        rel = f.relative_to(root)
        names.append((rel.parent / f"{rel.stem}_{rel.suffix.lstrip('.').lower()}").as_posix())
    return names


def _decode(files: list[Path], bar: Any) -> tuple[list[Path], list[np.ndarray], dict[Path, str]]:
    """The readable files of a chunk and their images, and each unreadable one's reason."""
    from tqdm import tqdm

    from rdjax import inference

    kept, arrays, failed = [], [], {}
    for f in files:
        try:
            arrays.append(inference.as_images(f)[0])
            kept.append(f)
        except DataError as e:
            failed[f] = str(e)
            tqdm.write(f"skipped {e}", file=sys.stderr)
            bar.update(1)
    return kept, arrays, failed


def _colour_range(model: Predictor, maps: list[np.ndarray]) -> tuple[float, float]:
    """One colour scale for the whole run (report.html's thumbnails; each decision picture
    takes its own threshold's): the default threshold's if known, else the first batch's."""
    from rdjax.calibration import colour_scale

    if model.image_threshold is not None:
        return colour_scale(model.image_threshold)
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
    category: str | None = None,
    overwrite: bool = False,
) -> None:
    from tqdm import tqdm

    from rdjax import inference, outputs, webpage
    from rdjax.workdir import write_csv

    files = find_inputs(pattern)
    images = [f for f in files if is_image(f)]
    if not images:
        raise DataError(f"{pattern}: no image files found")
    check_output(out, overwrite)
    model = inference.load(workdir, dtype=dtype, category=category)
    if model.calibration is None:
        print(f"warning: {workdir} has no calibration.json: no decisions or masks", file=sys.stderr)
    clear_owned([out / name for name in OWNED])
    root = Path(pattern) if Path(pattern).is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    names = dict(zip(files, output_names(files, root)))
    skipped = {f: f"not an image file ({f.suffix or 'no extension'})" for f in files if not is_image(f)}
    rows: dict[Path, dict] = {}
    scores: list[float] = []
    thumbnail_maps: list[np.ndarray] = []  # the page's, small: the full-resolution maps are not kept
    lo_hi = None
    bar = tqdm(total=len(images), unit="img", desc="predicting", disable=None)
    for start in range(0, len(images), batch_size):
        chunk, arrays, failed = _decode(images[start : start + batch_size], bar)
        skipped.update(failed)
        if not chunk:
            continue
        pred = model.predict(arrays, batch_size, resize, tile_size, overlap)
        lo_hi = lo_hi or _colour_range(model, pred.maps)
        for i, f in enumerate(chunk):
            rows[f] = outputs.write_prediction(out, names[f], str(f), arrays[i], pred, i, lo_hi, model.recipe)
            scores.append(float(pred.scores[i]))
            thumbnail_maps.append(webpage.shrink_map(pred.maps[i]))
        bar.update(len(chunk))
    bar.close()
    done = list(rows)
    write_csv(out / "scores.csv", outputs.PREDICTION_FIELDS,
              [rows.get(f) or outputs.skipped_row(str(f), skipped[f]) for f in files])  # fmt: skip
    cal = model.calibration
    if cal is not None:  # a calibration.json older than its 'quantile' key: the workdir config's
        cal = {"quantile": model.config.threshold.quantile, **cal}
    page = webpage.Page(
        f"rdjax predict: {workdir}", np.array(scores), [f.relative_to(root).as_posix() for f in done],
        lambda idx: [inference.as_images(done[i])[0] for i in idx], threshold=model.image_threshold,
        pictures={i: f"overlays/{names[f]}.png" for i, f in enumerate(done)},
        skipped=[(f.relative_to(root).as_posix(), skipped[f]) for f in files if f in skipped],
        maps=None if lo_hi is None else lambda idx: [thumbnail_maps[i] for i in idx], colour_range=lo_hi,
        calibration=cal,
    )  # fmt: skip
    webpage.write_page(out / "report.html", page)
    flagged = sum(r["decision"] == "anomalous" for r in rows.values())
    deciders = sorted({r["category"] for r in rows.values() if r["category"]})
    decided = f", decided by the thresholds of {', '.join(deciders)}" if deciders else ""
    print(f"{len(rows)} images scored, {flagged} anomalous{decided}, {len(skipped)} files skipped "
          f"(scores.csv says why) -> {out / 'scores.csv'}")  # fmt: skip


def predict_mvtec_ad2(
    workdir: str,
    folder: str,
    out: Path,
    batch_size: int = 32,
    dtype: str | None = None,
    resize: str | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    category: str | None = None,
    overwrite: bool = False,
) -> None:
    """The maps of the test_private and test_private_mixed images of a category's
    ``folder``, at each image's resolution, under ``out`` as MVTec AD 2's server takes
    them; the thresholded maps are the calibrated workdir's masks (none without a
    calibration). ``category``: a unified workdir's thresholds to use (see rdjax.load)."""
    from tqdm import tqdm

    from rdjax import inference
    from rdjax.data import mvtec_ad2

    category_dir = Path(folder).resolve()
    inputs = mvtec_ad2.private_images(category_dir)
    check_output(out, overwrite)
    model = inference.load(workdir, dtype=dtype, category=category)
    if model.calibration is None:
        print(f"warning: {workdir} has no calibration.json: no {mvtec_ad2.THRESHOLDED}", file=sys.stderr)
    clear_owned([out / kind / category_dir.name for kind in (mvtec_ad2.MAPS, mvtec_ad2.THRESHOLDED)])
    for start in tqdm(range(0, len(inputs), batch_size), unit="batch", desc="predicting", disable=None):
        chunk = inputs[start : start + batch_size]
        pred = model.predict([f for _, f in chunk], batch_size, resize, tile_size, overlap)
        for i, (split, f) in enumerate(chunk):
            mask = None if pred.masks is None else pred.masks[i]
            mvtec_ad2.write_submission(out, category_dir.name, split, f, pred.maps[i], mask)
    print(f"{len(inputs)} maps of {category_dir.name} -> {out}")


if __name__ == "__main__":  # 0.2.0's spelling: say the one that works, import nothing back
    raise SystemExit("error: `python -m rdjax.predict` is gone; use `rdjax predict` or `python -m rdjax predict`")
