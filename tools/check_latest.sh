#!/usr/bin/env bash
# Non-blocking check: install the newest versions pyproject.toml allows (not the lock) into a
# fresh venv and run the suite, so that the next upstream breakage is found by us first.
# Prints the versions it got; note the result in the README's Development section.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3.11 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade --upgrade-strategy eager -e '.[test]' || exit 1
pip list --format=freeze | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|pytest|transformers|torch|numpy|datasets|peft)=='
python -m pytest -n 2 -q --durations=15 -p no:cacheprovider
