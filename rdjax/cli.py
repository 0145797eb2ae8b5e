"""The `rdjax` command: `rdjax train|eval|predict|export|port [--flag=value ...]`.

One style for every subcommand: absl flags (`--name=value`), and for train and eval an
ml_collections config, named (`--config=mvtec`, shipped with the package) or by path
(`--config=configs/mvtec.py`), with `--config.key=value` overrides. Every error a user
can cause is one line, `error: ...`, on stderr with exit status 1, and nothing is
written before it. `invoke(argv)` is the same command in-process (tests use it).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from rdjax import config as config_lib
from rdjax.errors import ConfigError, Interrupted, RdjaxError, one_line
from rdjax.runtime import start, xla_cache

USAGE = "usage: rdjax COMMAND [--verbose] [--flag=value ...]   (rdjax COMMAND --help for its flags)"


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    define: Callable[[flags.FlagValues, list[str]], None]  # (flags to fill, the argv they will parse)
    run: Callable[[flags.FlagValues, list[str]], None]  # (parsed flags, positional arguments)


# ----------------------------------------------------------------------------- train / eval


def _workdir_config(argv: list[str]) -> ml_collections.ConfigDict | None:
    """`rdjax eval` without --config: the workdir's own config, which --config.key=value
    overrides then change (rdjax.config.check_rerun says which keys may change)."""
    if not argv[0].endswith(" eval") or any(a == "--config" or a.startswith("--config=") for a in argv):
        return None
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
    given += [a for previous, a in zip(argv, argv[1:]) if previous == "--workdir"]
    if not given:
        return None
    from rdjax.runtime import workdir as workdir_lib

    return workdir_lib.saved_config(given[-1])


def define_run_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    # ml_collections finds the --config.key=value overrides in the argv given here.
    help_text = "A config name (mvtec, synthetic, ...) or a config file; eval: default the workdir's own config.json."
    saved = _workdir_config(argv)
    if saved is None:
        config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, lock_config=True, sys_argv=argv)
    else:
        config_flags.DEFINE_config_dict("config", saved, help_text, flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.", flag_values=fv)
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize(); on TPU pods and SLURM it finds its own settings.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, where the platform does not supply it.", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes, where the platform does not supply it.", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index, where the platform does not supply it.", flag_values=fv
    )
    flags.DEFINE_string(
        "compilation_cache",
        xla_cache.default_compilation_cache(),
        "Persistent XLA compilation cache folder, at most 2 GiB ('' turns it off); default: "
        "$RDJAX_XLA_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/rdjax/xla.",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def _evaluation_config(fv: flags.FlagValues, workdir: Path) -> ml_collections.ConfigDict:
    """An evaluation's config: the workdir's own, with the --config.KEY flags the user gave
    (rdjax.config.for_evaluation; --config=mvtec's defaults never block the evaluation of
    weights trained with other settings). A note names the file's values left unused."""
    import jax

    from rdjax.runtime import workdir as workdir_lib

    if not ((workdir / workdir_lib.CONFIG).is_file() or workdir_lib.categories(workdir)):
        return fv.config  # nothing trained there: train.evaluate says so
    given = config_flags.get_override_values(fv["config"])
    config, unused = config_lib.for_evaluation(fv.config, workdir_lib.saved_config(workdir), given)
    if unused and jax.process_index() == 0:
        print(f"note: evaluating {workdir} with its own settings (config.json); the config file's "
              f"{', '.join(unused)} are not used (a --config.KEY=VALUE flag changes one)")  # fmt: skip
    return config


def run_training(fv: flags.FlagValues, mode: str) -> None:
    import jax

    from rdjax.train import loop as train

    workdir = Path(fv.workdir)
    config = fv.config
    if config is None:
        raise ConfigError(f"rdjax {mode} needs --config (a config name such as mvtec, or a config file)")
    xla_cache.use_compilation_cache(fv.compilation_cache)
    start.initialize_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
    if mode == "eval":
        config = _evaluation_config(fv, workdir)
    results = train.run(config, workdir, mode)
    if jax.process_index() != 0:
        return
    if len(results) > 1 or config.dataset.category == "all" or config.setting == "unified":
        print((workdir / "results.md").read_text(), end="")
        return
    from rdjax.scoring.metrics import headline

    ((category, r),) = results.items()
    print(f"{category}: {headline(r)}  (epoch {r['epoch']}; {workdir / 'results.md'})")
    if "threshold_note" in r:
        print(f"{category}: {r['threshold_note']}")


# ----------------------------------------------------------------------------- the table


def _owned_by(module: str, summary: str) -> Command:
    """A command whose module owns its flags and its work, `define_flags(fv, argv)` and
    `main(fv, args)`, imported only when the command is used."""
    return Command(
        summary,
        lambda fv, argv: importlib.import_module(module).define_flags(fv, argv),
        lambda fv, args: importlib.import_module(module).main(fv, args),
    )


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train and evaluate (resumes from the workdir)", define_run_flags, lambda fv, _: run_training(fv, "train")
    ),
    "eval": Command("evaluate a workdir's latest checkpoint", define_run_flags, lambda fv, _: run_training(fv, "eval")),
    "predict": _owned_by("rdjax.deploy.predict", "score image files with a trained workdir"),
    "export": _owned_by("rdjax.deploy.export", "serialize the inference function (jax.export or ONNX)"),
    "package": _owned_by(
        "rdjax.deploy.package", "pack a workdir for deployment: config, teacher, student, calibration, contract"
    ),
    "serve": _owned_by("rdjax.serve.server", "serve a model over HTTP: POST /predict, GET /health, a page at /"),
    "port": _owned_by(
        "rdjax.deploy.port", "import PyTorch weights: 'teacher', or a model's official checkpoint (its name)"
    ),
}


# ----------------------------------------------------------------------------- the runner


def _normalize_args(args: list[str]) -> list[str]:
    """--config=<name> (or --config <name>, or ml_collections' <name>:<arg>) -> the shipped
    file, so configs work from any folder."""
    out = []
    for i, a in enumerate(args):
        if a.startswith("--config=") or (i and args[i - 1] == "--config"):
            prefix, value = ("--config=", a.split("=", 1)[1]) if a.startswith("--config=") else ("", a)
            name, colon, rest = value.partition(":")
            a = prefix + str(config_lib.resolve(name)) + colon + rest
        out.append(a)
    return out


def _config_file_frame(error: BaseException, argv: list[str]) -> traceback.FrameSummary | None:
    """The innermost frame of ``error`` inside the --config file, if it was raised there."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += [a for previous, a in zip(argv, argv[1:]) if previous == "--config"]
    files = {str(Path(value.split(":")[0]).resolve()) for value in given}
    frames = [f for f in traceback.extract_tb(error.__traceback__) if str(Path(f.filename).resolve()) in files]
    return frames[-1] if frames else None


def _unknown_config_key(key: str) -> str:
    """The message for an unknown --config.KEY. A model's options (config.model.X) are keys
    of the configs of that model only (rdjax.models): say which configs set it."""
    from rdjax import registry

    owners = registry.option_owners(key.removeprefix("model.")) if key.startswith("model.") else []
    if owners:
        configs = ", ".join(f"--config={getattr(registry.MODELS.get(n), 'official_config', n)}" for n in owners)
        models = " or ".join(map(repr, owners))
        return (f"unknown config key {key!r} in this config: it is an option of model {models}, set in that "
                f"model's configs ({configs}, or a config file of your own that sets it)")  # fmt: skip
    return f"unknown config key {key!r} (--config.{key}); docs/config.md lists them"


def _parse(
    name: str, command: Command, args: list[str], extra: Callable[[flags.FlagValues], None] | None
) -> tuple[flags.FlagValues, list[str]]:
    argv = [f"rdjax {name}", *_normalize_args(args)]
    fv = flags.FlagValues()
    command.define(fv, argv)
    if extra is not None:
        extra(fv)
    try:
        return fv, fv(argv)[1:]
    except flags.UnrecognizedFlagError as e:
        key = e.flagname
        if key.startswith("config."):
            raise ConfigError(_unknown_config_key(key[len("config.") :])) from None
        raise ConfigError(f"unknown flag --{key}; rdjax {name} --help lists the flags") from None
    except ImportError as e:  # a config that imports what is not installed
        raise ConfigError(f"{one_line(e)}; configs import rdjax.configs, which needs rdjax installed "
                          f"(pip install -e . in the repository)") from None  # fmt: skip
    except Exception as e:
        frame = _config_file_frame(e, argv)
        if frame is not None:  # the config file's own exception, whatever its type
            raise ConfigError(f"{frame.filename}:{frame.lineno}: the config file raised {type(e).__name__}: "
                              f"{one_line(e)}") from e  # fmt: skip
        if isinstance(e, (AttributeError, KeyError)):  # ml_collections: a misspelt --config.a.b=... key
            match = re.match(r"""\W*(\w+)\W*(.*)""", " ".join(str(e).replace("\\n", " ").split()))
            key, hint = match.groups() if match else (str(e), "")
            if any(arg.split("=", 1)[0] == f"--config.model.{key}" for arg in argv):  # another model's option?
                raise ConfigError(_unknown_config_key(f"model.{key}")) from None
            raise ConfigError(f"unknown config key {key!r}. {hint.rstrip(chr(39))}".strip()) from None
        if isinstance(e, (flags.Error, TypeError, ValueError)):
            raise ConfigError(one_line(e)) from None
        if isinstance(e, OSError):  # a config file that fails to load
            raise ConfigError(one_line(e).split(" Attempted")[0]) from None
        raise


def invoke(
    argv: list[str],
    extra_flags: Callable[[flags.FlagValues], None] | None = None,
    handler: Callable[[flags.FlagValues, list[str]], None] | None = None,
) -> int:
    """Run ``rdjax <argv>`` in this process; return the exit status. ``extra_flags`` and
    ``handler`` let `python -m rdjax.main` add its --mode flag to `train`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n" + "\n".join(f"  {n:8s} {c.summary}" for n, c in COMMANDS.items()))
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; {USAGE}", file=sys.stderr)
        return 1
    command = COMMANDS[name]
    if "--help" in args or "-h" in args:
        fv = flags.FlagValues()
        command.define(fv, [name])
        print(f"rdjax {name}: {command.summary}\n{fv.get_help()}")
        return 0
    if not flags.FLAGS.is_parsed():  # absl logging asks for it; rdjax keeps no global flags
        flags.FLAGS.mark_as_parsed()
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    start.quiet_libraries(not verbose)
    try:
        fv, positional = _parse(name, command, args, extra_flags)
        if positional and name != "port":
            raise ConfigError(f"unexpected arguments: {' '.join(positional)}")
        (handler or command.run)(fv, positional)
    except KeyboardInterrupt as e:  # Ctrl-C: where a rerun resumes (training), not a traceback
        print(str(e) if isinstance(e, Interrupted) else f"interrupted: rdjax {name} stopped", file=sys.stderr)
        return 130
    except (RdjaxError, OSError) as e:  # what a user can cause; anything else keeps its traceback
        if not isinstance(e, RdjaxError) and not e.filename:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """The console script."""
    sys.exit(invoke(sys.argv[1:]))
