"""Score new images with a trained workdir: `rdjax predict --workdir=DIR
--input=FOLDER_OR_GLOB --output=OUT`.

Writes OUT/overlays/<name>.png (the decision picture: OK/NG, score, normalized score,
the plain image beside the image blended with its map on one colour scale for the run,
the mask outlined, the map's peak marked, a colour bar; rdjax.outputs.pictures.decision_picture),
OUT/masks/<name>_mask.png (when the workdir is calibrated;
rdjax.scoring.thresholds.explanation_masks), OUT/scores.csv and OUT/report.html (every image
with its heat map and score, a threshold slider and where the threshold came from;
rdjax.outputs.webpage).

<name> keeps the input's path under the input folder, folders included, with its
extension folded into the file name (line3/a/part.png -> line3/a/part_png): distinct
inputs have distinct names by construction, since an image extension holds no '_'. Each
folder and file name of <name> is made valid on Linux, macOS and Windows
(rdjax.deploy.names.portable: what is not UTF-8 or Windows refuses is escaped as %XX, a
name longer than NAME_BYTES is cut and given a hash), and names that would share a file
on a case-insensitive file system get a hash each (rdjax.deploy.names.output_names).
Every path written is checked to lie within OUT (rdjax.outputs.files.inside); a disk
that fills or refuses a write is one line, and what the run wrote is removed.
Every file of the input is accounted for: scores.csv has a row for each, with status
`scored`, or `skipped` and the reason (not an image file, or an image that does not
decode), and report.html a card for each. scores.csv and report.html appear only when
every file has been processed. Each scored row names the category whose thresholds
decided it and that image threshold (`--category`: a unified model's category, 'global',
or 'auto' to recognise each image's product with the workdir's router, rdjax.scoring.router).

An --output that holds files already is refused unless --overwrite is given; then the
files predict writes (OWNED: overlays/, masks/, scores.csv, report.html; with
--format=mvtec_ad_2, whose --output gathers every category, only that category's folders
of maps count and are removed) are removed first, and nothing else there is touched, so
no picture of an earlier run sits beside the new scores. An input inside what would be
removed is refused.

`--format=mvtec_ad_2` takes one category folder of MVTec AD 2 and writes only the maps of
its private test sets, in the layout MVTec's evaluation server takes
(rdjax.data.mvtec_ad2; docs/datasets.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

from rdjax import modes
from rdjax.data.preprocess import IMAGE_EXTENSIONS, printable
from rdjax.deploy.images import as_images
from rdjax.deploy.names import output_names
from rdjax.errors import DataError, WorkdirError

if TYPE_CHECKING:
    from rdjax.deploy.predictor import Predictor


OWNED = ("overlays", "masks", "scores.csv", "report.html")  # what predict_folder writes under --output


def check_output(out: Path, overwrite: bool, owned: list[Path], inputs: list[Path], shared: bool = False) -> None:
    """Refuse an --output that is a file, or one that holds files already unless
    ``overwrite`` (``shared``: only ``owned`` counts, for MVTec AD 2's submission folder,
    which gathers every category's maps), and an --overwrite that would remove an input.
    Checked before the model loads, so a refusal costs nothing."""
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"{out}: exists and is not a folder; choose another --output")
    used = [p for p in owned if p.exists()] if shared else (list(out.iterdir()) if out.is_dir() else [])
    if used and not overwrite:
        raise WorkdirError(
            f"{used[0] if shared else out}: holds files already (an earlier run's?); choose a new --output, or pass "
            "--overwrite to replace what rdjax predict writes there"
        )
    doomed = [p.resolve() for p in owned if p.exists()]
    hit = next((f for f in inputs if any(f.resolve().is_relative_to(d) for d in doomed)), None)
    if overwrite and hit is not None:
        raise WorkdirError(f"{hit}: an input inside what --overwrite would remove; choose another --output")


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


def _decode(files: list[Path], bar: Any) -> tuple[list[Path], list[np.ndarray], dict[Path, str]]:
    """The readable files of a chunk and their images, and each unreadable one's reason."""
    from tqdm import tqdm

    kept, arrays, failed = [], [], {}
    for f in files:
        try:
            arrays.append(as_images(f)[0])
            kept.append(f)
        except DataError as e:
            failed[f] = str(e)
            tqdm.write(f"skipped {e}", file=sys.stderr)
            bar.update(1)
    return kept, arrays, failed


def _colour_range(model: Predictor, maps: list[np.ndarray]) -> tuple[float, float]:
    """One colour scale for the whole run (report.html's thumbnails; each decision picture
    takes its own threshold's): the default threshold's if known, else the first batch's."""
    from rdjax.scoring.thresholds import colour_scale

    if model.image_threshold is not None:
        return colour_scale(model.image_threshold)
    return float(min(m.min() for m in maps)), float(max(m.max() for m in maps))


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """What `rdjax predict` takes besides the workdir, the input and the output, for either
    --format. ``resize``, ``tile_size`` and ``overlap`` left as None take the setting the
    thresholds were calibrated with (rdjax.Predictor.predict); ``category``: a unified
    workdir's thresholds to use (see rdjax.load); ``overwrite``: replace what an earlier
    predict wrote into the output (`check_output`)."""

    batch_size: int = 32
    dtype: str | None = None
    resize: str | None = None
    tile_size: int | None = None
    overlap: int | None = None
    category: str | None = None
    overwrite: bool = False


def predict_folder(workdir: str, pattern: str, out: Path, options: PredictOptions = PredictOptions()) -> None:
    """Every file of ``pattern`` (a folder or a glob) scored by ``workdir``'s model into ``out``
    (the module docstring)."""
    from rdjax.deploy import predictor

    files = find_inputs(pattern)
    images = [f for f in files if is_image(f)]
    if not images:
        raise DataError(f"{pattern}: no image files found")
    owned, created = [out / name for name in OWNED], not out.exists()
    check_output(out, options.overwrite, owned, images)
    model = predictor.load(workdir, dtype=options.dtype, category=options.category)
    if model.calibration is None:
        print(f"warning: {workdir} has no calibration.json: no decisions or masks", file=sys.stderr)
    clear_owned(owned)
    with undone_on_write_error(out, owned, created):
        _predict_files(model, workdir, pattern, files, images, out, options)


@contextlib.contextmanager
def undone_on_write_error(out: Path, owned: list[Path], created: bool) -> Iterator[None]:
    """A full disk or a refused write inside the block: what predict wrote (``owned``,
    and --output itself where this run ``created`` it) is removed, and the error is one
    line; nothing half-written stays."""
    try:
        yield
    except OSError as e:
        clear_owned(owned)
        for path in owned:  # folders left empty, up to --output (itself only where this run made it)
            parent = path.parent
            while parent != out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(e, WorkdirError):
            raise
        where = printable(str(e.filename or out))
        raise WorkdirError(f"{where}: cannot write ({e.strerror or e}); predict removed what it had written") from None


@dataclasses.dataclass
class _Scored:
    """What predict_folder's pass over the images gathers for scores.csv and report.html."""

    rows: dict[Path, dict]  # each scored file's row, in input order
    scores: list[float]
    thumbnail_maps: list[np.ndarray]  # the page's, small: the full-resolution maps are not kept
    lo_hi: tuple[float, float] | None  # the run's colour scale (`_colour_range`), once a batch is scored


def _score_images(
    model: Predictor, images: list[Path], names: dict[Path, str], out: Path, options: PredictOptions,
    skipped: dict[Path, str],
) -> _Scored:  # fmt: skip
    """Each image's picture and mask written and its row made, batch by batch; files that
    do not decode join ``skipped``."""
    from tqdm import tqdm

    from rdjax.outputs import files as outputs
    from rdjax.outputs import webpage

    scored = _Scored({}, [], [], None)
    bar = tqdm(total=len(images), unit="img", desc="predicting", disable=None)
    for start in range(0, len(images), options.batch_size):
        chunk, arrays, failed = _decode(images[start : start + options.batch_size], bar)
        skipped.update(failed)
        if not chunk:
            continue
        pred = model.predict(arrays, options.batch_size, options.resize, options.tile_size, options.overlap)
        scored.lo_hi = lo_hi = scored.lo_hi or _colour_range(model, pred.maps)
        for i, f in enumerate(chunk):
            scored.rows[f] = outputs.write_prediction(out, names[f], str(f), arrays[i], pred, i, lo_hi, model.recipe)
            scored.scores.append(float(pred.scores[i]))
            scored.thumbnail_maps.append(webpage.shrink_map(pred.maps[i]))
        bar.update(len(chunk))
    bar.close()
    return scored


def _predict_files(
    model: Predictor, workdir: str, pattern: str, files: list[Path], images: list[Path], out: Path,
    options: PredictOptions,
) -> None:  # fmt: skip
    """predict_folder's work once the model is loaded: every file's row, picture and card."""
    from rdjax.outputs import files as outputs
    from rdjax.outputs import webpage
    from rdjax.runtime.disk import write_csv

    root = Path(pattern) if Path(pattern).is_dir() else Path(os.path.commonpath([str(f.parent) for f in files]))
    names = dict(zip(images, output_names(images, root)))
    skipped = {f: f"not an image file ({f.suffix or 'no extension'})" for f in files if not is_image(f)}
    scored = _score_images(model, images, names, out, options, skipped)
    rows, lo_hi = scored.rows, scored.lo_hi
    done = list(rows)
    table = [rows.get(f) or outputs.skipped_row(str(f), skipped[f]) for f in files]
    for row in table:  # any name survives: bytes that are not UTF-8 as \xNN (docs/usage.md)
        row["file"], row["reason"] = printable(row["file"]), printable(row["reason"])
    write_csv(outputs.inside(out, "scores.csv"), outputs.PREDICTION_FIELDS, table)
    cal = None if model.calibration is None else model.calibration.to_json()
    thresholds = {r["threshold"] for r in rows.values()}
    if len(thresholds) > 1:  # routed (--category=auto): no one threshold for the page's slider; the cards say
        cal = None
    elif cal is not None:  # a calibration.json older than its 'quantile' key: the workdir config's
        cal = {"quantile": model.config.threshold.quantile, **cal}
    page = webpage.Page(
        f"rdjax predict: {workdir}", np.array(scored.scores), [f.relative_to(root).as_posix() for f in done],
        lambda idx: [as_images(done[i])[0] for i in idx],
        threshold=None if cal is None else model.image_threshold,
        pictures={i: f"overlays/{names[f]}.png" for i, f in enumerate(done)},
        skipped=[(f.relative_to(root).as_posix(), skipped[f]) for f in files if f in skipped],
        maps=None if lo_hi is None else lambda idx: [scored.thumbnail_maps[i] for i in idx], colour_range=lo_hi,
        calibration=cal,
    )  # fmt: skip
    webpage.write_page(outputs.inside(out, "report.html"), page)
    flagged = sum(r["decision"] == "anomalous" for r in rows.values())
    deciders = sorted({r["category"] for r in rows.values() if r["category"]})
    decided = f", decided by the thresholds of {', '.join(deciders)}" if deciders else ""
    print(f"{len(rows)} images scored, {flagged} anomalous{decided}, {len(skipped)} files skipped "
          f"(scores.csv says why) -> {printable(str(out / 'scores.csv'))}")  # fmt: skip


def predict_mvtec_ad2(workdir: str, folder: str, out: Path, options: PredictOptions = PredictOptions()) -> None:
    """The maps of the test_private and test_private_mixed images of a category's
    ``folder``, at each image's resolution, under ``out`` as MVTec AD 2's server takes
    them; the thresholded maps are the calibrated workdir's masks (none without a
    calibration)."""
    from tqdm import tqdm

    from rdjax.data import mvtec_ad2
    from rdjax.deploy import predictor

    category_dir = Path(folder).resolve()
    inputs = mvtec_ad2.private_images(category_dir)
    owned = [out / kind / category_dir.name for kind in (mvtec_ad2.MAPS, mvtec_ad2.THRESHOLDED)]
    created = not out.exists()
    check_output(out, options.overwrite, owned, [f for _, f in inputs], shared=True)
    model = predictor.load(workdir, dtype=options.dtype, category=options.category)
    if model.calibration is None:
        print(f"warning: {workdir} has no calibration.json: no {mvtec_ad2.THRESHOLDED}", file=sys.stderr)
    clear_owned(owned)
    with undone_on_write_error(out, owned, created):
        for start in tqdm(range(0, len(inputs), options.batch_size), unit="batch", desc="predicting", disable=None):
            chunk = inputs[start : start + options.batch_size]
            pred = model.predict([f for _, f in chunk], options.batch_size, options.resize, options.tile_size,
                                 options.overlap)  # fmt: skip
            for i, (split, f) in enumerate(chunk):
                mask = None if pred.masks is None else pred.masks[i]
                mvtec_ad2.write_submission(out, category_dir.name, split, f, pred.maps[i], mask)
    print(f"{len(inputs)} maps of {category_dir.name} -> {out}")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """`rdjax predict`'s flags."""
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir, or a package.", flag_values=fv)
    flags.DEFINE_string("input", None, "A folder (searched recursively) or a glob of image files.", flag_values=fv)
    flags.DEFINE_string("output", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("dtype", None, "Compute dtype (float32 or bfloat16); default: the workdir's.", flag_values=fv)
    flags.DEFINE_enum(
        "resize",
        None,
        modes.values(modes.ResizeMode),
        "squeeze: the whole image to image_size; "
        "fit, tile: blended windows without distortion (docs/usage.md). Default: the workdir's "
        "config.resize, which its thresholds were calibrated with.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "tile_size",
        None,
        "resize=tile: native pixels per window (default: the workdir's, else image_size).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "tile_overlap",
        None,
        "resize=fit or tile: native pixels shared by neighbouring windows (default: the workdir's).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "format",
        "rdjax",
        ["rdjax", "mvtec_ad_2"],
        "rdjax: overlays, masks, scores.csv, report.html; mvtec_ad_2: --input is an MVTec AD 2 "
        "category folder, its private test sets' maps in the evaluation server's layout (docs/datasets.md).",
        flag_values=fv,
    )
    flags.DEFINE_string("category", None, modes.CATEGORY_HELP, flag_values=fv)
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace what an earlier predict wrote into --output (else it must be empty).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir", "input", "output"], flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    """`rdjax predict`: a folder's images scored, or an MVTec AD 2 submission (--format)."""
    run = predict_mvtec_ad2 if fv.format == "mvtec_ad_2" else predict_folder
    options = PredictOptions(fv.batch_size, fv.dtype, fv.resize, fv.tile_size, fv.tile_overlap, fv.category,
                             fv.overwrite)  # fmt: skip
    run(fv.workdir, fv.input, Path(fv.output), options)
