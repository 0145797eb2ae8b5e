"""Hostile files for `rdjax predict`, rdjax.load and the datasets (issue 34's files): a
list of cases, one test each, every one of which failed before.

- a legal name too long once predict adds its suffixes (244 bytes of Japanese);
- a name whose bytes are not UTF-8 (b'\\xff\\xfe.png');
- names only case tells apart (CASE.PNG, CASE.png);
- names Windows refuses (a:b?.png, con.d/, 'dot.'), and names their escapes could mimic;
- a glob whose '..' leads above the input folder, and a link that leads out of --output;
- an EPS file named x.png (Pillow would start Ghostscript to decode it);
- a disk that fills, or refuses a write, half-way through predict.

The fast ones check the functions; those marked slow run `rdjax predict` on the shared
trained workdir (conftest.trained), one run for the names.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from rdjax.data import preprocess
from rdjax.deploy.images import as_images
from rdjax.deploy.names import output_names
from rdjax.errors import DataError, WorkdirError
from rdjax.outputs import files as outputs

from conftest import rdjax_cli

LONG = "検査画像" * 20 + ".png"  # 80 characters, 244 bytes: legal on ext4, APFS and NTFS (255)
UNDECODABLE = os.fsdecode(b"\xff\xfe.png")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"

# Microsoft's rules for a file or folder name ("Naming Files, Paths, and Namespaces"),
# written out here apart from rdjax.deploy.names' escaping: the truth it is checked against.
WINDOWS_REFUSES = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
DEVICES = {"CON", "CONIN$", "CONOUT$", "PRN", "AUX", "NUL"}
DEVICES |= {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³"}


def valid_everywhere(component: str) -> bool:
    """A name Linux, macOS and Windows all accept, with room for rdjax's suffixes."""
    return (
        len(component.encode("utf-8")) + len("._mask.xxxxxxxx.tmp.png") <= 200  # UTF-8: raises on stray bytes
        and not set(component) & WINDOWS_REFUSES
        and component[-1] not in ". "
        and component.split(".")[0].rstrip(" ").upper() not in DEVICES
    )


@pytest.fixture
def ghostscript(monkeypatch) -> list:
    """Every start of Ghostscript (PIL's EPS decoder), recorded and refused."""
    calls: list = []

    def record(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", record)
    return calls


def _png(colour: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- names (fast)


def test_a_name_too_long_with_predicts_suffixes_is_cut_and_hashed(tmp_path):
    twin = LONG.replace("像.png", "象.png")  # differs only near its end, in what a cut drops
    names = output_names([Path("/r") / LONG, Path("/r") / twin], Path("/r"))
    assert len(set(names)) == 2 and all(valid_everywhere(n) for n in names)
    assert names[0].startswith("検査画像" * 10)
    for n in names:  # the longest file predict makes of it, atomic_path's temporary mask
        (tmp_path / f".{n}_mask.0123abcd.tmp.png").write_bytes(b"")


def test_a_name_that_is_not_utf8_is_escaped():
    (name,) = output_names([Path("/r") / UNDECODABLE], Path("/r"))
    assert name == "%FF%FE_png" and valid_everywhere(name)
    assert preprocess.printable(f"/r/{UNDECODABLE}") == "/r/\\xff\\xfe.png"


def test_names_windows_refuses_are_escaped_and_stay_distinct():
    files = ["a:b?.png", 'q"<>|*.png', "tab\there.png", "con.d/x.png", "dot./x.png", "aux.tar.png",
             "a%3Ab%3F.png", "%25.png", "%.png", "LPT¹/x.png"]  # fmt: skip
    names = output_names([Path("/r") / f for f in files], Path("/r"))
    assert len({n.casefold() for n in names}) == len(files)
    assert all(valid_everywhere(part) for n in names for part in n.split("/")), names
    assert names[0] == "a%3Ab%3F_png" and names[6] == "a%253Ab%253F_png"  # readable, and no escape mimicked


def test_names_only_case_tells_apart_get_distinct_outputs():
    """Also a folder whose name is another input's picture (x_png.png/ beside x.png)."""
    files = ["CASE.PNG", "CASE.png", "Dir/x.png", "dir/x.png", "other.png", "x_png.png/y.png", "x.png"]
    names = output_names([Path("/r") / f for f in files], Path("/r"))
    written = [f"overlays/{n}.png".casefold() for n in names] + [f"masks/{n}_mask.png".casefold() for n in names]
    folders = {f"{tree}/{n.rsplit('/', 1)[0]}".casefold() for tree in ("overlays", "masks") for n in names if "/" in n}
    assert len(set(written)) == len(written) and not folders & set(written)
    assert names[4] == "other_png"  # a name nothing clashes with keeps its plain form


def test_a_glob_through_dotdot_names_nothing_above_the_output():
    files = [Path("/r/base/in/sub/../../a.png"), Path("/r/base/in/../../z.png")]
    names = output_names(files, Path("/r/base/in"))  # the glob's common folder, as written
    assert names == ["base/a_png", "z_png"]


def test_a_path_that_leads_out_of_the_output_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "link").symlink_to(tmp_path)
    assert outputs.inside(out, "overlays/a_png.png") == out / "overlays" / "a_png.png"
    for climbing in ("../a_png.png", "overlays/link/a_png.png"):
        with pytest.raises(WorkdirError, match="outside --output"):
            outputs.inside(out, climbing)


# ----------------------------------------------------------------------------- formats (fast)


def test_an_eps_file_named_png_never_starts_ghostscript(tmp_path, ghostscript):
    """On every decoding path: predict's and rdjax.load's files and PIL images, the
    datasets' images, masks and headers."""
    path = tmp_path / "x.png"
    path.write_bytes(EPS)
    attempts = {
        "load (path)": lambda: as_images(str(path)),
        "load (PIL image)": lambda: as_images(Image.open(path)),
        "dataset image": lambda: preprocess.decode_image(EPS, "x.png"),
        "dataset mask": lambda: preprocess.decode_mask(EPS, "x.png"),
        "dataset header": lambda: preprocess.header_size(EPS, "x.png"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(DataError) as refused:
            attempt()
        assert "PNG, JPEG, BMP or TIFF" in str(refused.value), what
    assert ghostscript == []


def test_png_jpeg_bmp_and_tiff_still_decode(tmp_path):
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    for fmt in preprocess.FORMATS:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt)
        decoded = preprocess.decode_image(buf.getvalue(), fmt)
        assert decoded.shape == (8, 8, 3) and (fmt == "JPEG" or np.array_equal(decoded, image)), fmt
        (tmp_path / fmt).write_bytes(buf.getvalue())
        with Image.open(tmp_path / fmt) as opened:  # a caller's PIL image of the format
            assert as_images(opened)[0].shape == (8, 8, 3)


# ----------------------------------------------------------------------------- predict (slow)


@pytest.fixture(scope="module")
def named_run(trained, tmp_path_factory):
    """One `rdjax predict` over a folder of hostile names, and an EPS file named eps.png:
    (result, input folder, output folder, Ghostscript starts)."""
    config, work, _ = trained
    sources = sorted((Path(config.dataset.root) / "disk" / "test").rglob("*.png"))[:4]  # four distinct images
    inputs, out = tmp_path_factory.mktemp("hostile") / "in", tmp_path_factory.mktemp("hostile_out") / "out"
    inputs.mkdir()
    for name, source in zip((LONG, UNDECODABLE, "CASE.PNG", "CASE.png"), sources):
        shutil.copy(source, inputs / name)
    (inputs / "eps.png").write_bytes(EPS)
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
        result = rdjax_cli("predict", f"--workdir={work}", f"--input={inputs}", f"--output={out}")
    return result, inputs, out, calls


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "scores.csv", encoding="utf-8", newline="") as f:
        return {Path(r["file"]).name: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_predict_scores_a_name_too_long_with_its_suffixes(named_run):
    result, _, out, _ = named_run
    assert result.code == 0, result.stderr[-2000:]
    assert _rows(out)[LONG]["status"] == "scored"
    assert f"<div>{LONG}</div>" in (out / "report.html").read_text(encoding="utf-8")
    pictures = [p.name for p in (out / "overlays").iterdir()]
    assert any(p.startswith("検査画像" * 10) for p in pictures) and all(valid_everywhere(p) for p in pictures)


@pytest.mark.slow
def test_predict_scores_a_name_that_is_not_utf8_and_shows_it_escaped(named_run):
    result, _, out, _ = named_run
    assert result.code == 0, result.stderr[-2000:]
    assert _rows(out)["\\xff\\xfe.png"]["status"] == "scored"
    assert "<div>\\xff\\xfe.png</div>" in (out / "report.html").read_text(encoding="utf-8")
    assert (out / "overlays" / "%FF%FE_png.png").is_file()


@pytest.mark.slow
def test_predict_gives_names_only_case_tells_apart_distinct_outputs(named_run):
    result, inputs, out, _ = named_run
    assert result.code == 0, result.stderr[-2000:]
    rows = _rows(out)
    assert rows["CASE.PNG"]["status"] == rows["CASE.png"]["status"] == "scored"
    assert rows["CASE.PNG"]["score"] != rows["CASE.png"]["score"]  # two images, each scored as itself
    pictures = [p.name for p in (out / "overlays").glob("CASE*")]
    masks = [p.name for p in (out / "masks").glob("CASE*")]
    assert len({p.casefold() for p in pictures}) == len({m.casefold() for m in masks}) == 2
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f'href="{urllib.parse.quote(f"overlays/{name}")}"' in page for name in pictures)


@pytest.mark.slow
def test_predict_skips_an_eps_file_named_png_without_ghostscript(named_run):
    result, _, out, calls = named_run
    assert result.code == 0, result.stderr[-2000:]
    row = _rows(out)["eps.png"]
    assert row["status"] == "skipped" and "not a PNG, JPEG, BMP or TIFF file" in row["reason"]
    assert calls == []


@pytest.mark.slow
def test_predict_through_a_glob_with_dotdot_writes_only_inside_the_output(trained, tmp_path):
    config, work, _ = trained
    source = sorted((Path(config.dataset.root) / "disk" / "test" / "hole").glob("*.png"))[0]
    (tmp_path / "base" / "in" / "sub").mkdir(parents=True)
    shutil.copy(source, tmp_path / "z.png")
    shutil.copy(source, tmp_path / "base" / "a.png")
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "base" / "out"
    result = rdjax_cli("predict", f"--workdir={work}", f"--input={tmp_path}/base/in/**/../../*.png", f"--output={out}")
    assert result.code == 0, result.stderr[-2000:]
    assert "2 images scored" in result.stdout
    assert sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out)) == before
    assert sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png")) == [
        "overlays/base/a_png.png",
        "overlays/z_png.png",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_full_disk_or_a_refused_write_is_one_line_and_leaves_nothing(trained, tmp_path, monkeypatch, code):
    """The third picture's write fails part-way (two are written by then)."""
    config, work, _ = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for source in sorted((Path(config.dataset.root) / "disk" / "test" / "hole").glob("*.png"))[:3]:
        shutil.copy(source, inputs / source.name)
    save, written = Image.Image.save, []

    def failing_save(image, fp, *args, **kwargs):
        if not isinstance(fp, (str, os.PathLike)):  # a thumbnail into memory
            return save(image, fp, *args, **kwargs)
        written.append(fp)
        if len(written) == 3:
            Path(fp).write_bytes(b"\x89PNG\r\n")
            raise OSError(code, os.strerror(code))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "out"
    result = rdjax_cli("predict", f"--workdir={work}", f"--input={inputs}", f"--output={out}")
    assert os.strerror(code) in result.error_line() and "Traceback" not in result.stderr
    assert len(written) == 3 and not out.exists()
