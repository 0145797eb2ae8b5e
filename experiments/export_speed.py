"""CPU throughput of the exported artifacts beside rdjax's own predict, on one machine in
one run, and the map error of half-precision weights (docs/export.md).

  python experiments/export_speed.py                               # resnet18, 256 px, batch 8
  python experiments/export_speed.py --arch=wide_resnet50_2 --size=256
  python experiments/export_speed.py --workdir=runs/bottle         # a trained workdir

Without --workdir it trains a throwaway workdir for one epoch on generated images with a
random teacher: speed does not depend on the weights. Images/s are the median of
--repeats timed calls on one batch of random uint8 images, after one untimed call.
OpenVINO runs twice: asked for float32, and with its CPU default (bfloat16 arithmetic on
CPUs with AVX512-BF16 or AMX). Needs the `onnx` extras, jax2onnx and openvino.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from performance import cpu_model  # noqa: E402  (experiments/ is on sys.path when run as a script)


def throwaway_workdir(base: Path, arch: str, size: int, batch: int) -> Path:
    from rdjax import train
    from rdjax.configs import synthetic as synthetic_config
    from rdjax.data import synthetic

    root = synthetic.generate(
        base / "data", categories=("disk",), size=size, num_train=batch, num_test_good=2, num_per_defect=1
    )
    config = synthetic_config.get_config()
    config.dataset.root, config.dataset.data_dir, config.dataset.category = str(root), str(root / "_tfds"), "disk"
    config.model.arch, config.image_size, config.batch_size, config.eval_batch_size = arch, size, batch, batch
    config.num_epochs = config.eval_every = 1
    train.train_and_evaluate(config, base / "workdir")
    return base / "workdir"


def images_per_second(call: Callable[[np.ndarray], object], batch: np.ndarray, repeats: int) -> float:
    call(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import onnxruntime
    import openvino

    import rdjax
    from rdjax.deploy import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workdir = Path(args.workdir) if args.workdir else throwaway_workdir(tmp, args.arch, args.size, args.batch)
        model = rdjax.load(workdir)
        size = model.image_size
        batch = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        want = model.predict_resized(batch)[0]
        rows = [
            ("rdjax predict (jit, CPU lowering)", images_per_second(model.predict_resized, batch, args.repeats), 0.0)
        ]

        exported = export.export_jax(model)
        loaded = jax.export.deserialize(exported.serialize())
        run_jax = lambda x: jax.block_until_ready(loaded.call(x))  # noqa: E731
        rows.append(
            (
                "jax.export artifact",
                images_per_second(run_jax, batch, args.repeats),
                rel_err(np.asarray(loaded.call(batch)[0]), want),
            )
        )

        onnx_path = tmp / "model.onnx"
        onnx_path.write_bytes(export.export_onnx(model))
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        run_ort = lambda x: session.run(None, {"images": x})  # noqa: E731
        rows.append(
            ("ONNX, onnxruntime", images_per_second(run_ort, batch, args.repeats), rel_err(run_ort(batch)[0], want))
        )

        core = openvino.Core()
        for label, config in (
            ("ONNX, OpenVINO (f32)", {"INFERENCE_PRECISION_HINT": "f32"}),
            ("ONNX, OpenVINO (CPU default)", {}),
        ):
            compiled = core.compile_model(str(onnx_path), "CPU", config)
            run_ov = lambda x, c=compiled: c(x)[c.output("maps")]  # noqa: E731
            rows.append((label, images_per_second(run_ov, batch, args.repeats), rel_err(run_ov(batch), want)))

        for dtype in ("float16", "bfloat16"):
            half = jax.export.deserialize(export.export_jax(model, dtype).serialize())
            run_half = lambda x, h=half: jax.block_until_ready(h.call(x))  # noqa: E731
            rows.append(
                (
                    f"jax.export, {dtype} weights",
                    images_per_second(run_half, batch, args.repeats),
                    rel_err(np.asarray(half.call(batch)[0]), want),
                )
            )

    print(
        f"\n{model.config.model.arch}, {size} px, batch {args.batch}; {cpu_model()}, "
        f"{datetime.date.today()}, jax {jax.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.__version__.split('-')[0]}\n"
    )
    print("| runtime | images/s | x predict | map error (max abs / max) |")
    print("|---|---|---|---|")
    for label, speed, err in rows:
        print(f"| {label} | {speed:.1f} | {speed / rows[0][1]:.2f} | {err:.1e} |")


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


if __name__ == "__main__":
    sys.exit(main())
