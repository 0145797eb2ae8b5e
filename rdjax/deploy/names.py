"""Output names of `rdjax predict`: one per input file, valid on Linux, macOS and Windows,
and distinct on a case-insensitive file system (rdjax.deploy.predict's docstring says how a
name is made from an input's path)."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

# A folder or file name of an output name has at most NAME_BYTES bytes (UTF-8): with a
# case-fold hash (CUT, 12), '_mask.png' and atomic_path's '.NAME.xxxxxxxx.tmp' (23) it
# stays under 200, within the 255 of ext4, APFS and NTFS.
NAME_BYTES = 160
CUT = "%-"  # then HASH_DIGITS of sha256: a name cut to NAME_BYTES, or one that clashes case-folded
HASH_DIGITS = 10
UNSAFE = frozenset('<>:"/\\|?*%')  # Windows refuses the first nine in a name; '%' starts our escapes
PORTS = [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]  # COM1, COM¹ alike
# Windows' device names, whatever follows a dot (con.d, aux.tar.png)
RESERVED = frozenset({"CON", "CONIN$", "CONOUT$", "PRN", "AUX", "NUL", *PORTS})


def _digest(text: str) -> str:
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:HASH_DIGITS]


def portable(name: str) -> str:
    """A folder or file name as one that Linux, macOS and Windows all accept, injectively:
    each byte that is not UTF-8 (Python holds it as a surrogate), each character Windows
    refuses (UNSAFE, control characters, trailing dots and spaces, the first of a reserved
    name such as CON or con.d) and '%' itself become %XX, so two names never escape alike.
    A result over NAME_BYTES is cut and ends in CUT and a hash of the whole name."""
    text = os.fsencode(name).decode("utf-8", "surrogateescape")
    out = [f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff"
           else f"%{ord(c):02X}" if c in UNSAFE or c < " " or c == "\x7f" else c for c in text]  # fmt: skip
    for k in range(len(text) - 1, -1, -1):  # Windows drops trailing dots and spaces
        if text[k] not in ". ":
            break
        out[k] = f"%{ord(text[k]):02X}"
    if text.split(".")[0].rstrip(" ").upper() in RESERVED:
        out[0] = f"%{ord(text[0]):02X}"
    if len("".join(out).encode()) <= NAME_BYTES:
        return "".join(out)
    kept: list[str] = []
    size = len(CUT) + HASH_DIGITS
    for piece in out:  # whole characters and escapes only
        size += len(piece.encode())
        if size > NAME_BYTES:
            break
        kept.append(piece)
    return "".join(kept) + CUT + _digest(name)


def _fold(name: str) -> str:
    """What a case-insensitive file system compares (macOS's and Windows' defaults):
    Unicode's canonical caseless form, so 'CASE' is 'case' and a composed 'é' its
    decomposed twin."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _clashes(names: list[str]) -> set[int]:
    """The names whose files (<name>.png, <name>_mask.png) would share a path, case-folded,
    with another's file or folder."""
    folders = {_fold(n.rsplit("/", k)[0]) for n in names for k in range(1, n.count("/") + 1)}
    owners: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        owners.setdefault(_fold(n), []).append(i)
    return {i for key, idx in owners.items() for i in idx
            if len(idx) > 1 or f"{key}.png" in folders or f"{key}_mask.png" in folders}  # fmt: skip


def output_names(files: list[Path], root: Path) -> list[str]:
    """One output name per input file (the module docstring): its path under ``root``, or
    under the folder above them all where a glob's '..' leads above ``root`` ('..' is
    resolved: no name climbs), each part `portable`; names that would clash on a
    case-insensitive file system (CASE.PNG and CASE.png) end in CUT and a hash of their
    input's path, so distinct inputs get distinct files on every file system."""
    absolute = [os.path.abspath(f) for f in files]
    base = os.path.commonpath([os.path.abspath(root), *(os.path.dirname(f) for f in absolute)])
    names, rels = [], []
    for f in absolute:
        rel = Path(f).relative_to(base)
        parts = [*rel.parent.parts, f"{rel.stem}_{rel.suffix.lstrip('.').lower()}"]
        names.append("/".join(portable(p) for p in parts))
        rels.append(rel.as_posix())
    clashing = _clashes(names)
    return [f"{n}{CUT}{_digest(rels[i])}" if i in clashing else n for i, n in enumerate(names)]
