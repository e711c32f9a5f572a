#!/usr/bin/env bash
# Regenerates requirements/lock-py311-linux-cpu.txt from pyproject.toml (run after every change
# to the dependencies; Python 3.11 on Linux, CPU). Uses pinned pip-tools in a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q pip-tools==7.7.0
CUSTOM_COMPILE_COMMAND="bash tools/lock.sh" "$venv/bin/pip-compile" -q --extra test --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --upgrade \
  -o requirements/lock-py311-linux-cpu.txt pyproject.toml
