"""Sweeps as data: grids of gin bindings on top of named base gin files.

A point is a dict of gin bindings (`{"BETA": 0.1, "SEED": 0}`; keys are macros or
`configurable.parameter` selectors, values are Python literals). Grids are built with

- `sweep(key, values)`: one key over values;
- `product(*grids)`: every combination (the first grid varies slowest, as in `itertools.product`);
- `zip(*grids)`: the i-th points of equal-length grids merged;
- `seeds(n)`: `sweep("SEED", range(n))`;
- `gin_files(*alternatives)`: `sweep("GIN_FILE", alternatives)`, points that add gin files of
  their own after the base files (a config group in Hydra's terms): one sweep can then mix
  stages, e.g. PPO points and DPO points of one frontier.

and a `Sweep` names the base gin files, bindings shared by every point and the points. A spec
file is a small Python module that defines `SWEEP = Sweep(...)`:

    from rlhf_jax.sweep.spec import Sweep, product, seeds, sweep

    SWEEP = Sweep(
        gin_files=["gin/experiments/dpo_reviews_tiny.gin"],
        bindings={"SFT_RUN": "runs/sft", "PREFERENCES": "runs/prefs"},
        points=product(sweep("BETA", [0.05, 0.1, 0.5]), seeds(3)),
    )

Each point gets a run-directory name derived from its bindings alone (`point_name`): stable,
filesystem-safe and unique within the sweep.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.gin_utils import GinConfigError

Point = dict[str, Any]

# Keys a report treats as repetitions of one configuration rather than a setting of it.
SEED_KEYS = ("SEED",)
# The reserved point key whose value (a path, or a tuple of paths) adds gin files to the point's
# base files, after them; it is not a gin binding.
GIN_FILE_KEY = "GIN_FILE"

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:[./][A-Za-z_][A-Za-z0-9_]*)*$")
_CLEAN_VALUE_RE = re.compile(r"^[A-Za-z0-9.+-]+$")
_MAX_NAME = 120


class SweepError(GinConfigError):
    """A user error in a sweep (bad spec, grid or output folder): exit code 2 in the CLI."""


@dataclasses.dataclass(frozen=True)
class GinRef:
    """A value written verbatim into gin, e.g. `GinRef("@optax.adamw")` or `GinRef("%BETA")`."""

    text: str


def is_seed_key(key: str) -> bool:
    """Whether `key` sets a seed (seeds are repetitions; reports average over them)."""
    return key.split(".")[-1].split("/")[-1].upper() in SEED_KEYS or key.lower().endswith(".seed")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SweepError(
            f"bad sweep key {key!r}: expected a gin macro (BETA) or selector "
            "(LoopConfig.train_steps, scope/name.param)"
        )
    return key


def _check_gin_file(value: Any) -> tuple[str, ...]:
    files = (value,) if isinstance(value, str) else value
    if (
        not isinstance(files, (list, tuple))
        or not files
        or not all(isinstance(f, str) and f.strip() for f in files)
    ):
        raise SweepError(
            f"bad value {value!r} for {GIN_FILE_KEY}: a gin file's path, or a tuple of paths"
        )
    return tuple(files)


def gin_files_label(value: Any) -> str:
    """A GIN_FILE value as its files' stems, `ppo` or `dpo+long` (point names, report labels)."""
    return "+".join(Path(f).stem for f in _check_gin_file(value))


def point_gin_files(point: Mapping[str, Any]) -> tuple[str, ...]:
    """The gin files a point adds to the sweep's base files (its `GIN_FILE`), or ()."""
    return _check_gin_file(point[GIN_FILE_KEY]) if GIN_FILE_KEY in point else ()


def _check_value(key: str, value: Any) -> Any:
    if key == GIN_FILE_KEY:
        _check_gin_file(value)
        return value
    ok = (bool, int, float, str, type(None), GinRef)
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(key, v)
    elif not isinstance(value, ok):
        raise SweepError(
            f"bad value {value!r} for {key}: sweep values are numbers, strings, booleans, None, "
            "tuples/lists of those, or GinRef('@name')"
        )
    return value


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One key over `values`: `[{key: v} for v in values]`.

    Raises:
      SweepError: a bad key or value, or no values.
    """
    _check_key(key)
    points = [{key: _check_value(key, v)} for v in values]
    if not points:
        raise SweepError(f"sweep({key!r}, ...) has no values")
    return points


def seeds(n: int | Iterable[int], key: str = "SEED") -> list[Point]:
    """`sweep(key, range(n))` (or over the given seeds)."""
    return sweep(key, range(n) if isinstance(n, int) else n)


def gin_files(*alternatives: str | Sequence[str]) -> list[Point]:
    """Points over alternative gin files: `gin_files("ppo.gin", "dpo.gin")` is
    `[{"GIN_FILE": "ppo.gin"}, {"GIN_FILE": "dpo.gin"}]`; an alternative may be a tuple of files.
    Each point's files are parsed after the sweep's base files, before its bindings.
    """
    return sweep(GIN_FILE_KEY, [a if isinstance(a, str) else tuple(a) for a in alternatives])


def _merge(points: Sequence[Mapping[str, Any]]) -> Point:
    out: Point = {}
    for p in points:
        clash = set(out) & set(p)
        if clash:
            raise SweepError(f"key(s) {sorted(clash)} set by two grids that are combined")
        out.update(p)
    return out


def product(*grids: Sequence[Mapping[str, Any]]) -> list[Point]:
    """Every combination of the grids' points (the last grid varies fastest).

    Raises:
      SweepError: a key set by two grids, or an empty grid.
    """
    for g in grids:
        if not g:
            raise SweepError("product() of an empty grid")
    return [_merge(combo) for combo in itertools.product(*grids)]


def zip(*grids: Sequence[Mapping[str, Any]]) -> list[Point]:  # noqa: A001 (the sweep verb)
    """The i-th points of equal-length grids merged: `zip(sweep(A, [1, 2]), sweep(B, [3, 4]))`
    is `[{A: 1, B: 3}, {A: 2, B: 4}]`.

    Raises:
      SweepError: grids of different lengths, or a key set by two grids.
    """
    lengths = {len(g) for g in grids}
    if len(lengths) > 1:
        raise SweepError(f"zip() of grids of different lengths {[len(g) for g in grids]}")
    return [_merge(combo) for combo in builtins.zip(*grids, strict=True)]


def format_value(value: Any) -> str:
    """A gin literal for a sweep value (strings quoted; GinRef verbatim)."""
    if isinstance(value, GinRef):
        return value.text
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)


def binding_lines(point: Mapping[str, Any]) -> list[str]:
    """`KEY = VALUE` gin bindings of a point, in its key order (its GIN_FILE is not one)."""
    return [f"{k} = {format_value(v)}" for k, v in point.items() if k != GIN_FILE_KEY]


def _canonical(point: Mapping[str, Any]) -> str:
    return json.dumps({k: format_value(v) for k, v in sorted(point.items())}, sort_keys=True)


def _name_value(value: Any) -> tuple[str, bool]:
    """(readable text, whether it is lossless) of one value inside a point name."""
    if isinstance(value, str):
        text = value
        # A string that reads like a number or keyword would collide with that literal.
        lossless = bool(_CLEAN_VALUE_RE.match(text)) and not re.match(
            r"^[-+.0-9]|^(True|False|None)$", text
        )
    else:
        text = format_value(value)
        lossless = bool(_CLEAN_VALUE_RE.match(text))
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_", lossless


def point_name(point: Mapping[str, Any]) -> str:
    """A run-directory name from a point's bindings: `BETA=0.1,SEED=0`.

    Stable (a function of the bindings alone), filesystem-safe (letters, digits and `._=,+-`)
    and unique: when the readable form loses information (characters replaced, a string
    that reads like a number, a long name) a hash of the bindings is appended.
    """
    if not point:
        return "default"
    parts, lossless = [], True
    for k, v in point.items():
        if k == GIN_FILE_KEY:  # named by the files' stems: GIN_FILE=ppo
            v = gin_files_label(v)
        text, ok = _name_value(v)
        lossless &= ok and "/" not in k
        parts.append(f"{k.replace('/', '_')}={text}")
    name = ",".join(parts)
    if lossless and len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(_canonical(point).encode()).hexdigest()[:8]
    return f"{name[:_MAX_NAME]}~{digest}"


@dataclasses.dataclass
class Sweep:
    """A sweep: base gin files, bindings shared by every point, and the points.

    Attributes:
      gin_files: base gin files, in order (later ones win); may be empty when every point
        names its own (`GIN_FILE`).
      points: the grid (a list of binding dicts), e.g. from `product` / `zip` / `sweep` /
        `gin_files`.
      bindings: bindings every point gets (the points' own bindings win).
      name: a label for logs and reports (default: the spec file's name).
    """

    gin_files: Sequence[str]
    points: Sequence[Mapping[str, Any]]
    bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        if isinstance(self.gin_files, str):
            self.gin_files = [self.gin_files]
        self.gin_files = list(self.gin_files)
        self.points = [dict(p) for p in self.points]
        if not self.points:
            raise SweepError("the sweep's grid is empty")
        for p in [self.bindings, *self.points]:
            for k, v in p.items():
                _check_value(_check_key(k), v)
        self.bindings = dict(self.bindings)
        if GIN_FILE_KEY in self.bindings:
            raise SweepError(
                f"{GIN_FILE_KEY} is a point's own gin file: put shared files in gin_files"
            )
        if not self.gin_files and not all(GIN_FILE_KEY in p for p in self.points):
            raise SweepError(
                "a sweep needs at least one base gin file (or a GIN_FILE in every point)"
            )
        names = [point_name(p) for p in self.points]
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in seen:
                j = seen[n]
                if _canonical(self.points[j]) != _canonical(self.points[i]):
                    raise SweepError(
                        f"points {j} and {i} of the grid get the same run-directory name ({n}) "
                        f"although their gin files differ ({point_gin_files(self.points[j])} "
                        f"and {point_gin_files(self.points[i])}): give the files distinct names"
                    )
                raise SweepError(
                    f"points {j} and {i} of the grid are the same ({n}): a sweep runs "
                    "each configuration once (add seeds to repeat it)"
                )
            seen[n] = i
        if "RUN_DIR" in self.bindings or any("RUN_DIR" in p for p in self.points):
            raise SweepError("RUN_DIR is set by the sweep (OUT_DIR/<point name>): do not bind it")

    def files(self, point: Mapping[str, Any]) -> list[str]:
        """The gin files of `point`: the base files, then its own (`GIN_FILE`)."""
        return [*self.gin_files, *point_gin_files(point)]

    @property
    def names(self) -> list[str]:
        """Each point's run-directory name."""
        return [point_name(p) for p in self.points]

    def fingerprint(self) -> str:
        """A hash of what defines the sweep (files, shared bindings, points)."""
        blob = json.dumps(
            {
                "gin_files": self.gin_files,
                "bindings": _canonical(self.bindings),
                "points": [_canonical(p) for p in self.points],
            },
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()


def load_spec(path: str | Path) -> Sweep:
    """Imports a spec file and returns its `SWEEP` (a `Sweep`).

    Raises:
      SweepError: the file is missing, does not import, or defines no `SWEEP`.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec not found: {path}")
    mod_name = f"_rlhf_jax_sweep_spec_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    try:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    except SweepError as e:
        raise SweepError(f"in sweep spec {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 (any failure to import is the spec's fault)
        raise SweepError(
            f"sweep spec {path} does not import: {type(e).__name__}: {e}".rstrip()
        ) from None
    finally:
        sys.modules.pop(mod_name, None)
    sweep_obj = getattr(module, "SWEEP", None)
    if not isinstance(sweep_obj, Sweep):
        raise SweepError(
            f"sweep spec {path} must define SWEEP = rlhf_jax.sweep.spec.Sweep(...), "
            f"got {type(sweep_obj).__name__}"
        )
    if not sweep_obj.name:
        sweep_obj.name = path.stem
    return sweep_obj


def parse_grid_value(text: str) -> Any:
    """A command-line grid value as a Python literal (`0.1`, `'ipo'`, `(1, 2)`), or the bare
    text as a string (`ipo`)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.startswith(("@", "%")):
            return GinRef(text)
        return text


def grid_from_flags(grids: Sequence[str]) -> list[Point]:
    """The product of `--grid KEY=V1,V2` flags (values split on commas outside brackets).

    Raises:
      SweepError: a malformed flag or an empty list of values.
    """
    axes = []
    for g in grids:
        key, sep, values = g.partition("=")
        key = key.strip()
        if not sep:
            raise SweepError(f"bad --grid {g!r}: expected KEY=V1,V2,...")
        texts = [t.strip() for t in _split_top_level(values)]
        texts = [t for t in texts if t]
        if not texts:
            raise SweepError(f"--grid {g!r} has no values")
        axes.append(sweep(key, [parse_grid_value(t) for t in texts]))
    if not axes:
        raise SweepError("the grid is empty: give --grid KEY=V1,V2 (or a spec file)")
    return product(*axes)


def _split_top_level(text: str) -> list[str]:
    out, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out
