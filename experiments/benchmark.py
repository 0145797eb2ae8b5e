"""Throughput and memory of training and inference, compile time reported apart.

  python experiments/benchmark.py                       # paper setting and a small one, one table
  python experiments/benchmark.py --arch=wide_resnet50_2 --size=256 --batch=8 --json
  python experiments/benchmark.py --arch=resnet18 --models=rd4ad,rdpp   # RD4AD beside RD++, same run
  python experiments/benchmark.py --arch=resnet18 --size=256 --models=rd4ad,rdpp,dinomaly \
      --vit_arch=vit_tiny14_reg4 --vit_size=392      # Dinomaly takes a ViT and its own size

Dinomaly's settings come from --vit_arch and --vit_size (a ViT, a multiple of 14); the
maps of every model follow its official config (Dinomaly's: the mean of its groups at
256 px, a 5 x 5 blur, the top-1 % score).

Training is measured as rdjax trains: one optimizer step on cached teacher features
(`train_img_s`), and also with the teacher forward inside every step as the official code
does (`train_teacher_img_s`; RD++ always, with its second, noised teacher pass).
Inference is the full path from uint8 images: teacher, OCBE, decoder, maps, upsampling,
blur and score (`eval_img_s`). Peak memory is the device's peak where
the backend reports it (GPUs, TPUs), else the process's peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import numpy as np

from rdjax import config as config_lib
from rdjax.data.normalize import normalize
from rdjax.registry import MODELS
from rdjax.runtime import sharding
from rdjax.runtime import state as state_lib
from rdjax.scoring import maps
from rdjax.train import steps as steps_lib


def _timed(fn, args_fn, steps: int) -> tuple[float, float]:
    """(first call seconds, steady seconds per call) with results blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args_fn()))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args_fn())
    jax.block_until_ready(out)
    return first, (time.perf_counter() - start) / steps


def peak_memory_mb() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(arch: str, size: int, batch: int, steps: int, dtype: str, name: str = "rd4ad") -> dict:
    model = MODELS.get(name)(arch, dtype)
    mesh = sharding.make_mesh()
    put = functools.partial(sharding.put_batch, sharding=sharding.batch_sharding(mesh))
    teacher_vars, student_vars = model.init(jax.random.key(0), size)
    teacher_vars = jax.device_put(teacher_vars, sharding.replicated(mesh))
    tx = model.optimizer(config_lib.defaults())
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = put(images)
    valid = put(np.ones(batch, np.float32))  # every row counts: a full batch

    feats = jax.jit(lambda tv, im: model.teacher_features(tv, normalize(im)))(teacher_vars, x)
    state = jax.device_put(state_lib.create_train_state(student_vars, tx), sharding.replicated(mesh))
    step = steps_lib.make_train_step(model, tx, mesh)
    holder = {"state": state}

    def run_cached(f):
        holder["state"], loss = step(holder["state"], f, valid)
        return loss

    c_train, t_train = (0.0, float("nan")) if model.needs_images else _timed(run_cached, lambda: (feats,), steps)

    full = steps_lib.make_image_train_step(model, tx, mesh)

    def run_full(im):
        holder["state"], loss = full(holder["state"], teacher_vars, im, valid)
        return loss

    c_full, t_full = _timed(run_full, lambda: (x,), steps)

    official = config_lib.for_workdir(config_lib.shipped_config(model.official_config), None, model)
    eval_step = maps.eval_step_for(model, official)  # the official maps and score
    student_now = holder["state"].student_vars
    c_eval, t_eval = _timed(eval_step, lambda: (teacher_vars, student_now, x), steps)
    return {
        "model": name,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "arch": arch,
        "size": size,
        "batch": batch,
        "dtype": dtype,
        "train_img_s": batch / t_train,
        "train_teacher_img_s": batch / t_full,
        "eval_img_s": batch / t_eval,
        "compile_s": (c_train - t_train if t_train == t_train else 0.0) + (c_full - t_full) + (c_eval - t_eval),
        "peak_mem_mb": peak_memory_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="one setting only (default: the paper's and a small one)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", default="rd4ad", help="comma-separated model names, measured in turn")
    parser.add_argument(
        "--vit_arch", help="Dinomaly's encoder, one setting only (default with --arch: dinov2_vitb14_reg4)"
    )
    parser.add_argument("--vit_size", type=int, default=392, help="Dinomaly's input size, with --vit_arch or --arch")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    settings = {
        "resnet": [(args.arch, args.size, args.batch)]
        if args.arch
        else [("wide_resnet50_2", 256, 16), ("resnet18", 128, 8)],
        "vit": [(args.vit_arch or "dinov2_vitb14_reg4", args.vit_size, args.batch)]
        if args.arch or args.vit_arch
        else [("dinov2_vitb14_reg4", 392, 16), ("vit_tiny14_reg4", 112, 8)],
    }
    rows = [
        measure(a, s, b, args.steps, args.dtype, m)
        for m in args.models.split(",")
        for a, s, b in settings["vit" if m == "dinomaly" else "resnet"]
    ]
    print(
        "| model | device | arch | px | batch | dtype | train img/s (cached teacher) | train img/s (teacher in step) "
        "| eval img/s (full path) | compile s | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} x{r['num_devices']} | {r['arch']} | {r['size']} | {r['batch']} "
            f"| {r['dtype']} "
            f"| {r['train_img_s']:.2f} | {r['train_teacher_img_s']:.2f} | {r['eval_img_s']:.2f} "
            f"| {r['compile_s']:.1f} | {r['peak_mem_mb']:.0f} |"
        )
    if args.json:
        print(json.dumps(rows[-1] if len(rows) == 1 else rows))


if __name__ == "__main__":
    main()
