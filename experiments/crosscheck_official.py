"""Cross-check rdjax against the official RD4AD and RD++ repositories' own code (not re-implementations).

    python experiments/crosscheck_official.py --rd4ad DIR --rdpp DIR [--arch resnet18] [--size 64] [--native 1024]

DIR: local clones of hq-deng/RD4AD and tientrandinh/Revisiting-Reverse-Distillation, imported at run time
one at a time (both define `resnet`, `de_resnet`, `dataset`, ...: their modules leave sys.modules before
and after). The tests cannot (the clones are not in the repository; tests/reference/torch_reference.py rebuilds
them). Per model, on the official builders' random weights with random BatchNorm statistics:
1. teacher, MPL (RD++) and student features, float32, eval mode, ported with port_teacher/port_official;
2. one float64 train-mode step: the official loss (RD4AD main.loss_fucntion; RD++ main.py's loop body,
   L_distill + 0.2 Revisit_RDLoss), every student gradient, the BatchNorm running statistics after it;
   RD++'s noised images come from rdjax.models.rdpp.add_noise and are fed to both sides;
3. after 20 steps of the official loop on synthetic 'weave' images: `rdjax port` + `rdjax eval` against
   the official evaluation (RD4AD test.evaluation on its MVTecDataset; RD++ evaluation_multi_proj) on
   test images generated at --native px (default: the model's size, nothing resized), each side making
   them model inputs by its own pipeline (rdjax: the model's input recipe, docs/config.md).
Patched (their code assumes CUDA and 2022-23 libraries): torch.Tensor.to('cuda') is a no-op and
torch.randperm returns rdjax's ssot_permutation while Revisit_RDLoss runs (it moves its target to
'cuda'; the same permutation pairs the same images in SSOT); cv2 is an empty module when OpenCV is absent
(they draw heat maps with it only); pandas.DataFrame.append (gone since pandas 2) is pd.concat, for
RD4AD's compute_pro; `round` in their evaluation modules is the identity, to compare unrounded metrics.
RD++'s dataset module is not imported (it needs numba, and fixes the size at 256 px): `rdpp_items`
repeats its test transform (cv2.imread, RGB, cv2.resize of the image / 255 to --size, ImageNet Normalize in
float64, float32; masks torchvision Resize + ToTensor). Needs pandas, scikit-image, OpenCV.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from PIL import Image

from rdjax import cli
from rdjax.data import synthetic
from rdjax.models.rdpp import add_noise, ssot_permutation
from rdjax.registry import MODELS

THEIR_NAMES = {"resnet", "de_resnet", "dataset", "test", "main", "model", "utils", "inference"}
CATEGORY = "weave"  # a texture: 20 steps give it nontrivial maps (a random model's PRO is 0 on both sides)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
Row = tuple[str, str, str, float, float]  # model, comparison, values, error, tolerance
Parts = dict[str, torch.nn.Module]
nhwc = lambda feats: [f.detach().numpy().transpose(0, 2, 3, 1) for f in feats]  # torch features as rdjax's


def import_official(repo: Path, names: list[str]) -> dict[str, types.ModuleType]:
    """The clone's own modules, with only that clone on sys.path; their same-named modules forgotten after."""

    def forget() -> None:
        for name in [n for n in sys.modules if n.split(".")[0] in THEIR_NAMES]:
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
        if hasattr(mod, "roc_auc_score"):  # their evaluation modules round what they return
            mod.round = lambda value, ndigits=None: float(value)
    return mods


@contextlib.contextmanager
def on_cpu(perm: np.ndarray) -> Iterator[None]:
    """Tensor.to('cuda') a no-op and torch.randperm = ``perm``, for Revisit_RDLoss (module docstring)."""
    to, randperm = torch.Tensor.to, torch.randperm
    torch.Tensor.to = lambda self, *a, **k: to(self, *[x for x in a if not str(x).startswith("cuda")], **k)
    torch.randperm = lambda n, *a, **k: torch.as_tensor(perm)
    try:
        yield
    finally:
        torch.Tensor.to, torch.randperm = to, randperm


def build(mods: dict[str, types.ModuleType], arch: str, channels: int, seed: int) -> Parts:
    """The official builders' random modules, each BatchNorm with random affine parameters and running
    statistics, so that a port that drops or confuses them cannot pass."""
    torch.manual_seed(seed)
    prefix = "model." if "model.resnet" in mods else ""  # RD++ keeps them in a folder
    encoder, bn = getattr(mods[prefix + "resnet"], arch)(pretrained=False)
    parts = {"encoder": encoder, "bn": bn, "decoder": getattr(mods[prefix + "de_resnet"], f"de_{arch}")()}
    if "utils.utils_train" in mods:
        parts["proj"] = mods["utils.utils_train"].MultiProjectionLayer(base=channels // 4)
    g = torch.Generator().manual_seed(seed + 1)
    for m in (m for part in parts.values() for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        c = m.num_features
        m.weight.data, m.bias.data = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
        m.running_mean.data, m.running_var.data = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    return parts


def flat(parts: Parts, values: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """The official checkpoint {'proj', 'bn', 'decoder'} as rdjax reads it; ``values`` (gradients)
    replace the entries they name."""
    out = {}
    for key in [k for k in ("proj", "bn", "decoder") if k in parts]:
        for n, t in parts[key].state_dict().items():
            out[f"{key}.{n}"] = (values or {}).get(f"{key}.{n}", t).detach().numpy()
    return out


def port64(port: Callable[[dict[str, np.ndarray]], dict], tree: dict[str, np.ndarray]) -> dict:
    """A float64 tree through the float32 port, as float32 high and low parts (about 48 bits)."""
    high = {k: v.astype(np.float32) for k, v in tree.items()}
    low = {k: (v - high[k]).astype(np.float32) for k, v in tree.items()}
    return jax.tree.map(lambda h, lo: h.astype(np.float64) + lo, port(high), port(low))


def rel(ours: object, ref: object) -> float:
    """max |ours - ref| / max |ref| per array of two equal trees, the largest over the arrays."""
    pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(ref))
    return max(float(np.max(np.abs(np.asarray(o) - np.asarray(r))) / np.max(np.abs(r))) for o, r in pairs)


def nchw(x: np.ndarray) -> torch.Tensor:
    """[0, 1] NHWC -> normalized contiguous NCHW (a strided view would run torch in channels-last)."""
    return torch.from_numpy(np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2)))


def official_loss(mods: dict, p: Parts, x: torch.Tensor, noised: torch.Tensor | None, perm: np.ndarray) -> torch.Tensor:
    """The loss of the official loop bodies (RD4AD main.py; RD++ main.py, weight_proj at its default 0.2)."""
    inputs = p["encoder"](x)
    if noised is None:
        return mods["main"].loss_fucntion(inputs, p["decoder"](p["bn"](inputs)))
    train = mods["utils.utils_train"]
    inputs_noise = p["encoder"](noised)
    feature_space_noise, feature_space = p["proj"](inputs, features_noise=inputs_noise)
    with on_cpu(perm):
        l_proj = train.Revisit_RDLoss()(inputs_noise, feature_space_noise, feature_space)
    return train.loss_fucntion(inputs, p["decoder"](p["bn"](feature_space))) + 0.2 * l_proj


def feature_rows(name: str, arch: str, parts: Parts, images: np.ndarray) -> list[Row]:
    """1. Eval-mode float32 features; the student reads the official teacher's features on both sides."""
    model = MODELS.get(name)(arch, "float32")
    for m in parts.values():
        m.eval()
    teacher_vars = model.port_teacher({k: v.numpy() for k, v in parts["encoder"].state_dict().items()})
    student_vars = model.port_official(flat(parts))
    with torch.no_grad():
        t = parts["encoder"](nchw(images).float())
        p = parts["proj"](t) if "proj" in parts else t
        s = parts["decoder"](parts["bn"](p))
    ft = tuple(jnp.asarray(f) for f in nhwc(t))
    ours_t = jax.jit(model.teacher_features)(teacher_vars, jnp.asarray((images - MEAN) / STD, jnp.float32))
    rows = [(name, "teacher layer1-3, float32 eval", "", rel(ours_t, nhwc(t)), 1e-4)]
    if "proj" in parts:
        ours_p = jax.jit(lambda v, f: model.student.apply(v, f, method=lambda m, x: m.proj(x)))(student_vars, ft)
        rows.append((name, "MPL features, float32 eval", "", rel(ours_p, nhwc(p)), 1e-4))
    ours_s = jax.jit(lambda v, f: model.student_features(v, f, False)[0])(student_vars, ft)
    return rows + [(name, "student features, float32 eval", "", rel(ours_s, nhwc(s)), 1e-4)]


def step_rows(name: str, arch: str, mods: dict, parts: Parts, images: np.ndarray) -> list[Row]:
    """2. One float64 train-mode step: loss, every student gradient, BatchNorm running statistics after it."""
    noise_key, key = jax.random.split(jax.random.key(3))
    p = {k: copy.deepcopy(m).double().train(k != "encoder") for k, m in parts.items()}
    with jax.enable_x64(True):
        model, to64 = MODELS.get(name)(arch, "float64"), lambda tree: jax.tree.map(jnp.float64, tree)
        batches = [images] + ([np.asarray(add_noise(jnp.asarray(images), noise_key))] if name == "rdpp" else [])
        x, noised = nchw(batches[0]), nchw(batches[1]) if len(batches) > 1 else None
        official = official_loss(mods, p, x, noised, np.asarray(ssot_permutation(key, jnp.ones(len(images)))))
        official.backward()
        want = official.item()
        grads = {f"{k}.{n}": q.grad for k in p for n, q in p[k].named_parameters() if q.grad is not None}
        teacher = to64(model.port_teacher({k: v.numpy() for k, v in parts["encoder"].state_dict().items()}))
        student = to64(model.port_official(flat(parts)))
        feats = [jax.jit(model.teacher_features)(teacher, jnp.asarray((b - MEAN) / STD)) for b in batches]
        inputs = tuple(feats) if name == "rdpp" else feats[0]
        loss = lambda v: model.train_loss({"params": v, "batch_stats": student["batch_stats"]}, inputs, key)
        (value, stats), ours = jax.jit(jax.value_and_grad(loss, has_aux=True))(student["params"])
        ref = port64(model.port_official, flat(parts, grads))["params"]  # OCBE's unused conv4/bn4 have none
        want_stats = port64(model.port_official, flat(p))["batch_stats"]
    ours = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ours)}
    ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ref)}
    zero = [k for k in ref if k.startswith("['proj']") and k.endswith("['bias']")]  # biases before InstanceNorm
    rest = [k for k in ref if k not in zero]
    values, grad_err = f"{float(value):.12f} / {want:.12f}", rel([ours[k] for k in rest], [ref[k] for k in rest])
    rows = [
        (name, "loss, float64 train step", values, abs(float(value) / want - 1), 1e-9),
        (name, f"gradients of {len(rest)} parameters, float64", "", grad_err, 1e-9),
        (name, "BN running statistics after the step, float64", "", rel(stats, want_stats), 1e-9),
    ]
    if zero:  # zero in exact arithmetic: measured against the largest gradient
        err = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in zero) / max(
            float(np.max(np.abs(v))) for v in ref.values()
        )
        rows.append((name, f"MPL conv bias gradients ({len(zero)}; exactly 0) / max gradient", "", err, 1e-12))
    return rows


def official_input(name: str, path: Path, size: int) -> np.ndarray:
    """A file as the official dataset makes it a [0, 1] float image of the model's size: RD4AD PIL and
    torchvision's Resize; RD++ cv2.imread, RGB, cv2.resize of the float64 image."""
    if name == "rd4ad":
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)) / 255.0
    import cv2

    return cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) / 255.0, (size, size))


def train_official(name: str, mods: dict, parts: Parts, train_dir: Path, size: int, steps: int = 20) -> None:
    """A few steps of the official loop on the synthetic train images, so that the evaluated maps mean
    something. Adam, betas (0.5, 0.999), lr 0.005 for OCBE and decoder and 0.001 for RD++'s MPL, as both
    main.py; batches of 8; RD++'s 2-batch accumulation is left out (it does not matter here)."""
    images = np.stack([official_input(name, f, size) for f in sorted(train_dir.glob("*.png"))])
    groups = [{"params": [q for k in ("bn", "decoder") for q in parts[k].parameters()], "lr": 0.005}]
    groups += [{"params": list(parts["proj"].parameters()), "lr": 0.001}] if "proj" in parts else []
    optimizer = torch.optim.Adam(groups, betas=(0.5, 0.999))
    rng = np.random.default_rng(4)
    for m in parts.values():
        m.train(m is not parts["encoder"])
    for i in range(steps):
        batch = images[rng.permutation(len(images))[:8]]
        noised = nchw(np.asarray(add_noise(jnp.asarray(batch), jax.random.key(i)))).float() if "proj" in parts else None
        loss = official_loss(mods, parts, nchw(batch).float(), noised, rng.permutation(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def rdjax_cli(*argv: str) -> None:
    """`rdjax <argv>` in this process, its output kept out of the table (shown on failure)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.invoke(list(argv))
    if code:
        raise SystemExit(f"rdjax {argv[0]} failed ({code}):\n{out.getvalue()[-3000:]}")


def rdpp_items(category: Path, size: int) -> list[tuple]:
    """RD++'s test samples (img, gt, label, type, name) at batch 1, as its MVTecDataset_test makes them,
    at --size instead of its fixed 256 px."""
    from torchvision import transforms

    gt_transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    items = []
    for kind in sorted((category / "test").iterdir()):
        for path in sorted(kind.glob("*.png")):
            img = torch.from_numpy(((official_input("rdpp", path, size) - MEAN) / STD).transpose(2, 0, 1)).float()
            mask = category / "ground_truth" / kind.name / f"{path.stem}_mask.png"
            gt = gt_transform(Image.open(mask)) if mask.exists() else torch.zeros(1, size, size)
            label = torch.tensor([int(kind.name != "good")])
            items.append((img[None], gt[None], label, [kind.name], [path.name]))
    return items


def eval_rows(name: str, arch: str, mods: dict, parts: Parts, root: Path, size: int, tmp: Path) -> list[Row]:
    """3. The official modules saved as official checkpoints, `rdjax port` + `rdjax eval`, against the
    official evaluation function on the same files, each side resizing them by its own pipeline."""
    category = root / CATEGORY
    train_official(name, mods, parts, category / "train" / "good", size)
    for m in parts.values():
        m.eval()
    teacher, checkpoint, work = tmp / f"{name}_teacher.pth", tmp / f"{name}.pth", tmp / f"{name}_ported"
    torch.save(parts["encoder"].state_dict(), teacher)
    torch.save({k: parts[k].state_dict() for k in ("proj", "bn", "decoder") if k in parts}, checkpoint)
    files = [f"--teacher={teacher}", f"--src={checkpoint}", f"--out={work}", f"--image_size={size}"]
    rdjax_cli("port", name, f"--arch={arch}", *files)
    data = (("name", "synthetic"), ("root", root), ("category", CATEGORY), ("data_dir", root / "_tfds"))
    rdjax_cli("eval", f"--workdir={work}", *(f"--config.dataset.{k}={v}" for k, v in data))  # the port's config
    ours = json.loads((work / "metrics.json").read_text())
    if name == "rd4ad":  # its own dataset class and transforms, batch 1
        transform, gt_transform = mods["dataset"].get_data_transforms(size, size)
        dataset = mods["dataset"].MVTecDataset(str(category), transform, gt_transform, phase="test")
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)
        theirs = mods["test"].evaluation(parts["encoder"], parts["bn"], parts["decoder"], loader, "cpu")
    else:
        evaluate = mods["utils.utils_test"].evaluation_multi_proj
        items = rdpp_items(category, size)
        theirs = evaluate(parts["encoder"], parts["proj"], parts["bn"], parts["decoder"], items, "cpu")
    labels = ("pixel AUROC", "image AUROC", "PRO per image (official definition)")
    keys = ("pixel_auroc", "image_auroc", "pro_rd4ad_per_image")
    return [
        (name, f"{label}, ported trained model, abs", f"{ours[key]:.6f} / {value:.6f}", abs(ours[key] - value), 1e-3)
        for label, key, value in zip(labels, keys, theirs)
    ]


def header(args: argparse.Namespace) -> list[str]:
    """Date, CPU model, versions and the clones' commits, for the record."""
    import geomloss
    import pandas
    import skimage

    cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", f"cpu: {cpu[0]} x{len(cpu)}"]
    lines.append(f"jax {jax.__version__}, torch {torch.__version__}, numpy {np.__version__}, geomloss ")
    lines[-1] += f"{geomloss.__version__}, pandas {pandas.__version__}, scikit-image {skimage.__version__}"
    for label, repo in (("hq-deng/RD4AD", args.rd4ad), ("tientrandinh/Revisiting-Reverse-Distillation", args.rdpp)):
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        lines.append(f"{label}: {done.stdout.strip() if done.returncode == 0 else 'not a git clone'}")
    made = f"synthetic '{CATEGORY}' images made at {args.native} px"
    return lines + [f"{args.arch}, {args.size} px; {made}" + (" (no resizing)" if args.native == args.size else "")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rd4ad", type=Path, required=True, help="a clone of hq-deng/RD4AD")
    parser.add_argument("--rdpp", type=Path, required=True, help="a clone of its RD++ repository")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--native", type=int, default=0, help="the generated images' size (0: --size)")
    args = parser.parse_args()
    args.native = args.native or args.size
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")  # their evaluation modules import pyplot
    if not hasattr(pd.DataFrame, "append"):  # for RD4AD's compute_pro (module docstring)
        pd.DataFrame.append = lambda df, row, ignore_index: pd.concat([df if len(df) else None, pd.DataFrame([row])])
    channels = MODELS.get("rd4ad")(args.arch).spec.feature_channels[0]
    images = np.random.default_rng(0).uniform(size=(4, args.size, args.size, 3))
    repos = (
        ("rd4ad", args.rd4ad, ["resnet", "de_resnet", "dataset", "test", "main"]),
        ("rdpp", args.rdpp, ["model.resnet", "model.de_resnet", "utils.utils_train", "utils.utils_test"]),
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.generate(Path(tmp) / "data", (CATEGORY,), size=args.native, num_train=16, num_test_good=6)
        for name, repo, modules in repos:
            mods = import_official(repo, modules)
            parts = build(mods, args.arch, channels, seed=10)
            rows += feature_rows(name, args.arch, parts, images[:2])
            rows += step_rows(name, args.arch, mods, parts, images)
            rows += eval_rows(name, args.arch, mods, parts, root, args.size, Path(tmp))
    w1, w2 = max(len(r[1]) for r in rows), max(len(r[2]) for r in rows)
    title = f"model  {'comparison':{w1}}  {'rdjax / official':{w2}}     error  tolerance  result"
    print("\n".join([*header(args), "", title]))
    for name, what, values, err, tol in rows:
        print(f"{name:5}  {what:{w1}}  {values:{w2}}  {err:8.1e}  {tol:9.0e}  {'PASS' if err <= tol else 'FAIL'}")
    return 0 if all(err <= tol for *_, err, tol in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
