"""gin plumbing: parse files and bindings, validate macros, and register third-party builders
(optax) so gin files can name them.

This module knows gin, not the project: which modules register the configurables a gin file
may name is the caller's list (`commands.parse_gin` passes every command's), and writing the
operative config into a run directory is `rundir.write_config`.

Every gin problem the user can cause (unknown name, syntax error, missing file, a REQUIRED macro
left unset, a macro used but never defined) is raised as `GinConfigError` with one message that
names the file and line or the binding; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import tokenize
from collections.abc import Sequence
from pathlib import Path

import gin
from gin import config as gin_config

from rlhf_jax.errors import GinConfigError

# Repository root: gin files are looked up relative to the working directory first, then here,
# so `--gin_file gin/experiments/x.gin` works from anywhere inside an editable install.
REPO_ROOT = Path(__file__).resolve().parent.parent

CONVENTIONAL_MACROS = ("RUN_DIR", "TRAIN_STEPS", "SEED", "BATCH_SIZE")

_registered = False


def register_external() -> None:
    """Makes optax's optimisers and schedules nameable from gin (`@optax.adamw`, ...)."""
    global _registered
    if _registered:
        return
    import optax

    for name in ("adamw", "adam", "sgd", "lion", "adafactor"):
        gin.external_configurable(getattr(optax, name), module="optax")
    for name in (
        "constant_schedule",
        "warmup_cosine_decay_schedule",
        "linear_schedule",
        "warmup_constant_schedule",
    ):
        if hasattr(optax, name):
            gin.external_configurable(getattr(optax, name), module="optax")
    _registered = True


def import_modules(modules: Sequence[str]) -> None:
    """Imports `modules` (dotted names), registering their configurables, and optax's."""
    register_external()
    for mod in modules:
        importlib.import_module(mod)


def resolve_gin_file(path: str) -> str:
    """Finds a gin file as given, or relative to the repository root."""
    p = Path(path)
    if p.exists():
        return str(p)
    alt = REPO_ROOT / path
    if alt.exists():
        return str(alt)
    raise GinConfigError(f"gin file not found: {path}")


def _format_binding(b: str) -> str:
    return b if "=" in b else f"{b} (a binding needs KEY=VALUE)"


class _IncludeSearchNoise(logging.Filter):
    """Drops gin's log lines while it tries include paths relative to the working directory
    before the repository root ("Path not found: gin/..." at ERROR for a file it then finds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Path not found:") or msg.startswith("system_path_file_exists"))


def _parse_files(files: Sequence[str]) -> None:
    for f in files:
        try:
            gin.parse_config_file(f)
        except (SyntaxError, tokenize.TokenError) as e:
            line = getattr(e, "lineno", None)
            if isinstance(e, tokenize.TokenError) and len(e.args) > 1:
                line = e.args[1][0]
            raise GinConfigError(f"gin syntax error in {f}, line {line}: {e.args[0]}") from None
        except (ValueError, OSError, KeyError) as e:
            raise GinConfigError(f"in gin file {f}: {e}") from None


def parse(
    gin_files: Sequence[str],
    bindings: Sequence[str],
    *,
    configurables: Sequence[str] = (),
    allow_required: bool = False,
) -> None:
    """Parses files then bindings (later ones win) and validates macros.

    Args:
      gin_files: gin files, each as given or relative to the repository root.
      bindings: `KEY=VALUE` bindings (macros or `scope/fn.param`).
      configurables: modules to import first, so that the names the files use resolve.
      allow_required: accept `%gin.REQUIRED` macros left unset (a base or algorithm file on
        its own, which an experiment file or the command line completes).

    Raises:
      GinConfigError: with the file/line or binding at fault.
    """
    import_modules(configurables)
    files = [resolve_gin_file(f) for f in gin_files]
    for b in bindings:
        if "=" not in b:
            raise GinConfigError(f"bad binding {b!r}: expected KEY=VALUE")
    # Includes inside files are resolved relative to the repo root as well.
    gin.add_config_file_search_path(str(REPO_ROOT))
    noise = _IncludeSearchNoise()
    logging.getLogger().addFilter(noise)  # gin logs through the root logger
    try:
        _parse_files(files)
    finally:
        logging.getLogger().removeFilter(noise)
    file_macros = set(macros())
    for b in bindings:
        try:
            gin.parse_config(b)
        except (SyntaxError, tokenize.TokenError) as e:
            raise GinConfigError(f"gin syntax error in binding {b!r}: {e.args[0]}") from None
        except (ValueError, OSError, KeyError) as e:
            msg = str(e).split("\n")[0]
            raise GinConfigError(f"bad binding {b!r}: {msg}") from None
    validate_macros(allow_required=allow_required)
    check_macro_bindings(bindings, file_macros)


def _macro_refs(value, out: set[str]) -> None:
    if isinstance(value, gin_config.ConfigurableReference):
        sel = value.scoped_selector
        if sel.endswith("/gin.macro"):
            out.add(sel[: -len("/gin.macro")])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _macro_refs(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _macro_refs(v, out)


def macros() -> dict[str, object]:
    """The macros currently defined (name -> parsed value)."""
    return {
        scope: b["value"]
        for (scope, sel), b in gin_config._CONFIG.items()
        if sel == "gin.macro" and "value" in b
    }


def used_macros() -> set[str]:
    """The macros some parsed binding references (`%NAME`)."""
    used: set[str] = set()
    for (_scope, _sel), params in gin_config._CONFIG.items():
        for v in params.values():
            _macro_refs(v, used)
    return used


def unused_macros() -> dict[str, str | None]:
    """The macros defined but referenced by no parsed binding, each with the closest macro in
    use (a likely misspelling of it) or None. Base files define macros for the files that
    include them, so only a file that completes a configuration (an experiment) should have
    none."""
    import difflib

    used = used_macros()
    return {
        name: next(iter(difflib.get_close_matches(name, sorted(used), n=1, cutoff=0.5)), None)
        for name in sorted(set(macros()) - used)
    }


def check_macro_bindings(bindings: Sequence[str], file_macros: set[str] = frozenset()) -> None:
    """Fails on a command-line macro (`NAME=VALUE`) that no gin file defines and nothing
    references: a misspelt macro would otherwise be ignored silently and the run would use the
    default.

    Raises:
      GinConfigError: naming the macro and the closest known one.
    """
    import difflib

    used = used_macros()
    for b in bindings:
        name = b.partition("=")[0].strip()
        if not name.isidentifier() or name in used or name in file_macros:
            continue  # a parameter binding (scope/fn.param), or a macro the files know
        known = sorted((used | set(macros())) - {name})
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = (
            f"did you mean {close[0]}?"
            if close
            else f"macros in use: {', '.join(sorted(used)) or 'none'}"
        )
        raise GinConfigError(
            f"macro {name} (binding {b!r}) is not used by any gin file of this command; {hint}"
        )


def validate_macros(allow_required: bool = False) -> None:
    """Fails on macros that are used but undefined, or (unless `allow_required`) still
    `%gin.REQUIRED`."""
    defined = macros()
    used = used_macros()
    missing = sorted(used - set(defined))
    if missing:
        raise GinConfigError(
            f"macro(s) used but never defined: {', '.join(missing)} "
            f"(set with --gin.{missing[0]}=...)"
        )
    required = sorted(
        n
        for n, v in defined.items()
        if isinstance(v, gin_config.ConfigurableReference)
        and v.scoped_selector == "gin.REQUIRED/gin.constant"
    )
    if required and not allow_required:
        hint = " ".join(f"--gin.{n}=..." for n in required)
        raise GinConfigError(f"REQUIRED macro(s) not set: {', '.join(required)} ({hint})")


def macro_value(name: str, default=None):
    """Value of a macro after parsing (or `default`)."""
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return default
