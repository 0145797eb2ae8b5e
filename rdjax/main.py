"""python -m rdjax.main --config=configs/mvtec.py --workdir=DIR [--mode=train|eval]

The same as `rdjax train` (`rdjax eval` with --mode=eval): rdjax.train.run, which calls
train_and_evaluate (or evaluate) for each category the config asks for.
"""

from __future__ import annotations

import sys

from absl import flags

from rdjax import cli


def _mode_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "mode", "train", ["train", "eval"], "train (resumes if possible) or eval (latest checkpoint).", flag_values=fv
    )


def main(argv: list[str]) -> int:
    return cli.invoke(["train", *argv], extra_flags=_mode_flag, handler=lambda fv, _: cli.run_training(fv, fv.mode))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
