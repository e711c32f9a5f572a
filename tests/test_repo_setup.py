"""The set-up contract: CI runs exactly the README's test command, both README commands install
from the committed lock, and the lock pins every package to one version."""

import re

from conftest import REPO

LOCK = "requirements/lock-py311-linux-cpu.txt"


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text[text.index("## Set-up") : text.index("## The quickstart")]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_the_readme_test_command_verbatim():
    main, tests = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    m = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.M)
    assert m is not None, ".ci/run has no TEST_COMMAND line"
    assert m.group(1) == tests
    assert 'bash -c "$TEST_COMMAND"' in ci and "rm -rf .venv" in ci
    assert "--durations=15" in tests


def test_readme_commands_install_from_the_lock_in_a_fresh_venv():
    for cmd in _readme_commands():
        assert cmd.startswith("python3.11 -m venv .venv && . .venv/bin/activate && ")
        assert f"pip install -c {LOCK} -e " in cmd


def test_lock_pins_every_requirement_once():
    lines = (REPO / LOCK).read_text().splitlines()
    assert any("bash tools/lock.sh" in ln for ln in lines[:8]), "regeneration command missing"
    pins = [ln for ln in lines if ln and not ln.startswith((" ", "#"))]
    names = [p.split("==")[0].lower() for p in pins]
    assert all("==" in p for p in pins), [p for p in pins if "==" not in p]
    assert len(names) == len(set(names))
    for needed in ("jax", "jaxlib", "flax", "pytest", "torch", "transformers", "gin-config"):
        assert needed in names, needed
