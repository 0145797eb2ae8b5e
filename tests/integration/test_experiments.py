"""The scripts in experiments/ keep up with the package: each imports, and the benchmark
that performance.py runs measures a tiny setting end to end (its figures are the
benchmark's business; here only that it runs and reports positive rates)."""

from __future__ import annotations

import importlib
import math
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))


@pytest.fixture(autouse=True)
def experiments_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # as when run as scripts


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_imports(name):
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None)), f"experiments/{name}.py has no main()"
    sys.modules.pop(name, None)


@pytest.mark.slow  # 38 s of compiling the benchmark's programs: the fast tier's budget is 3 minutes
def test_the_benchmark_measures_a_tiny_setting():
    benchmark = importlib.import_module("benchmark")
    for row in (
        benchmark.measure("resnet18", 32, 2, 1, "float32"),
        benchmark.measure("vit_tiny14_reg4", 28, 2, 1, "float32", "dinomaly"),
    ):
        for key in ("train_img_s", "train_teacher_img_s", "eval_img_s", "peak_mem_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
