"""Host memory and speed against the size of the data: training plus evaluation per row,
each in a fresh process (`python -m rdjax.main`), on synthetic data it generates itself.

  python experiments/scale.py                                  # 100 and 800 images, resnet18, 256 px
  python experiments/scale.py --train=10000 --test=2000        # the large run of docs/scaling.md
  python experiments/scale.py --arch=wide_resnet50_2 --size=1024 --train=50 --test=20 --batch=2
  python experiments/scale.py --size=128 --train=48 --test=48 --batch=8 --epochs=3 --feature_cache=memory,disk
  python experiments/scale.py --setting=unified --categories=1,3 --train=600 --test=300   # one model, K categories

Peak RSS is the child's own (os.wait4), so rows do not mix. Images/s come from the
run's train_log.json and metrics.json. Prints a markdown table with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from performance import cpu_model  # noqa: E402  (experiments/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def dataset(base: Path, size: int, train: int, test: int, categories: int = 1) -> Path:
    """An MVTec-layout folder of ``categories`` categories (weave, each from its own seed)
    that share ``train`` and ``test`` images evenly, made once per shape: a third of each
    category's test images are normal, the rest split over the three defect types."""
    from rdjax.data import synthetic

    root = base / f"weave_{size}px_{train}_{test}_{categories}"
    train, test = train // categories, test // categories
    per_defect = max((test - test // 3) // 3, 1)
    for k in range(categories):
        name = "weave" if categories == 1 else f"weave{k}"
        if not (root / name).is_dir():
            made = synthetic.generate(root / f".{name}", categories=("weave",), seed=k, size=size, num_train=train,
                                      num_test_good=test - 3 * per_defect, num_per_defect=per_defect)  # fmt: skip
            os.replace(made / "weave", root / name)
            shutil.rmtree(made)
    return root


def run(args: argparse.Namespace, root: Path, workdir: Path, mode: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "rdjax.main",
        "--config=synthetic",
        f"--workdir={workdir}",
        f"--config.dataset.root={root}",
        f"--config.dataset.data_dir={root / '_tfds'}",
        f"--config.setting={args.setting}",
        f"--config.dataset.name={'synthetic' if args.setting == 'per_category' else 'mvtec'}",
        f"--config.dataset.category={'weave' if args.setting == 'per_category' else 'all'}",
        f"--config.model.arch={args.arch}",
        f"--config.image_size={args.size}",
        f"--config.batch_size={args.batch}",
        f"--config.eval_batch_size={args.eval_batch}",
        f"--config.num_epochs={args.epochs}",
        f"--config.eval_every={args.epochs}",
        f"--config.feature_cache={mode}",
        *([] if args.exact_pixels is None else [f"--config.exact_metrics_max_pixels={args.exact_pixels}"]),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"run failed ({status}):\n{out[-3000:]}")
    log = json.loads((workdir / "train_log.json").read_text())[-1]
    metrics = json.loads((workdir / "metrics.json").read_text())
    parts = metrics.get("categories", {"": metrics})  # a unified run's are per category
    return {
        "peak_rss_gb": usage.ru_maxrss / 2**20,
        "train_img_s": log["images_per_second"],
        "eval_img_s": metrics["eval_images_per_second"],
        "pixel_metrics": "/".join(sorted({m["pixel_metrics"] for m in parts.values()})),
        "feature_cache": log.get("feature_cache"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="100,800", help="training images per row, comma-separated")
    parser.add_argument("--test", default="100,800", help="test images per row (paired with --train)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval_batch", type=int, default=16)
    parser.add_argument(
        "--epochs", type=int, default=1, help="train img/s is the last epoch's (the first includes compiling the step)"
    )
    parser.add_argument("--feature_cache", default="auto", help="one or more modes, comma-separated: a row each")
    parser.add_argument("--exact_pixels", type=int, default=None, help="config.exact_metrics_max_pixels (0: binned)")
    parser.add_argument("--setting", default="per_category", choices=["per_category", "unified"])
    parser.add_argument("--categories", default="1", help="unified: categories per row, comma-separated (a row each)")
    parser.add_argument("--data", default="", help="where generated data and workdirs go (default: a new temp folder)")
    args = parser.parse_args()
    trains = [int(x) for x in args.train.split(",")]
    tests = [int(x) for x in args.test.split(",")]
    if len(tests) == 1:
        tests = tests * len(trains)
    base = Path(args.data or tempfile.mkdtemp(prefix="rdjax_scale_"))
    print(
        f"{cpu_model()}, {os.cpu_count()} cores; {datetime.date.today()}; {args.arch} {args.size} px, "
        f"batch {args.batch}, eval batch {args.eval_batch}, {args.epochs} epoch(s) plus evaluation",
        flush=True,
    )
    print(
        "| categories | train images | test images | feature_cache | peak RSS (GB) | train img/s | eval img/s "
        "| wall (s) | pixel metrics |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    counts = [int(x) for x in args.categories.split(",")]
    if args.setting == "per_category" and counts != [1]:
        raise SystemExit("--categories needs --setting=unified (a per-category run trains one category)")
    for train, test in zip(trains, tests):
        for categories in counts:
            root = dataset(base, args.size, train, test, categories)
            for mode in args.feature_cache.split(","):
                workdir = base / "runs" / f"{args.arch}_{args.size}_{train}_{test}_{categories}_{mode}_{time.time_ns()}"
                r = run(args, root, workdir, mode)
                chosen = mode if mode == r["feature_cache"] else f"{mode} -> {r['feature_cache']}"
                print(
                    f"| {categories} | {train} | {test} | {chosen} | {r['peak_rss_gb']:.2f} | {r['train_img_s']:.2f} "
                    f"| {r['eval_img_s']:.2f} | {r['seconds']:.0f} | {r['pixel_metrics']} |",
                    flush=True,
                )
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
