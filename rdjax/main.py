"""Entry point: python -m rdjax.main --config=configs/mvtec.py --workdir=DIR [--mode=train|eval]

Holds the flags and the config; the work happens in rdjax.train.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if possible) or eval (latest checkpoint).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize(); on TPU pods and SLURM it finds its own settings.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, where the platform does not supply it.")
flags.DEFINE_integer("num_processes", None, "Number of processes, where the platform does not supply it.")
flags.DEFINE_integer("process_id", None, "This process's index, where the platform does not supply it.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """JAX's multi-controller runtime: one process per host, all running this same command."""
    import jax

    explicit = FLAGS.coordinator_address is not None
    if not (FLAGS.distributed or explicit):
        return
    # Collectives between CPU processes (CPU-only clusters, the tests); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def run(config, workdir: Path, mode: str) -> dict:
    from rdjax import train

    if mode == "eval":
        return train.evaluate_workdir(config, workdir)
    return train.train_and_evaluate(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from rdjax import evaluate, port
    from rdjax.data.datasets import DataError, list_categories
    from rdjax.train import TrainingError

    logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
    initialize_distributed()
    config, workdir = FLAGS.config, Path(FLAGS.workdir)
    from rdjax.data.novelty import NOVELTY_DATASETS

    if config.dataset.name in NOVELTY_DATASETS:  # one-class novelty: the category is the normal class
        with config.unlocked():
            nc = config.dataset.normal_class
            config.dataset.category = "all" if nc == "all" else f"class_{nc}"
    try:
        if config.dataset.category == "all":
            categories = list_categories(config)
            if not categories:
                raise DataError(f"{config.dataset.root}: no categories found (folders with train/ and test/)")
            results = {}
            for category in categories:
                with config.unlocked():
                    config.dataset.category = category
                results[category] = run(config, workdir / category, FLAGS.mode)
            keys = ("image_auroc", "image_auroc_sum") if config.dataset.name in NOVELTY_DATASETS else None
            table = evaluate.summary_markdown(results, keys)
            if jax.process_index() == 0:
                evaluate.write_text(workdir / "results.md", table)
                print(table)
        else:
            r = run(config, workdir, FLAGS.mode)
            if jax.process_index() == 0:
                print(
                    f"{config.dataset.category}: image AUROC {r['image_auroc']:.4f}  pixel AUROC {r['pixel_auroc']:.4f}  "
                    f"AUPRO {r['aupro']:.4f}  (epoch {r['epoch']}; {workdir / 'results.md'})"
                )
    except (DataError, port.PortError, TrainingError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
