"""What a process sets up before a command runs: JAX's multi-controller runtime
(`rdjax train --distributed`) and the log filter that keeps other libraries' chatter out
of a command's output (--verbose lets it through)."""

from __future__ import annotations

import logging as std_logging
from pathlib import Path

from absl import logging


def initialize_distributed(
    distributed: bool, coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """JAX's multi-controller runtime: one process per host, all running this same command.
    Started where --distributed or --coordinator_address asks for it; the other settings
    are found by jax on TPU pods and SLURM."""
    import jax

    if not (distributed or coordinator_address is not None):
        return
    # Collectives between CPU processes (CPU-only clusters, the tests); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


class _OwnWarnings(std_logging.Filter):
    """Lets through rdjax's own log records and every error; drops the other libraries'
    INFO and WARNING lines that absl carries (TFDS's "Using custom data configuration",
    orbax's waits), which say nothing a user can act on."""

    quiet = True
    package = str(Path(__file__).parents[1])  # the rdjax package's folder

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
