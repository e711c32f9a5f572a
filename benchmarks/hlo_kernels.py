"""Kernels per loop iteration, read from a compiled program's HLO text.

On GPU every fusion, library call (cuBLAS/cuDNN custom-call) and leftover elementwise op of
the optimised HLO is one kernel launch, so the instruction count of a `while` body is the
number of kernels one decode step launches. A memory-bound step that launches hundreds of small
kernels pays their fixed cost (launch, ramp-up, tail) many times per token; this count says how
many.

Usage:
  python benchmarks/hlo_kernels.py program.hlo.txt      # a table per while loop
  from hlo_kernels import loop_kernel_counts            # from a `compiled.as_text()` string
"""

from __future__ import annotations

import collections
import re
import sys

# Instructions that launch nothing: structure, aliasing and metadata.
NO_LAUNCH = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "iota",  # folded into consumers on GPU when it survives as an operand
}
CONTROL = {"while", "conditional", "call", "async-start"}

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w.\-\]])([a-z][a-z0-9\-]*)\(")
_CALL_KEYS = (
    "body|to_apply|calls|branch_computations|true_computation|false_computation|called_computations"
)
_CALLED_LIST = re.compile(rf"\b(?:{_CALL_KEYS})=\{{([^}}]*)\}}")
_CALLED_ONE = re.compile(rf"\b(?:{_CALL_KEYS})=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def parse_computations(hlo_text: str) -> dict[str, list[tuple[str, str, str]]]:
    """{computation: [(instruction, opcode, rest of line)]} for every computation in the text."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            if current is not None:
                comps[current] = []
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        rhs = m.group(2)
        op = _OPCODE.search(rhs)
        if op:
            comps[current].append((m.group(1), op.group(1), rhs))
    return comps


def _called(rhs: str) -> list[str]:
    names = []
    for m in _CALLED_LIST.finditer(rhs):
        names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
    names += [m.group(1) for m in _CALLED_ONE.finditer(rhs)]
    return names


def _kernels(comps, name: str, seen: frozenset = frozenset()) -> collections.Counter:
    """Launching instructions of `name`, descending into calls and conditionals (the branch
    with the most kernels: one branch runs) but not into nested loops."""
    counts: collections.Counter = collections.Counter()
    for _, op, rhs in comps.get(name, []):
        # An async pair (copy-start/-done, all-reduce-start/-done, ...) is one piece of work,
        # counted at its start.
        if op in NO_LAUNCH or op == "while" or op.endswith(("-done", "-update")):
            continue
        if op in CONTROL:
            callees = [c for c in dict.fromkeys(_called(rhs)) if c in comps and c not in seen]
            parts = [_kernels(comps, c, seen | {name}) for c in callees]
            if op == "conditional":
                parts = [max(parts, key=lambda c: sum(c.values()))] if parts else []
            for part in parts:
                counts += part
            continue
        key = op
        if op == "custom-call":
            t = _TARGET.search(rhs)
            key = f"custom-call:{t.group(1) if t else '?'}"
        counts[key] += 1
    return counts


def _nested_loops(comps, name: str, seen: frozenset = frozenset()) -> list[str]:
    """Bodies of the `while` loops reached from `name` without entering another loop."""
    bodies = []
    for _, op, rhs in comps.get(name, []):
        if op == "while":
            m = re.search(r"body=%?([\w.\-]+)", rhs)
            if m:
                bodies.append(m.group(1))
        elif op in CONTROL:
            for callee in dict.fromkeys(_called(rhs)):
                if callee in comps and callee not in seen:
                    bodies += _nested_loops(comps, callee, seen | {name})
    return bodies


def loop_kernel_counts(hlo_text: str) -> list[dict]:
    """One entry per `while` instruction: its body and the kernels one iteration launches.

    `kernels` counts the body itself (calls and the largest branch of each conditional
    included); loops nested in it are listed in `nested` (their bodies' kernel counts), not
    added, since their trip counts are not known here.
    """
    comps = parse_computations(hlo_text)
    loops = []
    for comp, instrs in comps.items():
        for instr, op, rhs in instrs:
            if op != "while":
                continue
            m = re.search(r"body=%?([\w.\-]+)", rhs)
            if not m:
                continue
            counts = _kernels(comps, m.group(1))
            nested = [
                int(sum(_kernels(comps, b).values())) for b in _nested_loops(comps, m.group(1))
            ]
            loops.append(
                {
                    "while": instr,
                    "in": comp,
                    "body": m.group(1),
                    "kernels": int(sum(counts.values())),
                    "by_op": dict(counts.most_common()),
                    "nested": nested,
                }
            )
    return loops


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        text = open(path).read()
        for loop in loop_kernel_counts(text):
            nested = f", nested loops of {loop['nested']} kernels" if loop["nested"] else ""
            print(
                f"{path}: {loop['while']} (body {loop['body']}): {loop['kernels']} kernels{nested}"
            )
            for op, n in loop["by_op"].items():
                print(f"    {n:5d}  {op}")


if __name__ == "__main__":
    main()
