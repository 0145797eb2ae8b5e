"""Shared test helpers: torch reference models with non-trivial BatchNorm statistics."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole run, shared with the CLI
# subprocesses the tests start (they inherit the environment): most of the suite's time
# is compiling the same small train and eval steps again in each fresh process. Set
# before anything imports jax, which reads it at import.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rdjax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch") if os.environ.get("RDJAX_ALLOW_NO_TORCH") else __import__("torch")


def cpu_devices_env(devices: int) -> dict:
    """The environment for a subprocess that sees ``devices`` CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def randomize_batchnorm(module: "torch.nn.Module", seed: int) -> None:
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


def state_dict_numpy(module: "torch.nn.Module") -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the tolerance measure the project reports."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))
