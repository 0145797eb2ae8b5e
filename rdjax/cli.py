"""The `rdjax` command: `rdjax train|eval|predict|export|port [--flag=value ...]`.

One style for every subcommand: absl flags (`--name=value`), and for train and eval an
ml_collections config, named (`--config=mvtec`, shipped with the package) or by path
(`--config=configs/mvtec.py`), with `--config.key=value` overrides. Every error a user
can cause is one line, `error: ...`, on stderr with exit status 1, and nothing is
written before it. `run(argv)` is the same command in-process (tests use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from rdjax import config as config_lib
from rdjax import modes
from rdjax.errors import ConfigError, Interrupted, RdjaxError, one_line

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
        default_compilation_cache(),
        "Persistent XLA compilation cache folder, at most 2 GiB ('' turns it off); default: "
        "$RDJAX_XLA_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/rdjax/xla.",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


XLA_CACHE_MAX_BYTES = 2 * 2**30  # the oldest programs are deleted beyond this, at each start


def default_compilation_cache() -> str:
    """$RDJAX_XLA_CACHE (''/'0' turns it off), else $JAX_COMPILATION_CACHE_DIR, else
    the user's cache folder (~/.cache/rdjax/xla)."""
    if "RDJAX_XLA_CACHE" in os.environ:
        value = os.environ["RDJAX_XLA_CACHE"]
        return "" if value in ("", "0") else value
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdjax" / "xla")


def prune_cache(directory: Path, max_bytes: int) -> None:
    """Delete the least recently used files until the folder holds at most ``max_bytes``.
    Done once at start rather than by jax's own LRU mode, whose bookkeeping files race
    when several processes (hosts, parallel runs) share one cache; a file another process
    deleted first is simply skipped."""
    entries = []
    for path in directory.glob("*"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            entries.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:  # another process deleted it first
            pass
        except OSError:  # it stays, and counts
            continue
        total -= size


def use_compilation_cache(directory: str) -> None:
    """Keep compiled programs on disk, at most XLA_CACHE_MAX_BYTES: a repeated run, and
    each category of category='all' after the first, skips compiling the same steps
    again. Programs are keyed by their HLO, jax version and devices, so a stale entry is
    never used."""
    import jax

    if not directory:  # jax itself reads JAX_COMPILATION_CACHE_DIR: switch it off explicitly
        jax.config.update("jax_enable_compilation_cache", False)
        return
    folder = Path(directory).expanduser()
    if folder.is_dir():
        prune_cache(folder, XLA_CACHE_MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def initialize_distributed(fv: flags.FlagValues) -> None:
    """JAX's multi-controller runtime: one process per host, all running this same command."""
    import jax

    if not (fv.distributed or fv.coordinator_address is not None):
        return
    # Collectives between CPU processes (CPU-only clusters, the tests); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=fv.coordinator_address, num_processes=fv.num_processes, process_id=fv.process_id
    )


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
    use_compilation_cache(fv.compilation_cache)
    initialize_distributed(fv)
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


# ----------------------------------------------------------------------------- predict / export / port


def define_category_flag(fv: flags.FlagValues) -> None:
    """--category, for predict, export and package (serve defines its own)."""
    flags.DEFINE_string("category", None, modes.CATEGORY_HELP, flag_values=fv)


def define_predict_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir, or a package.", flag_values=fv)
    flags.DEFINE_string("input", None, "A folder (searched recursively) or a glob of image files.", flag_values=fv)
    flags.DEFINE_string("output", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("dtype", None, "Compute dtype (float32 or bfloat16); default: the workdir's.", flag_values=fv)
    flags.DEFINE_enum(
        "resize",
        None,
        modes.values(modes.ResizeMode),
        "squeeze: the whole image to image_size; "
        "fit, tile: blended windows without distortion (docs/usage.md). Default: the workdir's "
        "config.resize, which its thresholds were calibrated with.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "tile_size",
        None,
        "resize=tile: native pixels per window (default: the workdir's, else image_size).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "tile_overlap",
        None,
        "resize=fit or tile: native pixels shared by neighbouring windows (default: the workdir's).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "format",
        "rdjax",
        ["rdjax", "mvtec_ad_2"],
        "rdjax: overlays, masks, scores.csv, report.html; mvtec_ad_2: --input is an MVTec AD 2 "
        "category folder, its private test sets' maps in the evaluation server's layout (docs/datasets.md).",
        flag_values=fv,
    )
    define_category_flag(fv)
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace what an earlier predict wrote into --output (else it must be empty).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir", "input", "output"], flag_values=fv)


def define_export_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir, or a package.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output file for the serialized function (its folder must exist).", flag_values=fv)
    flags.DEFINE_string(
        "format", "jax", "jax (jax.export for cpu, cuda and tpu) or onnx (onnxruntime, OpenVINO).", flag_values=fv
    )
    flags.DEFINE_string(
        "weights_dtype",
        "float32",
        "Stored weights: float32, float16 or bfloat16 (computed in float32 either way).",
        flag_values=fv,
    )
    define_category_flag(fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def define_port_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string(
        "arch",
        None,
        "Backbone: resnet18, resnet34, resnet50, wide_resnet50_2, wide_resnet101_2; Dinomaly: dinov2_vitb14_reg4, ...",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "src",
        None,
        "teacher: a .pth/.pt/.safetensors/.npz file or 'imagenet'; a model (rd4ad, rdpp): its official checkpoint.",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "Output directory (must not exist).", flag_values=fv)
    flags.DEFINE_string(
        "teacher", None, "A model's teacher: a weights file, 'imagenet' or an rdjax teacher directory.", flag_values=fv
    )
    flags.DEFINE_integer(
        "image_size", 0, "Image size recorded in a ported workdir's config (0: the official config's).", flag_values=fv
    )
    flags.DEFINE_string(
        "dataset",
        "mvtec",
        "The dataset recorded in a ported workdir's config, which `rdjax eval` reads by default "
        "(mvtec: any folder in MVTec AD's layout).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["arch", "src", "out"], flag_values=fv)


def define_package_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "A trained (or ported) rdjax workdir.", flag_values=fv)
    flags.DEFINE_string("out", None, "The package folder to write (must not exist).", flag_values=fv)
    flags.DEFINE_string(
        "weights_dtype", "float32", "The student's stored weights: float32 (exact) or bfloat16 (half).", flag_values=fv
    )
    define_category_flag(fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def _package(fv: flags.FlagValues, args: list[str]) -> None:
    from rdjax.deploy import package

    package.package_workdir(fv.workdir, Path(fv.out), fv.weights_dtype, fv.category)


def _serve_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    from rdjax.serve import app as serve

    serve.define_flags(fv, argv)


def _serve(fv: flags.FlagValues, args: list[str]) -> None:
    from rdjax.serve import app as serve

    serve.main(fv, args)


def _predict(fv: flags.FlagValues, args: list[str]) -> None:
    from rdjax.deploy import predict

    run = predict.predict_mvtec_ad2 if fv.format == "mvtec_ad_2" else predict.predict_folder
    run(fv.workdir, fv.input, Path(fv.output), fv.batch_size, fv.dtype, fv.resize, fv.tile_size, fv.tile_overlap,
        category=fv.category, overwrite=fv.overwrite)  # fmt: skip


def _export(fv: flags.FlagValues, args: list[str]) -> None:
    from rdjax.deploy import export

    export.export_workdir(fv.workdir, Path(fv.out), fv.format, fv.weights_dtype, fv.category)


def _port(fv: flags.FlagValues, args: list[str]) -> None:
    from rdjax.deploy import port

    if len(args) != 1:
        raise ConfigError(
            "rdjax port needs what to port: 'teacher' or a model name (rd4ad, rdpp, dinomaly), e.g. "
            "rdjax port rd4ad --arch=wide_resnet50_2 --teacher=imagenet --src=CKPT --out=WORKDIR"
        )
    port.port(args[0], fv.arch, fv.src, Path(fv.out), fv.teacher, fv.image_size, fv.dataset)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train and evaluate (resumes from the workdir)", define_run_flags, lambda fv, _: run_training(fv, "train")
    ),
    "eval": Command("evaluate a workdir's latest checkpoint", define_run_flags, lambda fv, _: run_training(fv, "eval")),
    "predict": Command("score image files with a trained workdir", define_predict_flags, _predict),
    "export": Command("serialize the inference function (jax.export or ONNX)", define_export_flags, _export),
    "package": Command(
        "pack a workdir for deployment: config, teacher, student, calibration, contract", define_package_flags, _package
    ),
    "serve": Command("serve a model over HTTP: POST /predict, GET /health, a page at /", _serve_flags, _serve),
    "port": Command(
        "import PyTorch weights: 'teacher', or an official model checkpoint ('rd4ad', 'rdpp')", define_port_flags, _port
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
            raise ConfigError(
                f"unknown config key {key[len('config.') :]!r} (--{key}); docs/config.md lists them"
            ) from None
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
            raise ConfigError(f"unknown config key {key!r}. {hint.rstrip(chr(39))}".strip()) from None
        if isinstance(e, (flags.Error, TypeError, ValueError)):
            raise ConfigError(one_line(e)) from None
        if isinstance(e, OSError):  # a config file that fails to load
            raise ConfigError(one_line(e).split(" Attempted")[0]) from None
        raise


class _OwnWarnings(std_logging.Filter):
    """Lets through rdjax's own log records and every error; drops the other libraries'
    INFO and WARNING lines that absl carries (TFDS's "Using custom data configuration",
    orbax's waits), which say nothing a user can act on."""

    quiet = True
    package = str(Path(__file__).parent)

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not self.quiet or record.levelno >= std_logging.ERROR or record.pathname.startswith(self.package)


_FILTER = _OwnWarnings()
NOISY = ("jax", "orbax", "tensorflow_datasets", "etils", "grain")  # loggers of their own, besides absl's


def quiet_libraries(quiet: bool) -> None:
    """Third-party log noise off (default) or on (--verbose); rdjax's warnings always show."""
    logging.set_verbosity(logging.WARNING if quiet else logging.INFO)
    _FILTER.quiet = quiet
    absl_logger = std_logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    for name in NOISY:
        std_logging.getLogger(name).setLevel(std_logging.ERROR if quiet else std_logging.NOTSET)


def run(
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
    quiet_libraries(not verbose)
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
    sys.exit(run(sys.argv[1:]))
