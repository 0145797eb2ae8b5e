"""Hostile state (issue 34): what a kill, a full disk, a flipped byte, a hand edit or a
planted file leaves behind, and what rdjax makes of it. Each test is one hostile case,
and its name says what happens: one `error: ...` line naming the problem, never scores
from damaged weights or mismatched thresholds, never code it was not pointed at.

The workdir is a copy of the shared trained run (its checkpoint is step 9, and so is its
calibration).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rdjax
from rdjax import config as config_lib
from rdjax.deploy import package as package_lib
from rdjax.errors import WorkdirError
from rdjax.runtime import disk

from conftest import rdjax_cli


@pytest.fixture
def workdir(trained, tmp_path) -> Path:
    """A copy of the shared trained workdir, to damage (what load reads, not its pictures)."""
    shutil.copytree(trained[1], tmp_path / "w", ignore=shutil.ignore_patterns("eval", "history", "tensorboard"))
    return tmp_path / "w"


@pytest.fixture(scope="module")
def made_package(trained, tmp_path_factory) -> Path:
    """A float32 package of the shared run, made once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("package") / "pkg"
    package_lib.package_workdir(trained[1], out)
    return out


@pytest.fixture
def package(made_package, tmp_path) -> Path:
    shutil.copytree(made_package, tmp_path / "pkg")
    return tmp_path / "pkg"


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(folder / "part.png")
    return folder


def predict_error(model: Path, images: Path) -> str:
    """The one error line of `rdjax predict` with ``model``; it wrote no scores."""
    out = images.parent / "out"
    error = rdjax_cli("predict", f"--workdir={model}", f"--input={images}", f"--output={out}").error_line()
    assert not (out / "scores.csv").exists()
    return error


def largest_file(folder: Path) -> Path:
    """The largest file below ``folder``: an array chunk of the orbax checkpoint there."""
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (the issue's probe: 16 bytes)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def edit_calibration(folder: Path, **changes) -> None:
    """Rewrite calibration.json with ``changes`` (a value of ... removes the key), as a
    hand edit or another program would; NaN and Infinity as Python's json writes them."""
    path = folder / "calibration.json"
    cal = json.loads(path.read_text())
    for key, value in changes.items():
        cal.pop(key) if value is ... else cal.__setitem__(key, value)
    path.write_text(json.dumps(cal))


# ----------------------------------------------------------------------------- damaged weights


def test_flipped_bytes_in_a_workdirs_checkpoint_are_one_line_naming_the_file(workdir, images):
    chunk = largest_file(workdir / "checkpoints" / "9" / "state")
    flip_bytes(chunk)
    error = predict_error(workdir, images)
    assert error.startswith(f"error: {chunk}: damaged: its SHA-256 differs from the one recorded"), error


def test_flipped_bytes_in_a_workdirs_teacher_are_one_line_naming_the_file(workdir, images):
    chunk = largest_file(workdir / "teacher")
    flip_bytes(chunk)
    assert predict_error(workdir, images).startswith(f"error: {chunk}: damaged"), chunk


@pytest.mark.slow  # a package is written once for the module (about 2 s)
@pytest.mark.parametrize("part", ["student", "teacher"])
def test_flipped_bytes_in_a_packages_weights_are_one_line_naming_the_file(package, images, part):
    """The issue's probe changed the scores (1.176 -> 1.226 for the student, 1.663 for
    the teacher) without a word; the intact copy loads."""
    assert rdjax.load(package).step == 9
    chunk = largest_file(package / part)
    flip_bytes(chunk)
    assert predict_error(package, images).startswith(f"error: {chunk}: damaged"), chunk


@pytest.mark.slow
def test_a_package_cut_short_is_one_line(package, images):
    """A copy cut short: a file truncated (its checksum differs), or missing."""
    chunk = largest_file(package / "student")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    assert predict_error(package, images).startswith(f"error: {chunk}: damaged")
    chunk.unlink()
    assert predict_error(package, images).startswith(f"error: {chunk}: missing, though sha256.json records it")


@pytest.mark.slow
def test_a_damaged_package_from_before_checksums_is_one_line(package, images):
    """A package written before rdjax recorded checksums loads as before, unverified
    (the same scores as the verified one); damaged, orbax's failure is one line, not its
    traceback (74 lines in the issue)."""
    image = np.asarray(Image.open(images / "part.png"))
    verified = rdjax.load(package).predict(image).scores
    for folder in ("teacher", "student"):
        (package / folder / disk.CHECKSUMS).unlink()
    np.testing.assert_array_equal(rdjax.load(package).predict(image).scores, verified)
    chunk = largest_file(package / "student")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    error = predict_error(package, images)
    assert error.startswith(f"error: {package / 'student'}: cannot read an rdjax package's student (ValueError: ")
    assert "restore it from a copy" in error


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"image_threshold": float("nan")}, "'image_threshold' is NaN, not a finite number"),
        ({"pixel_threshold": float("inf")}, "'pixel_threshold' is Infinity, not a finite number"),
        ({"image_threshold": "0.5"}, "'image_threshold' is \"0.5\", not a finite number"),
        ({"score_max": None}, "'score_max' is null, not a finite number"),
        ({"pixel_max": ...}, "no 'pixel_max'"),
        ({"step": ...}, "no 'step'"),
        ({"image_treshold": 0.5}, "unknown key 'image_treshold'"),
    ],
    ids=["nan", "infinity", "string", "null", "missing", "no-step", "unknown-key"],
)
def test_malformed_thresholds_are_one_line_not_every_image_normal(workdir, images, changes, says):
    """A NaN threshold made predict call every image normal ("10 images scored, 0
    anomalous"); a string, null or missing key gave a traceback."""
    edit_calibration(workdir, **changes)
    error = predict_error(workdir, images)
    fix = f"these thresholds cannot decide; refit them: rdjax eval --workdir={workdir}"
    assert error == f"error: {workdir / 'calibration.json'}: {says}: {fix}"


def test_malformed_thresholds_stop_package_and_serve_before_they_start(workdir, tmp_path, monkeypatch):
    """serve started and answered 500 to every request, /health included; it now refuses
    to start (uvicorn is never run), and package writes nothing."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("serve started"))
    edit_calibration(workdir, image_threshold=float("nan"))
    refusal = f"{workdir / 'calibration.json'}: 'image_threshold' is NaN"
    assert refusal in rdjax_cli("package", f"--workdir={workdir}", f"--out={tmp_path / 'pkg'}").error_line()
    assert not (tmp_path / "pkg").exists()
    assert refusal in rdjax_cli("serve", f"--workdir={workdir}", "--port=0").error_line()
    with pytest.raises(WorkdirError, match="'image_threshold' is NaN"):
        rdjax.load(workdir)


def test_weights_newer_than_their_thresholds_are_refused_by_load_predict_package_and_serve(
    workdir, images, tmp_path, monkeypatch, capsys
):
    """A kill after the step-9 checkpoint and before its evaluation leaves step-9 weights
    beside thresholds fitted at an earlier step (here step 6): every reader refuses the
    pair, naming both steps and the command that refits. A step asked for by name
    (rdjax.load(workdir, step=N), an older one as a rule) loads with a warning, and a
    workdir without thresholds loads."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("serve started"))
    edit_calibration(workdir, step=6)
    refusal = (
        f"{workdir}: the latest checkpoint is step 9, but calibration.json was fitted at step 6: its thresholds "
        f"belong to other weights; refit them: rdjax eval --workdir={workdir}"
    )
    assert predict_error(workdir, images) == f"error: {refusal}"
    assert rdjax_cli("package", f"--workdir={workdir}", f"--out={tmp_path / 'pkg'}").error_line() == f"error: {refusal}"
    assert rdjax_cli("serve", f"--workdir={workdir}", "--port=0").error_line() == f"error: {refusal}"
    with pytest.raises(WorkdirError) as info:
        rdjax.load(workdir)
    assert str(info.value) == refusal
    capsys.readouterr()
    assert rdjax.load(workdir, step=9).step == 9  # the caller's choice, with a warning
    assert "step 9 is decided by thresholds fitted at step 6" in capsys.readouterr().err
    (workdir / "calibration.json").unlink()
    assert rdjax.load(workdir).calibration is None


@pytest.mark.slow  # an evaluation
def test_the_command_the_refusal_names_refits_the_thresholds(workdir, images):
    """`rdjax eval`, as the refusal says, fits thresholds on the step-9 weights: the
    workdir predicts again, and its thresholds are those of the intact run. It also
    removes, and names, what a killed write left under a temporary name."""
    intact = json.loads((workdir / "calibration.json").read_text())
    edit_calibration(workdir, step=6, image_threshold=123.0)
    assert "rdjax eval --workdir=" in predict_error(workdir, images)
    left = workdir / ".calibration.0123abcd.tmp.json"  # and a kill of an earlier write left this
    left.write_text("cut short")
    out = rdjax_cli("eval", f"--workdir={workdir}")
    assert out.code == 0, out.stderr[-3000:]
    assert f"removed {left}, left by a run that was stopped" in out.stdout + out.stderr and not left.exists()
    refit = json.loads((workdir / "calibration.json").read_text())
    assert refit["step"] == 9 and refit["image_threshold"] == pytest.approx(intact["image_threshold"], abs=6e-4)
    done = rdjax_cli("predict", f"--workdir={workdir}", f"--input={images}", f"--output={images.parent / 'o'}")
    assert done.code == 0 and "1 images scored" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- killed and full writes


@pytest.mark.slow  # a package is written (about 2 s)
def test_package_onto_a_full_disk_is_one_line_and_leaves_nothing(trained, tmp_path, monkeypatch):
    """The issue's 617-line traceback. The disk fills once the teacher is written (every
    JSON write fails, as on a full disk): one line, and nothing beside --out."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk, "write_json", full)
    error = rdjax_cli("package", f"--workdir={trained[1]}", f"--out={tmp_path / 'pkg'}").error_line()
    assert (
        error
        == f"error: {tmp_path / 'pkg'}: cannot write the package (No space left on device); nothing was left there"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a package is written (about 2 s)
def test_a_killed_package_runs_temporary_folder_is_removed_by_the_next_run(trained, tmp_path):
    left = tmp_path / ".pkg.0123abcd.tmp"
    (left / "teacher").mkdir(parents=True)  # what kill -9 during the write leaves
    other = tmp_path / ".other.0123abcd.tmp"  # another package's, whose run may be going on
    other.mkdir()
    out = rdjax_cli("package", f"--workdir={trained[1]}", f"--out={tmp_path / 'pkg'}")
    assert out.code == 0, out.stderr[-3000:]
    assert f"note: removed {left}, left by a package run that was stopped" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.0123abcd.tmp", "pkg"]


def test_a_killed_writes_leftovers_in_a_workdir_are_removed_by_the_next_run_that_writes_it(workdir):
    """What atomic writes and orbax leave under temporary names when killed: removed by
    the next train or eval (which calls this first), and named; nothing else is."""
    planted = [
        workdir / ".calibration.0123abcd.tmp.json",
        workdir / "eval" / "epoch_0003" / ".scores.89abcdef.tmp.csv",
        workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1765140000",
        workdir / "teacher.orbax-checkpoint-tmp-1765140000",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "orbax" in path.name else path.write_text("cut short")
    (planted[2] / "state").mkdir()
    before = sorted(p for p in workdir.rglob("*") if not any(q == p or q in p.parents for q in planted))
    assert disk.remove_leftovers(workdir) == sorted(planted)
    assert sorted(workdir.rglob("*")) == before


# ----------------------------------------------------------------------------- planted files


def test_port_refuses_a_pickle_without_suggesting_weights_only_false(tmp_path, monkeypatch):
    """A .pth whose pickle would run code is refused (weights_only), and the refusal
    never repeats torch's advice to load it with weights_only=False, which torch's own
    message gives."""
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # torch's advice, the thing to strip
        torch.load(evil, weights_only=True)
    out = rdjax_cli("port", "teacher", "--arch=resnet18", f"--src={evil}", f"--out={tmp_path / 't'}")
    error = out.error_line()
    assert error.startswith(f"error: {evil}: holds Python objects besides tensors (posix.system), which could run")
    assert "weights_only" not in out.stderr and "False" not in out.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "t").exists()


def test_config_by_name_never_runs_a_file_of_that_name_in_the_current_folder(tmp_path, monkeypatch):
    """`--config=mvtec` is the shipped config even where the current folder holds a file
    named `mvtec`, which would run (write a file) if taken; `--config=./mvtec` points at it."""
    monkeypatch.chdir(tmp_path)
    Path("mvtec").write_text(
        "from pathlib import Path\nPath('ran').write_text('planted')\nraise RuntimeError('planted')\n"
    )
    missing = tmp_path / "no_data"
    error = rdjax_cli("train", "--config=mvtec", "--workdir=w", f"--config.dataset.root={missing}").error_line()
    assert str(missing) in error and not Path("ran").exists()
    error = rdjax_cli("train", "--config=./mvtec", "--workdir=w").error_line()  # pointed at, it runs
    assert "the config file raised RuntimeError: planted" in error and Path("ran").read_text() == "planted"
    assert rdjax_cli("train", "--config=mine", "--workdir=w").error_line() == (
        "error: mine: no shipped config of that name (shipped: " + ", ".join(config_lib.shipped())
        + "); a config file of your own is named by its path: ./mine"
    )  # fmt: skip
