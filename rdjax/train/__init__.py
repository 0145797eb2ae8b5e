"""Training and evaluating a run: `from rdjax import train`, then
train.train_and_evaluate(config, workdir), train.evaluate(config, workdir) or
train.run(config, workdir, mode) over every category a config asks for.

The modules, by job: prepare (Run, setup and the checks of a run), loop (the Trainer,
the optimizer, the entry points), evaluating (the student evaluated during a run),
cache (the teacher's features of the training images), hooks (Writer, Profiler,
StopRequest), steps (the jitted train steps), teacher (the frozen teacher's weights),
log (the progress lines).
"""

from rdjax.train.loop import evaluate, optimizer, run, train_and_evaluate
from rdjax.train.prepare import Part, Run, setup

__all__ = ["Part", "Run", "evaluate", "optimizer", "run", "setup", "train_and_evaluate"]
