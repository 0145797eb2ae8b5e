"""Evaluators: what runs on an evaluation pass's maps and scores (config.evals), in
big_vision's shape. Each entry of config.evals names a type (a module here exporting
`EVALUATOR`, found by rdjax.registry), an optional cadence 'every' (epochs) and its own
settings; the instance gets an `EvalContext` and the results of the evaluators it names
in ``needs`` (read-only), and returns its own results. Nothing else is shared, so the
only order that matters is the one ``needs`` states, and the config check enforces it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rdjax.data.preprocess import Split
from rdjax.errors import ConfigError
from rdjax.scoring.passes import PassResult


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What every evaluator of one evaluation may read."""

    config: Any
    test: Split
    test_pass: PassResult  # the test split's scores and pixel statistics
    run_pass: Callable[[Split], PassResult]  # an evaluation pass over another split (all processes call it)
    predict: Callable[[Split, np.ndarray], np.ndarray]  # (split, a few rows) -> their maps, as the pass made them
    validation: Split | None  # held-out normal training images, if any
    out_dir: Path | None  # this evaluation's folder (eval/epoch_NNNN[/<category>]) on process 0, else None
    epoch: int = 0  # the epoch evaluated


class Evaluator(Protocol):
    needs: tuple[str, ...]  # names in config.evals whose results this one reads

    def __call__(self, context: EvalContext, needed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """This evaluator's entries for metrics.json ('warnings': a list of lines)."""
        ...


EvaluatorType = Callable[..., Evaluator]  # built from its settings in config.evals


CADENCE_KEYS = ("type", "every")  # the keys of a config.evals entry that are not settings


def type_of(name: str, setting: Any) -> str:
    """An entry's evaluator type: its 'type', else its name."""
    return setting.get("type", name)


def build(evals: Any, get: Callable[[str], EvaluatorType]) -> dict[str, Evaluator]:
    """config.evals -> instances, ordered so that each runs after the ones it ``needs``
    (ml_collections keeps keys sorted, so the written order cannot carry meaning); ``get``
    is the registry's lookup. Raises ConfigError on an unknown type or setting, a need
    that names no evaluator, a cycle of needs, or two evaluators of one type."""
    types_seen = [type_of(n, s) for n, s in evals.items()]
    twice = sorted({t for t in types_seen if types_seen.count(t) > 1})
    if twice:  # two of a type would set the same result keys and write the same files
        raise ConfigError(f"config.evals: more than one evaluator of type {twice[0]!r}")
    built: dict[str, Evaluator] = {}
    for name, setting in evals.items():
        settings = {k: v for k, v in dict(setting).items() if k not in CADENCE_KEYS}
        kind = get(type_of(name, setting))
        try:
            inspect.signature(kind).bind(**settings)
        except TypeError as e:
            raise ConfigError(f"config.evals.{name}: {e}") from None
        built[name] = kind(**settings)
        unknown = [n for n in built[name].needs if n not in evals or n == name]
        if unknown:
            raise ConfigError(f"config.evals.{name} needs {unknown[0]!r}, which is not another entry of config.evals")
    ordered: dict[str, Evaluator] = {}
    while len(ordered) < len(built):
        ready = [n for n, e in built.items() if n not in ordered and all(d in ordered for d in e.needs)]
        if not ready:
            raise ConfigError(f"config.evals: a cycle of needs among {sorted(set(built) - set(ordered))}")
        ordered.update((n, built[n]) for n in ready)
    return ordered


def due(evals: Any, built: Mapping[str, Evaluator], epoch: int, default_every: int, last: bool) -> list[str]:
    """The evaluators whose cadence ('every' epochs, 0 = default_every) falls on this
    epoch, with everything they need (all of them at the last epoch), in run order."""
    wanted = {n for n, s in evals.items() if last or epoch % (s.get("every", 0) or default_every) == 0}
    for name in reversed(list(built)):  # needs come earlier in the run order
        if name in wanted:
            wanted |= set(built[name].needs)
    return [n for n in built if n in wanted]


def run_all(evaluators: Mapping[str, Evaluator], context: EvalContext) -> dict[str, Any]:
    """Run each evaluator in the given (build) order; join their 'warnings', and refuse a
    key set twice."""
    results: dict[str, dict[str, Any]] = {}
    merged: dict[str, Any] = {}
    warnings: list[str] = []
    for name, evaluator in evaluators.items():
        missing = [n for n in evaluator.needs if n not in results]
        if missing:
            raise ConfigError(f"config.evals.{name} needs {missing[0]!r}, which did not run before it")
        needed = types.MappingProxyType({n: types.MappingProxyType(results[n]) for n in evaluator.needs})
        results[name] = out = evaluator(context, needed)
        warnings += out.get("warnings", [])
        clash = sorted((set(out) - {"warnings"}) & set(merged))
        if clash:
            raise ConfigError(f"config.evals.{name} sets {clash[0]!r}, which another evaluator set already")
        merged.update({k: v for k, v in out.items() if k != "warnings"})
    return {**merged, "warnings": warnings}
