"""Shared test helpers: one synthetic-data fixture, an in-process CLI runner, torch
reference helpers, and the suite's compilation cache.

Tiers: tests marked `slow` start subprocesses (CLIs as a user runs them, several
processes, kill and resume, device-count invariance); the rest run in-process. CI runs
both; `pytest -m "not slow"` is the fast tier.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole run, shared with the CLI
# subprocesses the tests start (they inherit the environment): most of the suite's time
# is compiling the same small programs again in each process. Every compilation is kept,
# not only those over a second: a CLI run is mostly many small ones (flax's eager init
# among them), and keeping them all halves a repeated run. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rdjax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import torch  # noqa: E402  (after the cache variable)

ROOT = Path(__file__).resolve().parents[1]
# The torch references (tests/reference/) and the helpers (tests/helpers/) import by
# module name from any test folder.
sys.path[:0] = [str(ROOT / "tests" / "reference"), str(ROOT / "tests" / "helpers")]


# ----------------------------------------------------------------------------- synthetic data


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """synthetic_data(**generate_kwargs) -> a generated root, made once per set of
    arguments in this test process; its TFDS cache is root/_tfds."""
    from rdjax.data import synthetic

    made: dict[tuple, Path] = {}

    def make(
        categories: tuple[str, ...] = ("disk",),
        size: int = 64,
        num_train: int = 16,
        num_test_good: int = 4,
        num_per_defect: int = 3,
    ) -> Path:
        key = (categories, size, num_train, num_test_good, num_per_defect)
        if key not in made:
            made[key] = synthetic.generate(
                tmp_path_factory.mktemp("synthetic"),
                categories=categories,
                size=size,
                num_train=num_train,
                num_test_good=num_test_good,
                num_per_defect=num_per_defect,
            )
        return made[key]

    return make


# The tests' small runs (16 training images) keep every image for training and fit the
# thresholds on the test set, the papers' protocol; tests of the default calibration
# (held-out images) override these.
PAPER_PROTOCOL = {"threshold.method": "f1", "threshold.validation_size": 0}


def small_config(root: Path, category: str = "disk", **overrides):
    """The demo config on a generated root: ResNet-18, random teacher, 64 px, 1 epoch,
    PAPER_PROTOCOL. ``overrides`` use dotted keys, as on the command line:
    small_config(r, **{"threshold.method": "quantile"})."""
    from rdjax.configs import synthetic

    config = synthetic.get_config()
    config.dataset.root = str(root)
    config.dataset.data_dir = str(root / "_tfds")
    config.dataset.category = category
    config.image_size = 64
    config.num_epochs = 1
    for key, value in {**PAPER_PROTOCOL, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def data_flags(root: Path, category: str = "disk") -> list[str]:
    """Command-line flags equal to small_config(root, category)."""
    return [
        "--config=synthetic",
        f"--config.dataset.root={root}",
        f"--config.dataset.data_dir={root / '_tfds'}",
        f"--config.dataset.category={category}",
        "--config.image_size=64",
        "--config.num_epochs=1",
        *(f"--config.{key}={value}" for key, value in PAPER_PROTOCOL.items()),
    ]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by playwright (the pages of test_webpage and test_serve)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "the browser tests need chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


# ----------------------------------------------------------------------------- running the CLI


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The one `error: ...` line a failing command prints (asserts there is exactly one)."""
        errors = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert self.code == 1 and len(errors) == 1, (self.code, self.stderr[-3000:])
        return errors[0]


def rdjax_cli(*argv: str) -> Result:
    """`rdjax <argv>` in this process (rdjax.cli.invoke), capturing stdout and stderr."""
    from rdjax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.invoke(list(argv))
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_run(*argv: str, devices: int | None = None, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """A command in a fresh process (``devices``: that many CPU devices)."""
    env = dict(os.environ)
    if devices is not None:
        env.update(cpu_devices_env(devices))
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, env=env, **kwargs)


def cpu_devices_env(devices: int) -> dict:
    """The environment for a subprocess that sees ``devices`` CPU devices."""
    env = dict(os.environ)
    # Appended to the caller's XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2, docs/testing.md).
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


# ----------------------------------------------------------------------------- torch references


def randomize_batchnorm(module: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm random affine parameters and running statistics, so that
    a port that confuses or drops them cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def random_variables(model, image_size: int, seed: int, dtype=np.float64):
    """(teacher_vars, student_vars) of ``model``'s shapes filled by numpy: kernels
    N(0, 1/fan_in), BatchNorm scales and variances in [0.5, 1.5], biases and means
    N(0, 0.1). For probes that need some weights, not the initializers': the shapes come
    from jax.eval_shape, so nothing is compiled (flax's eager init compiles each of its
    few hundred ops one by one)."""
    import jax

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0, 0.1, leaf.shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        return value.astype(dtype)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image_size))
    return tuple(jax.tree_util.tree_map_with_path(fill, tree) for tree in shapes)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the tolerance measure the project reports."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def port64(port, flat: dict[str, np.ndarray]) -> dict:
    """A float64 tree through a port (which stores float32): as float32 high and low parts."""
    import jax

    high = {k: v.astype(np.float32) for k, v in flat.items()}
    low = {k: (v - high[k]).astype(np.float32) for k, v in flat.items()}
    return jax.tree.map(lambda h, lo: h.astype(np.float64) + lo, port(high), port(low))


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def restore_state(workdir: Path, arch: str = "resnet18", name: str = "rd4ad"):
    """(train state, latest step) of a workdir, with the optimizer state (the model's
    optimizer at the default config)."""
    import jax

    from rdjax import config as config_lib
    from rdjax.registry import MODELS
    from rdjax.runtime import state as state_lib
    from rdjax.runtime import workdir as workdir_lib

    model = MODELS.get(name)(arch)
    student = model.abstract_variables()[1]
    tx = model.optimizer(config_lib.defaults())
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology saved it
    template = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
        jax.eval_shape(lambda: state_lib.create_train_state(student, tx)),
    )
    with workdir_lib.checkpoint_manager(workdir, create=False) as manager:
        return workdir_lib.restore_state(manager, template), manager.latest_step()


def _shared_run(tmp_path_factory, worker_id, name: str, **overrides):
    """(config, workdir, result) of the demo config trained 3 epochs on a small 'disk'
    category (16 images, batch 6: 3 steps an epoch, the last a partial batch of 4 rows,
    9 steps), in-process, made once for the whole run and
    shared by the pytest-xdist workers (a file lock; the first one trains). Tests must
    not change the workdir (copy it first)."""
    import json

    from filelock import FileLock

    from rdjax import train
    from rdjax.data import synthetic
    from rdjax.runtime import disk

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base
    root = shared / "trained_data"
    workdir = shared / f"{name}_workdir"
    config = small_config(root, num_epochs=3, eval_every=2, batch_size=6, **overrides)
    with FileLock(str(shared / "trained.lock")):
        if not (workdir / "result.json").is_file():
            synthetic.generate(root, categories=("disk",), size=64, num_train=16, num_test_good=4, num_per_defect=3)
            result = train.train_and_evaluate(config, workdir / "w")
            disk.write_json(workdir / "result.json", result)
    return config, workdir / "w", json.loads((workdir / "result.json").read_text())


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id):
    """The shared run with the default feature cache ('auto': memory at this size)."""
    return _shared_run(tmp_path_factory, worker_id, "trained")


@pytest.fixture(scope="session")
def trained_off(tmp_path_factory, worker_id):
    """The same run with config.feature_cache='off' (the teacher in every step)."""
    return _shared_run(tmp_path_factory, worker_id, "trained_off", feature_cache="off")


def pair_auroc(labels, scores) -> float:
    """AUROC by counting pairs, the definition itself: the share of (anomalous, normal)
    pairs the score orders correctly, a tie counting one half. O(P x N): small inputs only."""
    labels, scores = np.asarray(labels).ravel() != 0, np.asarray(scores, np.float64).ravel()
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def scores_csv_auroc_range(path: Path) -> tuple[float, float]:
    """The AUROC an evaluation's scores.csv allows: its scores have six decimals, so a
    pair within 1e-6 may be ordered either way by the unrounded scores (counted 0 for the
    low end, 1 for the high end); every other pair is counted as pair_auroc does."""
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows]) != 0
    scores = np.array([float(r["score"]) for r in rows])
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    close = np.abs(pos - neg) <= 1e-6 + 1e-12
    sure = (pos > neg) & ~close
    return float(np.mean(sure)), float(np.mean(sure | close))


# A recomputation of maps by another program (another batch size, the predict path)
# differs from the evaluation's only by float32 summation order. Each feature vector then
# differs by at most 1e-4 relative (the whole-network float32 bound of docs/exactness.md,
# on any CPU); a cosine of vectors each moved by a relative d moves by at most 2d, so each
# scale's 1 - cos by 2e-4, and the map, a sum of three such scales through upsampling
# and blur (averages, which cannot enlarge it), by at most 6e-4: an absolute bound in
# map units, whatever the map's size.
RECOMPUTED = 6e-4


def auroc_bounds(labels, scores, tol: float) -> tuple[float, float]:
    """The AUROCs that scores within ``tol`` (absolute) of ``scores`` can give: a pair
    whose scores lie within 2 * tol may be ordered either way. Exact at tol=0 (pair
    counting, ties one half); O((P + N) log N), so it serves pixels too."""
    labels = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores, np.float64).ravel()
    pos, neg = scores[labels], np.sort(scores[~labels])
    pairs = len(pos) * len(neg)
    below = np.searchsorted(neg, pos - 2 * tol, side="left").sum()  # surely ordered right
    within = np.searchsorted(neg, pos + 2 * tol, side="right").sum() - below
    if tol == 0:
        return (below + within / 2) / pairs, (below + within / 2) / pairs
    return below / pairs, (below + within) / pairs


def assert_auroc_within(value: float, labels, scores, tol: float = RECOMPUTED) -> None:
    """``value`` is an AUROC that scores within ``tol`` (absolute) of ``scores`` allow,
    plus 1e-12 for the division."""
    lo, hi = auroc_bounds(labels, scores, tol)
    assert lo - 1e-12 <= value <= hi + 1e-12, (value, lo, hi)
