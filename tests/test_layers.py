"""The package's layers: no import cycle, and no import that goes up the layer order.

Every module under rlhf_jax/ is parsed with `ast` (nothing is imported), so the test sees every
import, also those inside functions and `importlib.import_module("rlhf_jax....")` calls.
A package's `__init__.py` importing its own modules is no cycle unless one imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_jax"

# The layer order, lowest first: a module may import from its own layer and the layers below,
# never from a layer above. A unit is a top-level module or subpackage of rlhf_jax. Runtime
# layers (ops ... train) know nothing of gin parsing, the commands or the CLI.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "paths", "settings"),  # foundations, no project imports
    ("partitioning",),  # mesh, logical axes, global batches
    ("ops", "data"),  # array maths; datasets, tokenizers, tasks and their judges
    ("models", "losses"),  # NNX models; losses over log-probs and rewards
    ("steps", "generate"),  # pure jitted steps; the sampler
    ("rundir",),  # the run directory: model.json, loading a run's parameters, config.gin
    ("eval", "reward_scoring"),  # sampling-based evaluation; scoring with a reward model
    ("train",),  # the host loop, checkpoints, stages
    ("gin_utils",),  # gin parsing
    ("commands", "info"),  # the CLI's command functions and the configurables they parse
    ("quickstart",),
    ("sweep",),
    ("registry",),  # the CLI's commands by name
    ("cli",),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(target: str, modules: dict[str, Path]) -> str:
    """The module an imported name lives in (`rlhf_jax.data.tasks.judges`, not the package
    for `from rlhf_jax.data.tasks import judges`)."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs) for each rlhf_jax import in `path`, at module level or
    inside a function; `runs` is False for the type-only imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    type_only = {
        id(n)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for t in targets:
            if t == "rlhf_jax" or t.startswith("rlhf_jax."):
                out.append((_resolve(t, modules), node.lineno, id(node) not in type_only))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rlhf_jax"


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph `edges`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {"rlhf_jax"}
    missing = sorted(units - set(RANK))
    assert not missing, f"add {missing} to LAYERS in tests/test_layers.py"


def test_no_import_goes_up_the_layers():
    upward = []
    for module, imports in _graph().items():
        here = _unit(module)
        for target, line, _ in imports:
            there = _unit(target)
            if here in RANK and there in RANK and RANK[there] > RANK[here]:
                upward.append(f"{module}:{line} imports {target} ({here} is below {there})")
    assert not upward, "imports that go up the layer order:\n" + "\n".join(upward)


def test_no_cycle_between_units():
    """Between top-level modules and subpackages no import points back."""
    edges: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        for target, _, runs in imports:
            if runs and _unit(target) not in (_unit(module), "rlhf_jax"):
                edges.setdefault(_unit(module), set()).add(_unit(target))
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_no_cycle_between_modules():
    """No module imports one that imports it back, not even from inside a function (such a
    cycle only happens not to fail at import time). Type-only imports do not count."""
    edges = {
        module: {t for t, _, runs in imports if runs and t != module}
        for module, imports in _graph().items()
    }
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_the_cli_module_defines_nothing_that_could_exist_twice():
    """`python -m rlhf_jax.cli` runs cli.py as `__main__`; nothing imports `rlhf_jax.cli` (it is
    the top layer), and it defines no class and no gin configurable, so no exception class or
    configurable can exist twice (once per module name) and no workaround is needed."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    configurables = [
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and any("gin" in ast.unparse(d) for d in n.decorator_list)
    ]
    assert not classes and not configurables
    importers = [
        m for m, imports in _graph().items() if any(t == "rlhf_jax.cli" for t, _, _ in imports)
    ]
    assert importers == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_cycle_finder(edges, expected):
    assert _cycle(edges) == expected
