"""Name -> implementation registries (big_vision's habit): a model, a dataset or an
evaluator is chosen by a config string, and a new one is a new module that registers
itself, never a new `if` in the training loop."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from rdjax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries registered by name; `get` fails with one line listing the known names.

    ``modules`` are imported on first lookup, so that an entry can live in a module that
    imports this registry without the registry importing it back at import time."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def _load(self) -> None:
        for module in self._modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]


# The three registries. Each entry's module registers it on import; the strings below
# are the modules that hold entries (imported on the first lookup).
MODELS: Registry = Registry("model", ("rdjax.models.rd4ad", "rdjax.models.rdpp"))
DATASETS: Registry = Registry(
    "dataset", ("rdjax.data.mvtec", "rdjax.data.synthetic", "rdjax.data.layouts", "rdjax.data.novelty")
)
EVALUATORS: Registry = Registry("evaluator", ("rdjax.evaluators",))
