# Sourced by demo.sh and test.sh (from the repository's root): `setup_venv EXTRAS` makes
# .venv, a virtual environment with rdjax installed in editable mode (so that
# `python -m rdjax.main` also runs from the repository's root, and edits take effect),
# with EXTRAS ('' for the runtime alone, 'dev' for the tests, which adds torch: 5.5 GB).
# It installs again only when pyproject.toml, a requirements file or this script changed
# since (the stamp .venv/.rdjax-setup records what was installed), so a rerun starts at once.

setup_venv() {
    local extras=$1 stamp=.venv/.rdjax-setup want have
    want=$(cat pyproject.toml requirements*.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
    have=$(cat "$stamp" 2>/dev/null || true)
    # The dev set-up holds the runtime's, so the demo reuses it.
    if [[ $have == "$extras $want" || $have == "dev $want" ]]; then
        return
    fi
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # No pip cache: it would hold a second copy of torch's 5.5 GB.
    .venv/bin/pip install -q --no-cache-dir -e ".${extras:+[$extras]}"
    if [[ $extras == dev ]]; then  # without its dependencies: docs/export.md says why
        .venv/bin/pip install -q --no-cache-dir --no-deps jax2onnx==0.17.1
    fi
    echo "$extras $want" >"$stamp"
}
