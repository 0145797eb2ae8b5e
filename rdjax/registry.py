"""Name -> implementation registries, by convention (big_vision's habit): a model, a dataset
or an evaluator is chosen by a config string, and a new one is a new module, never a new
`if` in the training loop and never an edit here.

The convention: `MODELS.get("rd4ad")` imports `rdjax.models.rd4ad` and takes its `MODEL`;
datasets are `rdjax.data.<name>` with `DATASET`, evaluators `rdjax.evaluators.<name>` with
`EVALUATOR`. Plug-in modules never import this module, so the import graph stays one way
(tests/unit/test_imports.py counts an edge from here to every module of the three packages).
Code outside those packages (a user's plug-in, a test's toy model) calls `register`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from rdjax.config import MODEL_KEYS
from rdjax.errors import ConfigError

if TYPE_CHECKING:
    from rdjax.data import Dataset, DatasetBuilder
    from rdjax.evaluators import EvaluatorType
    from rdjax.models import Model, ModelType

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries found by module name in ``package`` (attribute ``attribute``) or registered
    explicitly; `get` fails with one line listing the known names."""

    def __init__(self, kind: str, package: str, attribute: str) -> None:
        self.kind = kind
        self.package = package
        self.attribute = attribute
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries or self._from_module(name) is not None:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _module_names(self) -> list[str]:
        folder = importlib.import_module(self.package).__path__
        return [m.name for m in pkgutil.iter_modules(folder)]

    def _from_module(self, name: str) -> T | None:
        if name not in self._module_names():
            return None
        return getattr(importlib.import_module(f"{self.package}.{name}"), self.attribute, None)

    def names(self) -> list[str]:
        found = [m for m in self._module_names() if self._from_module(m) is not None]
        return sorted({*found, *self._entries})

    def get(self, name: str) -> T:
        entry = self._entries.get(name) if name in self._entries else self._from_module(name)
        if entry is None:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return entry


MODELS: Registry[ModelType] = Registry("model", "rdjax.models", "MODEL")
DATASETS: Registry[DatasetBuilder] = Registry("dataset", "rdjax.data", "DATASET")
EVALUATORS: Registry[EvaluatorType] = Registry("evaluator", "rdjax.evaluators", "EVALUATOR")


def build_model(config: Any) -> Model:
    """The config's model, `MODEL(arch, dtype, **options)` with config.model's other keys
    as its options (the model checks them), and the image size checked."""
    model_type = MODELS.get(config.model.name)
    options = {k: v for k, v in config.model.items() if k not in MODEL_KEYS}
    params = inspect.signature(model_type).parameters
    taken = list(params)[2:]  # after arch and dtype
    unknown = [k for k in options if k not in taken]
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = f"its options: {', '.join(taken)}" if taken else "it has none"
        raise ConfigError(f"config.model.{unknown[0]}: not an option of model {config.model.name!r} ({known})")
    model = model_type(config.model.arch, config.dtype, **options)
    model.check_image_size(config.image_size)
    return model


def option_owners(option: str) -> list[str]:
    """The models (by name) that take ``option`` (a key of config.model), for the message
    that says where an option is set."""
    return [n for n in MODELS.names() if option in list(inspect.signature(MODELS.get(n)).parameters)[2:]]


def model_for_arch(arch: str) -> ModelType:
    """The model `rdjax port teacher --arch` converts a teacher with: the first by name whose
    `archs` (its teacher architectures) lists ``arch``."""
    known: set[str] = set()
    for name in MODELS.names():
        archs = getattr(MODELS.get(name), "archs", ())
        if arch in archs:
            return MODELS.get(name)
        known.update(archs)
    raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(known)}")


def build_dataset(dataset_config: Any) -> Dataset:
    """The dataset config.dataset names, resolved once (an archive extracted, synthetic
    data generated) so that listing and loading categories has no further side effects."""
    return DATASETS.get(dataset_config.name)(dataset_config)


METRICS_EVALUATOR = "anomaly"  # the type whose metrics every run reports


def check(config: Any) -> None:
    """Before any work: the plug-ins a config names exist, its model takes its image
    size, and config.evals builds (settings, needs) and includes the metrics."""
    from rdjax import evaluators

    build_model(config)
    try:
        DATASETS.get(config.dataset.name)
    except ConfigError as e:  # say which key to give: a workdir's config.json may name a dataset this install lacks
        raise ConfigError(f"{e}: pass it as --config.dataset.name=NAME") from None
    evaluators.build(config.evals, EVALUATORS.get)
    if not any(evaluators.type_of(n, s) == METRICS_EVALUATOR for n, s in config.evals.items()):
        raise ConfigError(f"config.evals has no {METRICS_EVALUATOR!r} evaluator: the metrics every run reports")
