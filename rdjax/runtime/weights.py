"""PyTorch weights into flax variable trees: reading files, strict conversion, download.

Model-agnostic: each model owns its own rules (which keys it ignores, which prefix
holds which part) and calls `convert` with them (rdjax.models.resnet for torchvision
teachers, rdjax.models.rd4ad for official RD4AD checkpoints).

The conversion is strict: every tensor in the source is either used or ignored on
purpose by the model's rules, and every variable must be found with the right shape.
Anything else is a PortError that names the key.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from rdjax.errors import PortError
from rdjax.pytrees import Variables

StateDict = dict[str, np.ndarray]
DEFAULT_BASE_URL = "https://download.pytorch.org/models/"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a (possibly nested) PyTorch state dict as flat numpy arrays.

    .pth/.pt need torch and are loaded with weights_only=True, so a pickle from the
    internet cannot run code (a refusal never repeats torch's advice to retry without
    it: `refused_pickle`); .safetensors and .npz need no torch. Nested dicts (the
    official {'bn': ..., 'decoder': ...} format) flatten to 'bn.conv1.weight' keys.
    """
    path = Path(path)
    if not path.is_file():
        raise PortError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pth", ".pt"):
            try:
                import torch
            except ImportError:
                raise PortError(
                    f"{path}: reading .pth/.pt files needs PyTorch (pip install torch); "
                    "or convert it to .safetensors/.npz on a machine that has it"
                ) from None
            try:
                tree = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise PortError(f"{path}: {refused_pickle(str(e))}") from None
            if not isinstance(tree, Mapping):
                raise PortError(f"{path}: expected a state dict, found {type(tree).__name__}")
            flat = _flatten(tree)
            return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in flat.items()}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return {k: np.asarray(v) for k, v in load_file(str(path)).items()}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
    except PortError:
        raise
    except Exception as e:  # corrupt, truncated or foreign files surface here
        raise PortError(
            f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt file'})"
        ) from None
    raise PortError(f"{path}: unknown weights format {suffix!r}; use .pth, .pt, .safetensors or .npz")


def refused_pickle(message: str) -> str:
    """Why a .pth that torch's weights_only loader refused is not read, without torch's
    advice to load it with weights_only=False: that runs whatever code the file holds,
    and rdjax never suggests it. Names the object the file asked for, where torch says."""
    found = re.search(r"GLOBAL ([\w.]+)", message)  # "... GLOBAL posix.system whose module posix is blocked"
    named = f" ({found.group(1)})" if found else ""
    return (
        f"holds Python objects besides tensors{named}, which could run code when loaded, so rdjax does not "
        "load it; a weights file holds a state dict of tensors alone (torch.save(model.state_dict(), PATH)), "
        "or is a .safetensors file: ask its author for one"
    )


_LEAF_TO_TORCH = {
    "kernel": "weight",
    "transposed_kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    # DINOv2's ViT (rdjax.models.vit): its own names, LayerScale's gamma as ls1/ls2
    **{name: name for name in ("cls_token", "pos_embed", "register_tokens", "patch_embed", "patch_bias", "ls1", "ls2")},
}


def torch_key(path: tuple[str, ...]) -> str:
    """('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out); Linear (out, in) -> (in, out)
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T if array.ndim == 2 else array
    if leaf == "transposed_kernel":  # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 0, 1) if array.ndim == 4 else array
    return array


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    if leaf == "kernel":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "transposed_kernel":
        kh, kw, i, o = flax_shape
        return (i, o, kh, kw)
    return tuple(flax_shape)


def convert(
    state_dict: StateDict,
    target: Variables,
    *,
    prefix: str = "",
    ignore: Callable[[str], bool] = lambda k: False,
    source: str = "state dict",
) -> Variables:
    """Fill the variable tree ``target`` (arrays or ShapeDtypeStructs) from ``state_dict``.

    Keys of ``state_dict`` under ``prefix`` are consumed; the rest are left to the caller.
    Raises PortError naming each missing key, unexpected key and shape mismatch.
    """
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    used: set[str] = set()
    problems: list[str] = []
    out: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    for collection, tree in target.items():
        flat = traverse_util.flatten_dict(tree)
        out[collection] = {}
        for path, leaf in flat.items():
            key = torch_key(path)
            want = _torch_shape(path[-1], tuple(leaf.shape))
            if key not in own:
                problems.append(f"missing key {prefix + key!r} (expected shape {want})")
                continue
            used.add(key)
            got = tuple(own[key].shape)
            if got != want:
                problems.append(f"key {prefix + key!r} has shape {got}, expected {want}")
                continue
            out[collection][path] = np.array(
                _to_flax(path[-1], own[key]), dtype=np.float32
            )  # a copy: never alias the source
    for key in sorted(set(own) - used):
        if not ignore(key):
            problems.append(f"unexpected key {prefix + key!r} with shape {tuple(own[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PortError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems[:3]) + more)
    return {c: traverse_util.unflatten_dict(flat) for c, flat in out.items()}


def cache_dir() -> Path:
    return Path(os.environ.get("RDJAX_CACHE_DIR", Path.home() / ".cache" / "rdjax"))


def _hash_prefix(filename: str) -> str:
    m = re.search(r"-([a-f0-9]+)\.", filename)
    return m.group(1) if m else ""


RANDOM_TEACHER = "--config.model.teacher_weights=none"  # the flag that needs no weights at all
_OFFLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("rdjax_offline", default=False)


def offline() -> bool:
    """RDJAX_OFFLINE=1, or inside `offline_scope(True)` (config.offline): nothing is
    downloaded (air-gapped line PCs, CI)."""
    return _OFFLINE.get() or os.environ.get("RDJAX_OFFLINE", "") not in ("", "0")


@contextlib.contextmanager
def offline_scope(on: bool) -> Iterator[None]:
    """Forbid downloads (teacher weights, datasets) in this block where ``on``."""
    token = _OFFLINE.set(on or _OFFLINE.get())
    try:
        yield
    finally:
        _OFFLINE.reset(token)


def download(filename: str, directory: str | os.PathLike | None = None) -> Path:
    """Return torchvision's ``filename`` (or a full address's file) from the cache, downloading it if needed and not
    `offline()` (else a one-line error naming where to place the file).

    The file's SHA-256 must start with the hash prefix in its name, as torchvision
    checks. RDJAX_WEIGHTS_BASE_URL replaces the download host (a mirror, or file://).
    """
    directory = Path(directory) if directory is not None else cache_dir()
    home = DEFAULT_BASE_URL
    if "://" in filename:  # a full address (DINOv2's hub files): its last part names the file
        home, filename = filename.rsplit("/", 1)
    dest = directory / filename
    if dest.is_file():
        _check_hash(dest, dest)
        return dest
    base = os.environ.get("RDJAX_WEIGHTS_BASE_URL", home)
    url = base.rstrip("/") + "/" + filename
    if offline():
        raise PortError(f"offline (RDJAX_OFFLINE=1 or config.offline): {filename} is not in the cache; "
                        f"place it at {dest} (it is {url}), or train with a random teacher, "
                        f"{RANDOM_TEACHER} (demos and tests only)")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        from tqdm import tqdm

        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=filename, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise PortError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); download it by hand and place it at {dest}, "
            f"or train with a random teacher, {RANDOM_TEACHER} (demos and tests only); RDJAX_OFFLINE=1 "
            "stops before any download is tried"
        ) from None
    try:
        _check_hash(tmp, dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_hash(path: Path, named: Path) -> None:
    prefix = _hash_prefix(named.name)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    if not sha.hexdigest().startswith(prefix):
        raise PortError(
            f"{named}: SHA-256 {sha.hexdigest()[:12]}... does not start with {prefix!r}; the file is corrupt"
        )
