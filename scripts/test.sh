#!/usr/bin/env bash
# The whole test suite on a fresh machine, exactly as CI runs it (.ci/run calls this):
# .venv with the dev extras (scripts/setup.sh), the system's chromium for the browser
# tests (installed with apt-get where missing: needs root or sudo), ruff, mypy, then both
# tiers (docs/testing.md). Arguments replace pytest's `tests`: ./scripts/test.sh -m "not slow" tests
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if ! command -v chromium >/dev/null; then
    sudo=$([[ $(id -u) == 0 ]] || echo sudo)
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
fi
# The environment takes about 7 GB (torch's CUDA build is 5.5 GB of it): say what is free
# first, so a full disk reads as such.
df -h . | tail -1
setup_venv dev
# Lint, format and types before the tests: each fails on its own.
.venv/bin/ruff check rdjax tests experiments configs
.venv/bin/ruff format --check rdjax tests experiments configs
.venv/bin/mypy  # rdjax/ and the toy model (pyproject.toml)
if (($#)); then targets=("$@"); else targets=(tests); fi
.venv/bin/python -m pytest -q -n 2 --dist loadfile "${targets[@]}"
