"""A host-side evaluation any stage can run at its evals: sample from the policy being trained,
score the samples with judges, log the means, and append the rows to RUN_DIR/samples.jsonl.

It reuses the policy evaluation of `eval.policy` (the compiled sampler, `score`, `summarize`):
the hook keeps one `Policy` whose parameters it swaps for the current ones, so the sampler
compiles once per prompt bucket for the whole run. Bind it with gin, e.g.
`sft_stage.eval_hook = @SampleEval()` and `SampleEval.prompts = [...]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import atomic
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.eval.policy import Policy, sample, summarize
from rlhf_jax.models import ModelConfig

SAMPLES_FILE = "samples.jsonl"
# One field per judge: name -> (texts -> one score per text).
Judges = Mapping[str, Callable[[list[str]], Any]]


@gin.configurable
@dataclasses.dataclass
class SampleEval:
    """What to sample and how to score it (gin-configurable; the stage binds the rest).

    Attributes:
      prompts: the prompt strings, each sampled `num_samples` times at every eval.
      judges: name -> function scoring a list of texts (prompt + completion); one field each.
      max_new_tokens, num_samples, temperature, top_p, seed, batch_size: as in
        `eval.policy.sample` (the same seed at every eval: the samples differ only through the
        policy).
    """

    prompts: Sequence[str] = ()
    judges: Judges = dataclasses.field(default_factory=dict)
    max_new_tokens: int = 32
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64

    def bind(
        self,
        *,
        run_dir: Path,
        graphdef: nnx.GraphDef,
        config: ModelConfig,
        tokenizer_path: str | None,
        mesh: Mesh,
        rules: Any,
    ) -> Callable[[Any, int], dict[str, float]]:
        """The loop's `eval_hook(state, step) -> metrics` for one run."""
        if not tokenizer_path:
            raise ValueError("SampleEval needs the run's tokenizer (the data names none)")
        policy = Policy(graphdef, None, config, Tokenizer.from_file(tokenizer_path), mesh, rules,
                        Path(run_dir), 0)  # fmt: skip
        path = Path(run_dir) / SAMPLES_FILE
        first = [True]

        def hook(state: Any, step: int) -> dict[str, float]:
            if first.pop() if first else False:
                drop_rows_from(path, step)  # an earlier attempt's rows from here on: redone
            policy.params, policy.step = state.policy.params, step
            rows = sample(policy, list(self.prompts), max_new_tokens=self.max_new_tokens,
                          num_samples=self.num_samples, temperature=self.temperature,
                          top_p=self.top_p, seed=self.seed, batch_size=self.batch_size,
                          progress=False)  # fmt: skip
            texts = [r["text"] for r in rows]
            for name, judge in self.judges.items():
                for r, v in zip(rows, np.asarray(judge(texts), np.float64), strict=True):
                    r[name] = float(v)
            keys = ("prompt", "completion", "length", "logprob", *self.judges)
            out = [{"step": step, **{k: r[k] for k in keys}} for r in rows]
            append_jsonl(path, out)
            means = summarize(rows, ["length", *self.judges])
            return {f"samples/{k}": v for k, v in means.items() if not k.endswith("/sem")}

        return hook


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Appends strict-JSON rows to `path` (process 0 only; one write of whole lines)."""
    if jax.process_index() != 0 or not rows:
        return
    text = "".join(atomic.dumps(r) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def drop_rows_from(path: Path, step: int) -> None:
    """Removes the rows of `step` and later from `path` (atomically; process 0 only)."""
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


def bind_hook(hook: SampleEval | None, *, ctx: Any, cfg: ModelConfig, factory: Any,
              tokenizer_path: str | None) -> Callable | None:  # fmt: skip
    """`hook.bind(...)` for a stage's trained policy (None: no hook)."""
    if hook is None:
        return None
    return hook.bind(run_dir=ctx.run_dir, graphdef=factory.abstract.policy.graphdef, config=cfg,
                     tokenizer_path=tokenizer_path, mesh=ctx.mesh, rules=ctx.rules)  # fmt: skip
