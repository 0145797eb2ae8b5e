"""Cross-check rdjax against the official RD4AD and RD++ repositories' own code (not re-implementations).

    python experiments/crosscheck_official.py --rd4ad DIR --rdpp DIR [--arch resnet18] [--size 64]

DIR are local clones of hq-deng/RD4AD and tientrandinh/Revisiting-Reverse-Distillation. Their modules are
imported at run time, one clone at a time on sys.path (both define `resnet`, `de_resnet`, `dataset`, ...,
so their modules are dropped from sys.modules before and after). The tests cannot do this (the clones are
not in the repository); tests/torch_reference.py rebuilds the same modules instead. For each model:

1. teacher, MPL (RD++) and student features, float32, eval mode: the official builders' random weights
   with random BatchNorm statistics, ported with model.port_teacher / model.port_official;
2. one float64 training step, train mode: the official loss (RD4AD main.loss_fucntion; RD++ its
   training loop's L_distill + 0.2 Revisit_RDLoss, written out from its main.py), the gradient of every
   student parameter and the BatchNorm running statistics after it. RD++'s noised images come from
   rdjax.models.rdpp.add_noise and are fed to both sides;
3. `rdjax port` + `rdjax eval` against the official evaluation (RD4AD test.evaluation on its own
   MVTecDataset; RD++ utils_test.evaluation_multi_proj) on synthetic images generated at the model's
   size, so neither side resizes (docs/differences.md: PIL vs OpenCV, RD++'s fixed 256 px).

Patched, and why (their code assumes CUDA and 2022-2023 library versions):
- torch.Tensor.to('cuda') is a no-op while RD++'s loss runs: Revisit_RDLoss moves its target to 'cuda'.
- torch.randperm returns rdjax's jax.random.permutation(key, B) there, so SSOT pairs the same images.
- cv2 is an empty module when OpenCV is absent: test.py and utils_test.py use it only to draw heat maps.
- pandas.DataFrame.append (removed in pandas 2) is pd.concat, for RD4AD test.py's compute_pro.
- `round` in their evaluation modules is the identity, so metrics are compared unrounded.
RD++'s dataset module is not imported (it needs numba; it resizes to 256 px with cv2): its test
transform (RGB / 255, ImageNet Normalize in float64, then float32) is reproduced in `rdpp_items`.
Their evaluation needs pandas and scikit-image, which rdjax does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.util
import io
import json
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from PIL import Image

from rdjax import cli
from rdjax.data import synthetic
from rdjax.models import rdpp as rdpp_lib
from rdjax.registry import MODELS

THEIR_TOP_NAMES = {"resnet", "de_resnet", "dataset", "test", "main", "model", "utils", "inference"}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
Row = tuple[str, str, str, float, float]  # model, comparison, values, error, tolerance


def import_official(repo: Path, names: list[str]) -> dict[str, types.ModuleType]:
    """The clone's own modules, with only that clone on sys.path; their same-named modules forgotten after."""

    def forget() -> None:
        for name in [n for n in sys.modules if n.split(".")[0] in THEIR_TOP_NAMES]:
            del sys.modules[name]

    if "cv2" not in sys.modules and importlib.util.find_spec("cv2") is None:
        sys.modules["cv2"] = types.ModuleType("cv2")
    forget()
    sys.path.insert(0, str(repo))
    try:
        mods = {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(repo))
        forget()
    for mod in mods.values():
        if hasattr(mod, "roc_auc_score"):  # their evaluation modules round the metrics they return
            mod.round = lambda value, ndigits=None: float(value)
    return mods


@contextlib.contextmanager
def on_cpu(perm: np.ndarray) -> contextlib.AbstractContextManager[None]:
    """Tensor.to('cuda') a no-op and torch.randperm = ``perm``, for RD++'s loss (module docstring)."""
    to, randperm = torch.Tensor.to, torch.randperm

    def to_cpu(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return to(self, *[a for a in args if not str(a).startswith("cuda")], **kwargs)

    torch.Tensor.to, torch.randperm = to_cpu, lambda n, *a, **k: torch.as_tensor(perm)
    try:
        yield
    finally:
        torch.Tensor.to, torch.randperm = to, randperm


def build(mods: dict[str, types.ModuleType], arch: str, channels: int, seed: int) -> dict[str, torch.nn.Module]:
    """The official builders' random modules (float32), every BatchNorm with random affine parameters
    and running statistics, so that a port that drops or confuses them cannot pass."""
    torch.manual_seed(seed)
    prefix = "model." if "model.resnet" in mods else ""  # RD++ keeps them in a folder
    res, de = mods[prefix + "resnet"], mods[prefix + "de_resnet"]
    encoder, bn = getattr(res, arch)(pretrained=False)
    parts = {"encoder": encoder, "bn": bn, "decoder": getattr(de, f"de_{arch}")(pretrained=False)}
    if "utils.utils_train" in mods:
        parts["proj"] = mods["utils.utils_train"].MultiProjectionLayer(base=channels // 4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in (m for part in parts.values() for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return parts


def flat(parts: dict[str, torch.nn.Module], values: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """The official checkpoint {'proj', 'bn', 'decoder'} flattened as rdjax reads it; ``values``
    replaces entries (gradients in place of parameters)."""
    out = {}
    for key in ("proj", "bn", "decoder"):
        for n, t in parts[key].state_dict().items() if key in parts else ():
            out[f"{key}.{n}"] = (values or {}).get(f"{key}.{n}", t).detach().numpy()
    return out


def port64(port: object, tree: dict[str, np.ndarray]) -> dict:
    """A float64 tree through the float32 port: as float32 high and low parts (about 48 bits)."""
    high = {k: v.astype(np.float32) for k, v in tree.items()}
    low = {k: (v - high[k]).astype(np.float32) for k, v in tree.items()}
    return jax.tree.map(lambda h, lo: h.astype(np.float64) + lo, port(high), port(low))


def rel(ours: object, ref: object) -> float:
    """max |ours - ref| / max |ref| over a tree of arrays (per leaf, then the largest)."""
    pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(ref))
    return max(
        float(np.max(np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64))) / np.max(np.abs(r)))
        for o, r in pairs
    )


def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> contiguous NCHW torch (a strided view would run torch in channels-last order)."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(x.detach() if isinstance(x, torch.Tensor) else x), (0, 2, 3, 1))


def feature_rows(name: str, arch: str, parts: dict[str, torch.nn.Module], images: np.ndarray) -> list[Row]:
    """1. Eval-mode features in float32; the student reads the official teacher's features on both sides."""
    model = MODELS.get(name)(arch, "float32")
    for m in parts.values():
        m.eval()
    teacher_vars = model.port_teacher({k: v.numpy() for k, v in parts["encoder"].state_dict().items()})
    student_vars = model.port_official(flat(parts))
    with torch.no_grad():
        t = parts["encoder"](nchw((images - MEAN) / STD).float())
        p = parts["proj"](t) if "proj" in parts else t
        s = parts["decoder"](parts["bn"](p))
    jt = tuple(jnp.asarray(nhwc(f)) for f in t)
    rows = [
        (
            name,
            "teacher layer1-3, float32 eval",
            "",
            rel(
                jax.jit(model.teacher_features)(teacher_vars, jnp.asarray((images - MEAN) / STD, jnp.float32)),
                [nhwc(f) for f in t],
            ),
            1e-4,
        )
    ]
    if "proj" in parts:
        ours_p = jax.jit(lambda v, f: model.student.apply(v, f, method=lambda m, x: m.proj(x)))(student_vars, jt)
        rows.append((name, "MPL features, float32 eval", "", rel(ours_p, [nhwc(f) for f in p]), 1e-4))
    ours_s = jax.jit(lambda v, f: model.student_features(v, f, False)[0])(student_vars, jt)
    return rows + [(name, "student features, float32 eval", "", rel(ours_s, [nhwc(f) for f in s]), 1e-4)]


def official_step(mods: dict, parts: dict, x: np.ndarray, noised: np.ndarray | None, perm: np.ndarray) -> tuple:
    """The official train-mode forward and backward in float64: (loss, gradients, modules after the step)."""
    p = {k: copy.deepcopy(m).double().train() for k, m in parts.items()}
    p["encoder"].eval()
    inputs = p["encoder"](x)
    if noised is None:  # RD4AD main.py's loop body
        loss = mods["main"].loss_fucntion(inputs, p["decoder"](p["bn"](inputs)))
    else:  # RD++ main.py's loop body, weight_proj at its default 0.2
        train = mods["utils.utils_train"]
        inputs_noise = p["encoder"](noised)
        feature_space_noise, feature_space = p["proj"](inputs, features_noise=inputs_noise)
        with on_cpu(perm):
            l_proj = train.Revisit_RDLoss()(inputs_noise, feature_space_noise, feature_space)
        loss = train.loss_fucntion(inputs, p["decoder"](p["bn"](feature_space))) + 0.2 * l_proj
    loss.backward()
    grads = {
        f"{k}.{n}": (q.grad if q.grad is not None else torch.zeros_like(q))
        for k in p
        for n, q in p[k].named_parameters()
    }
    return float(loss.detach()), grads, p


def step_rows(name: str, arch: str, mods: dict, parts: dict, images: np.ndarray) -> list[Row]:
    """2. One float64 training step: loss, every student gradient, BatchNorm running statistics after it."""
    noise_key, loss_key = jax.random.split(jax.random.key(3))
    with jax.enable_x64(True):
        model = MODELS.get(name)(arch, "float64")
        noised = np.asarray(rdpp_lib.add_noise(jnp.asarray(images), noise_key)) if name == "rdpp" else None
        perm = np.asarray(jax.random.permutation(loss_key, len(images)))
        x, xn = ((a - MEAN) / STD if a is not None else None for a in (images, noised))
        want, grads, after = official_step(
            mods, parts, nchw(x), None if xn is None else nchw(xn), perm
        )
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        teacher = to64(model.port_teacher({k: v.numpy() for k, v in parts["encoder"].state_dict().items()}))
        student = to64(model.port_official(flat(parts)))
        feats = [jax.jit(model.teacher_features)(teacher, jnp.asarray(a)) for a in (x, xn) if a is not None]
        inputs = feats[0] if len(feats) == 1 else tuple(feats)
        loss = lambda params: model.train_loss(
            {"params": params, "batch_stats": student["batch_stats"]}, inputs, loss_key
        )
        (value, stats), ours = jax.jit(jax.value_and_grad(loss, has_aux=True))(student["params"])
        want_grads = port64(model.port_official, flat(parts, grads))["params"]
        want_stats = port64(model.port_official, flat(after))["batch_stats"]
    leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ours)}
    ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want_grads)}
    zero = [k for k in ref if k.startswith("['proj']") and k.endswith("['bias']")]  # a bias before an InstanceNorm
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    rows = [
        (
            name,
            "loss, float64 train step",
            f"{float(value):.10f} / {want:.10f}",
            abs(float(value) - want) / abs(want),
            1e-9,
        ),
        (
            name,
            f"gradients ({len(ref) - len(zero)} parameters), float64",
            "",
            rel([leaves[k] for k in ref if k not in zero], [ref[k] for k in ref if k not in zero]),
            1e-9,
        ),
        (name, "BN running stats after the step, float64", "", rel(stats, want_stats), 1e-9),
    ]
    if zero:
        err = max(float(np.max(np.abs(np.asarray(leaves[k]) - ref[k]))) for k in zero) / scale
        rows.append(
            (name, f"MPL conv bias gradients ({len(zero)}, zero in exact arithmetic) / max grad", "", err, 1e-12)
        )
    return rows


def rdjax_cli(*argv: str) -> None:
    """`rdjax <argv>` in this process, its chatter kept out of the table (shown on failure)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.run(list(argv))
    if code:
        raise SystemExit(f"rdjax {argv[0]} failed ({code}):\n{out.getvalue()[-3000:]}")


def rdpp_items(category: Path) -> list[tuple]:
    """RD++'s test samples (img, gt, label, type, name) at batch 1, as its MVTecDataset_test makes
    them but for its fixed resize to 256 px (the images already have the model's size)."""
    items = []
    for type_dir in sorted((category / "test").iterdir()):
        for path in sorted(type_dir.glob("*.png")):
            img = torch.from_numpy(
                ((np.asarray(Image.open(path).convert("RGB")) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
            )
            mask = category / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
            gt = (
                np.asarray(Image.open(mask), np.float32)[None] / 255.0
                if mask.exists()
                else np.zeros((1, *img.shape[1:]))
            )
            label = torch.tensor([int(type_dir.name != "good")])
            items.append((img.float()[None], torch.from_numpy(gt).float()[None], label, [type_dir.name], [path.name]))
    return items


def eval_rows(name: str, arch: str, mods: dict, parts: dict, root: Path, size: int, tmp: Path) -> list[Row]:
    """3. The official modules saved as official checkpoints, `rdjax port` + `rdjax eval`, against the
    official evaluation function on the same images (at the model's size, so nothing is resized)."""
    for m in parts.values():
        m.eval()
    torch.save(parts["encoder"].state_dict(), tmp / f"{name}_teacher.pth")
    torch.save({k: parts[k].state_dict() for k in ("proj", "bn", "decoder") if k in parts}, tmp / f"{name}.pth")
    work = tmp / f"{name}_ported"
    rdjax_cli(
        "port",
        name,
        f"--arch={arch}",
        f"--teacher={tmp / f'{name}_teacher.pth'}",
        f"--src={tmp / f'{name}.pth'}",
        f"--out={work}",
        f"--image_size={size}",
    )
    rdjax_cli(
        "eval",
        f"--workdir={work}",
        "--config=synthetic",
        f"--config.dataset.root={root}",
        f"--config.dataset.data_dir={root / '_tfds'}",
        "--config.dataset.category=disk",
        f"--config.image_size={size}",
        f"--config.model.name={name}",
    )
    ours = json.loads((work / "metrics.json").read_text())
    if name == "rd4ad":  # its own dataset class and transforms (identities at this size), batch 1
        transform, gt_transform = mods["dataset"].get_data_transforms(size, size)
        data = mods["dataset"].MVTecDataset(str(root / "disk"), transform, gt_transform, phase="test")
        loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)
        theirs = mods["test"].evaluation(parts["encoder"], parts["bn"], parts["decoder"], loader, "cpu")
    else:
        evaluate = mods["utils.utils_test"].evaluation_multi_proj
        theirs = evaluate(
            parts["encoder"], parts["proj"], parts["bn"], parts["decoder"], rdpp_items(root / "disk"), "cpu"
        )
    rows = []
    for label, key, value in zip(
        ("pixel AUROC", "image AUROC", "PRO per image (test.py's)"),
        ("pixel_auroc", "image_auroc", "pro_rd4ad_per_image"),
        theirs,
    ):
        rows.append(
            (name, f"{label}, ported checkpoint, abs", f"{ours[key]:.6f} / {value:.6f}", abs(ours[key] - value), 1e-3)
        )
    return rows


def header(args: argparse.Namespace) -> list[str]:
    """Date, CPU model, library versions and the clones' commits, for the record."""
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", f"cpu: {cpu}"]
    import geomloss
    import pandas
    import skimage

    lines.append(
        f"jax {jax.__version__}, torch {torch.__version__}, numpy {np.__version__}, geomloss {geomloss.__version__}, pandas {pandas.__version__}, scikit-image {skimage.__version__}"
    )
    for label, repo in (("hq-deng/RD4AD", args.rd4ad), ("tientrandinh/Revisiting-Reverse-Distillation", args.rdpp)):
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        lines.append(f"{label}: {done.stdout.strip() if done.returncode == 0 else 'not a git clone'} ({repo})")
    lines.append(
        f"arch {args.arch}, {args.size} px; synthetic test images generated at {args.size} px: no resizing on either side"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rd4ad", type=Path, required=True, help="clone of hq-deng/RD4AD")
    parser.add_argument(
        "--rdpp", type=Path, required=True, help="clone of tientrandinh/Revisiting-Reverse-Distillation"
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")  # their evaluation modules import pyplot
    import pandas as pd

    if not hasattr(pd.DataFrame, "append"):  # RD4AD's compute_pro (module docstring)
        pd.DataFrame.append = lambda self, row, ignore_index=False: pd.concat(
            [self if len(self) else None, pd.DataFrame([row])], ignore_index=ignore_index
        )
    channels = MODELS.get("rd4ad")(args.arch).spec.feature_channels[0]
    images = np.random.default_rng(0).uniform(size=(4, args.size, args.size, 3))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.generate(
            Path(tmp) / "data", categories=("disk",), size=args.size, num_train=8, num_test_good=6, num_per_defect=3
        )
        repos = (
            ("rd4ad", args.rd4ad, ["resnet", "de_resnet", "dataset", "test", "main"]),
            ("rdpp", args.rdpp, ["model.resnet", "model.de_resnet", "utils.utils_train", "utils.utils_test"]),
        )
        for name, repo, modules in repos:
            mods = import_official(repo, modules)
            parts = build(mods, args.arch, channels, seed=10)
            rows += feature_rows(name, args.arch, parts, images[:2].astype(np.float32))
            rows += step_rows(name, args.arch, mods, parts, images)
            rows += eval_rows(name, args.arch, mods, parts, root, args.size, Path(tmp))
    print("\n".join(header(args)) + "\n")
    widths = (6, max(len(r[1]) for r in rows), max(len(r[2]) for r in rows) or 1)
    print(
        f"{'model':6}  {'comparison':{widths[1]}}  {'rdjax / official':{widths[2]}}  {'error':>8}  {'tolerance':>9}  result"
    )
    for name, what, values, err, tol in rows:
        print(
            f"{name:6}  {what:{widths[1]}}  {values:{widths[2]}}  {err:8.1e}  {tol:9.0e}  {'PASS' if err <= tol else 'FAIL'}"
        )
    return 0 if all(err <= tol for *_, err, tol in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
