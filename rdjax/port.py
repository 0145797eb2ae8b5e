"""Import PyTorch weights into rdjax: torchvision teachers and official RD4AD checkpoints.

The conversion is strict: every tensor in the source is either used or ignored on purpose
(the teacher's fc and layer4, BatchNorm's num_batches_tracked, the OCBE's unused
conv4/bn4, the 'memory' keys the official test code drops), and every rdjax variable
must be found with the right shape. Anything else is an error that names the key.

CLI:
  python -m rdjax.port teacher --arch wide_resnet50_2 --src FILE|imagenet --out DIR
  python -m rdjax.port rd4ad --arch wide_resnet50_2 --teacher FILE|imagenet|DIR --src CKPT --out WORKDIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rdjax.models.rd4ad import RD4AD, Variables
from rdjax.models.resnet import ARCHS

StateDict = dict[str, np.ndarray]

IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
}
DEFAULT_BASE_URL = "https://download.pytorch.org/models/"


class PortError(ValueError):
    """A weights file that cannot be read or does not fit the architecture."""


# ----------------------------------------------------------------------------- reading


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
    internet cannot run code; .safetensors and .npz need no torch. Nested dicts (the
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
            tree = torch.load(path, map_location="cpu", weights_only=True)
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
        raise PortError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt file'})") from None
    raise PortError(f"{path}: unknown weights format {suffix!r}; use .pth, .pt, .safetensors or .npz")


# ----------------------------------------------------------------------------- conversion

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "transposed_kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_key(path: tuple[str, ...]) -> str:
    """('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    if leaf == "transposed_kernel":  # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 0, 1) if array.ndim == 4 else array
    return array


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
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
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
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
            out[collection][path] = np.array(_to_flax(path[-1], own[key]), dtype=np.float32)  # a copy: never alias the source
    for key in sorted(set(own) - used):
        if not ignore(key):
            problems.append(f"unexpected key {prefix + key!r} with shape {tuple(own[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PortError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems[:3]) + more)
    return {c: traverse_util.unflatten_dict(flat) for c, flat in out.items()}


def _ignore_teacher(key: str) -> bool:
    return key.startswith(("fc.", "layer4.")) or key.endswith("num_batches_tracked")


def _ignore_ocbe(key: str) -> bool:
    return key.startswith(("conv4.", "bn4.")) or key.endswith("num_batches_tracked") or "memory" in key


def _ignore_decoder(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _abstract_vars(arch: str) -> tuple[Variables, Variables]:
    return jax.eval_shape(lambda r: RD4AD(arch).init(r, 64), jax.random.key(0))


def convert_teacher(arch: str, state_dict: StateDict, source: str = "state dict") -> Variables:
    """torchvision (or timm, same names) ImageNet weights -> teacher {'params', 'batch_stats'}."""
    teacher_shapes, _ = _abstract_vars(arch)
    try:
        return convert(state_dict, teacher_shapes, ignore=_ignore_teacher, source=source)
    except PortError as e:
        raise PortError(f"{e} -- is this a {arch} teacher file?") from None


def convert_official(arch: str, state_dict: StateDict, source: str = "checkpoint") -> Variables:
    """Official RD4AD checkpoint {'bn': ..., 'decoder': ...} -> student {'params', 'batch_stats'}."""
    _, student_shapes = _abstract_vars(arch)
    unknown = sorted(k for k in state_dict if not k.startswith(("bn.", "decoder.")))
    if unknown:
        raise PortError(
            f"{source}: not an official RD4AD checkpoint: key {unknown[0]!r} is outside 'bn' and 'decoder'"
        )
    parts = {}
    for name, prefix, ignore in (("ocbe", "bn.", _ignore_ocbe), ("decoder", "decoder.", _ignore_decoder)):
        target = {c: tree[name] for c, tree in student_shapes.items()}
        try:
            parts[name] = convert(state_dict, target, prefix=prefix, ignore=ignore, source=source)
        except PortError as e:
            raise PortError(f"{e} -- is this a {arch} RD4AD checkpoint?") from None
    return {c: {name: parts[name][c] for name in parts} for c in student_shapes}


# ----------------------------------------------------------------------------- download


def cache_dir() -> Path:
    return Path(os.environ.get("RDJAX_CACHE_DIR", Path.home() / ".cache" / "rdjax"))


def _hash_prefix(filename: str) -> str:
    m = re.search(r"-([a-f0-9]+)\.", filename)
    return m.group(1) if m else ""


def download_imagenet(arch: str, directory: str | os.PathLike | None = None) -> Path:
    """Return the torchvision ImageNet file for ``arch``, downloading it if needed.

    The file's SHA-256 must start with the hash prefix in its name, as torchvision
    checks. RDJAX_WEIGHTS_BASE_URL replaces the download host (a mirror, or file://).
    """
    if arch not in IMAGENET_FILES:
        raise PortError(f"no ImageNet weights known for {arch!r}; choose one of {sorted(IMAGENET_FILES)}")
    filename = IMAGENET_FILES[arch]
    directory = Path(directory) if directory is not None else cache_dir()
    dest = directory / filename
    if dest.is_file():
        _check_hash(dest, dest)
        return dest
    base = os.environ.get("RDJAX_WEIGHTS_BASE_URL", DEFAULT_BASE_URL)
    url = base.rstrip("/") + "/" + filename
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
            f"cannot download {url} ({getattr(e, 'reason', e)}); download it by hand and place it at {dest}"
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
        raise PortError(f"{named}: SHA-256 {sha.hexdigest()[:12]}... does not start with {prefix!r}; the file is corrupt")


# ----------------------------------------------------------------------------- entry points


def load_teacher(arch: str, src: str) -> Variables:
    """Teacher variables from 'imagenet', a weights file, or an rdjax teacher directory."""
    from rdjax import checkpoint

    if src == "imagenet":
        path = download_imagenet(arch)
    else:
        path = Path(src)
        if path.is_dir():
            saved_arch, variables = checkpoint.restore_teacher(path)
            if saved_arch != arch:
                raise PortError(f"{path}: holds a {saved_arch} teacher, but the model is {arch}")
            return variables
    return convert_teacher(arch, read_state_dict(path), source=str(path))


def _default_config() -> Any:
    """configs/default.py of this checkout, the base every workdir config starts from."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "configs" / "default.py"
    spec = importlib.util.spec_from_file_location("rdjax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_ported_workdir(
    out: str | os.PathLike, arch: str, image_size: int, teacher_vars: Variables, student_vars: Variables
) -> None:
    """An rdjax workdir (config, teacher, step-0 checkpoint) holding an official model,
    so that evaluation and inference treat it like a model trained here."""
    from rdjax import checkpoint, train

    out = Path(out)
    config = _default_config()
    config.model.arch = arch
    config.image_size = image_size
    config.model.teacher_weights = str((out / "teacher").resolve())
    tx = train.make_optimizer(config.learning_rate, config.adam_b1, config.adam_b2)
    state = train.create_train_state(jax.tree_util.tree_map(jnp.asarray, student_vars), tx)
    checkpoint.save_teacher(out / "teacher", arch, teacher_vars)
    with checkpoint.checkpoint_manager(out, config.keep_checkpoints) as manager:
        checkpoint.save_state(manager, 0, state)
    checkpoint.save_config(out, config)


def _main(argv: list[str] | None = None) -> int:
    from rdjax import checkpoint

    parser = argparse.ArgumentParser(prog="python -m rdjax.port", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="torchvision weights -> rdjax teacher checkpoint (orbax)")
    t.add_argument("--arch", required=True, choices=sorted(ARCHS))
    t.add_argument("--src", required=True, help="a .pth/.pt/.safetensors/.npz file, or 'imagenet'")
    t.add_argument("--out", required=True, help="output directory (must not exist)")
    r = sub.add_parser("rd4ad", help="official RD4AD checkpoint -> rdjax workdir")
    r.add_argument("--arch", required=True, choices=sorted(ARCHS))
    r.add_argument("--teacher", required=True, help="teacher weights: file, 'imagenet' or rdjax teacher directory")
    r.add_argument("--src", required=True, help="official checkpoint {'bn': ..., 'decoder': ...}")
    r.add_argument("--out", required=True, help="output workdir (must not exist)")
    r.add_argument("--image-size", type=int, default=256, help="image size recorded in the workdir's config")
    args = parser.parse_args(argv)

    out = Path(args.out)
    try:
        if out.exists():
            raise PortError(f"{out}: already exists; choose a new output directory")
        teacher_vars = load_teacher(args.arch, args.src if args.command == "teacher" else args.teacher)
        if args.command == "teacher":
            checkpoint.save_teacher(out, args.arch, teacher_vars)
        else:
            student_vars = convert_official(args.arch, read_state_dict(args.src), source=args.src)
            write_ported_workdir(out, args.arch, args.image_size, teacher_vars, student_vars)
    except PortError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
