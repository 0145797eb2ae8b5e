#!/usr/bin/env bash
# The demo on a fresh machine (python3 with venv is all it needs): sets up .venv with rdjax
# (scripts/setup.sh), then trains and evaluates RD4AD on the built-in synthetic dataset
# into runs/demo (README, "The demo"). Arguments are passed on to `rdjax train` after the
# demo's own, so they override them: ./scripts/demo.sh --workdir=runs/other --config.num_epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
setup_venv ""
exec .venv/bin/rdjax train --config=synthetic --workdir=runs/demo "$@"
