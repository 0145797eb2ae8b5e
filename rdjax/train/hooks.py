"""What a training run does beside its steps: the files it writes (Writer), a profile of
a few steps (Profiler), and Ctrl-C handled where the state can still be saved
(StopRequest)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from rdjax.errors import TrainingError
from rdjax.outputs import files, tables
from rdjax.runtime import disk
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import metrics
from rdjax.scoring import thresholds as calibration_lib
from rdjax.train.log import log


class StopRequest:
    """Ctrl-C (SIGINT) while training. Inside `deferred` (the steps, a checkpoint's write)
    the first press only asks the loop to stop at the next step boundary, so the state is
    whole and can be saved; a second press stops at once. Elsewhere (evaluations, the
    feature cache) a press raises KeyboardInterrupt at once, and the state, which no step
    is using then, is saved by the loop. Installed only in the main thread of a
    single-process run: the processes of a pod must stop at the same step, which a signal
    to one of them cannot promise, so there a press stops as before (the latest
    checkpoint is where a rerun resumes)."""

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


class Writer:
    """Every file of a run's own (config, train log, metrics, TensorBoard): process 0
    writes, the others do not (the one place that policy lives; evaluators write into the
    folder only process 0 is given). Training calls `resume` once it knows where it
    starts: the train log keeps the epochs before, and TensorBoard opens; an evaluation
    alone never does. train_log.json is rewritten at each checkpoint."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.log_path = workdir, workdir / "train_log.json"
        self.primary = jax.process_index() == 0
        self.train_log: list[dict] = []
        self.board: Any = None

    def resume(self, start_epoch: int) -> None:
        if self.log_path.is_file():
            self.train_log = [e for e in disk.read_json(self.log_path) if e["epoch"] <= start_epoch]
        if self.primary:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(str(self.workdir / "tensorboard"))

    def config(self, config: Any) -> None:
        if self.primary:
            workdir_lib.save_config(self.workdir, config)

    def train(self, entry: dict) -> None:
        log("epoch %d: loss %.5f, %.1f img/s", entry["epoch"], entry["loss"], entry["images_per_second"])
        self.train_log.append(entry)
        if self.board is not None:
            self.board.add_scalar("train/loss", entry["loss"], entry["step"])
            self.board.add_scalar("train/images_per_second", entry["images_per_second"], entry["step"])

    def evaluation(self, result: dict) -> None:
        wrong = calibration_lib.problem(result["calibration"]) if "calibration" in result else None
        if wrong:  # the schema every reader checks (thresholds.read): never write what they refuse
            raise TrainingError(f"the evaluation at step {result['step']} fitted unusable thresholds ({wrong}); "
                                "calibration.json is left as it was")  # fmt: skip
        if self.primary:
            files.write_evaluation(self.workdir, result["epoch"], result)
        if self.board is not None:
            for key in metrics.TABLE_KEYS:
                if key in result:
                    self.board.add_scalar(f"eval/{key}", result[key], result["step"])
            self.board.flush()

    def checkpoint(self) -> None:
        if self.primary:
            disk.write_json(self.log_path, self.train_log)

    def summary(self, results: dict[str, dict], keys: tuple[str, ...]) -> None:
        """results.md over the categories of a run, with the mean row."""
        if self.primary:
            disk.write_text(self.workdir / "results.md", tables.summary_markdown(results, keys))

    def finish(self, config: Any) -> None:
        if self.primary and config.report_best_on_test:
            files.write_best_on_test(self.workdir)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class Profiler:
    """config.profile_steps > 0: a jax.profiler trace of that many steps from the run's
    second step (the first compiles), ending at the end of its epoch at the latest, so
    checkpoints and evaluations stay out of it; into workdir/profile (TensorBoard,
    Perfetto), with several processes each into its own profile/process_<i>."""

    def __init__(self, workdir: Path, steps: int) -> None:
        self.directory = workdir / "profile"
        if jax.process_count() > 1:
            self.directory = self.directory / f"process_{jax.process_index()}"
        self.steps, self.seen, self.active = steps, 0, False

    def step(self, state: Any) -> None:
        """After each step: the window opens once the first step is done (before the
        second runs) and closes after ``steps`` traced steps."""
        self.seen += 1
        if self.steps > 0 and self.seen == 1:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        elif self.active and self.seen == 1 + self.steps:
            self.stop(state)

    def stop(self, state: Any) -> None:
        """End the window once ``state`` (a live step's output) is computed."""
        if self.active:
            jax.block_until_ready(state)
            self.abandon()

    def abandon(self) -> None:
        """End an open trace without waiting on anything (after an error: the last state
        may have been donated to a step that failed)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
