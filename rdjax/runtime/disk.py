"""Files on disk, safe against kills and damage: atomic writes (a temporary name, then a
rename), JSON and CSV, the leftovers a killed write leaves under its temporary name, and
the SHA-256 checksums of each folder of weights (rdjax.runtime.workdir's docstring says
where each is used)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from rdjax.errors import RdjaxError, WorkdirError

CHECKSUMS = "sha256.json"  # in each folder of weights: its files' SHA-256 (record_checksums)
DAMAGED = "restore it from a copy (a package: copy it again, or make it anew with `rdjax package`)"


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds and
    removed when it fails: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(
        f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    )  # same suffix: PIL picks the format by it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: Path) -> Any:
    """A workdir's JSON file; a damaged one (a hand edit, a copy cut short) is a one-line
    WorkdirError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path}: not valid JSON ({e}); restore it from a copy or remove it") from None


def write_csv(path: str | os.PathLike, fields: list[str], rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, table.getvalue())


def check_writable(directory: Path, need_bytes: int = 0) -> None:
    """A directory that cannot take our files fails now, not after hours of work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"{directory}: not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise WorkdirError(
            f"{directory}: only {free / 2**20:.0f} MiB free, a checkpoint needs about {need_bytes / 2**21:.0f} MiB"
        )


# A name atomic_path gives (".calibration.1a2b3c4d.tmp.json"), a package's folder while it
# is written (".pkg.1a2b3c4d.tmp"), and orbax's folder of a checkpoint being written.
LEFTOVER = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]+)?$|\.orbax-checkpoint-tmp")


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove what a killed write left under a temporary name below ``folder`` (LEFTOVER:
    never read, as its writer renames only a complete file or folder into place), and
    return them, for the caller to name. Called by the one run that writes there."""
    found = sorted(p for p in folder.rglob("*") if LEFTOVER.search(p.name)) if folder.is_dir() else []
    found = [p for p in found if not any(q in p.parents for q in found)]  # a folder's content goes with it
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksums(folder: Path) -> None:
    """``folder``/sha256.json: the SHA-256 of every file below it, by relative path.

    The weight files of an orbax folder are all its files: the array chunks
    (ocdbt.process_*/d/*), and the manifests and metadata that say where each array
    lies and what shape it has, since a flipped byte in either changes what is restored.
    Recorded once the folder is complete (orbax has renamed it into place), by the
    primary process."""
    if jax.process_index() != 0:
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CHECKSUMS)
    write_json(folder / CHECKSUMS, {p.relative_to(folder).as_posix(): _sha256(p) for p in files})


def verify_checksums(folder: Path, items: tuple[str, ...] = ()) -> None:
    """Check the files below ``folder`` against its sha256.json, where it has one; with
    ``items``, only those below these subfolders: what the reader reads (a checkpoint's
    'state' for inference, and 'opt_state' too for a resume), so a load hashes no byte it
    does not read (the optimizer state, twice the student, is read by a resume alone).
    A missing or changed file is a WorkdirError naming it."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return  # written before rdjax recorded checksums: read unverified, as before
    recorded = read_json(path)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise WorkdirError(f"{path}: not a list of checksums; {DAMAGED}")
    for name, digest in sorted(recorded.items()):
        if items and name.split("/", 1)[0] not in items:
            continue
        file = folder / name
        if not file.is_file():
            raise WorkdirError(f"{file}: missing, though {path.name} records it: the folder is incomplete; {DAMAGED}")
        if _sha256(file) != digest:
            raise WorkdirError(
                f"{file}: damaged: its SHA-256 differs from the one recorded when it was written ({path.name}); "
                f"{DAMAGED}"
            )


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Whatever orbax or tensorstore raise on a damaged folder without checksums (a copy
    cut short, an edited file) as one line naming it, instead of their traceback."""
    try:
        yield
    except RdjaxError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise WorkdirError(f"{path}: cannot read {what} ({type(e).__name__}: {first}); {DAMAGED}") from None
