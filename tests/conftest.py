"""Test set-up: 8 fake CPU devices before jax is imported, a persistent compilation cache, a
clean gin registry per test, and a runner for multi-process worker scripts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent XLA compilation cache for the whole session (and its subprocesses, through the
# variable): many tests compile the same tiny programs, and a cached executable is the
# compiler's own output for the same program, so results are unchanged.
os.environ.setdefault(
    "RLHF_JAX_TEST_COMPILE_CACHE",
    os.path.join(__import__("tempfile").gettempdir(), "rlhf_jax_test_xla_cache"),
)

# Shared caches (rlhf_jax.paths) go to a folder of this session, never to ~/.cache.
os.environ.setdefault(
    "RLHF_JAX_CACHE", __import__("tempfile").mkdtemp(prefix="rlhf_jax_test_cache_")
)

import functools  # noqa: E402
import json  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402
from support import file_lock, write_review_preferences, xdist_shared_dir  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["RLHF_JAX_TEST_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(argvs: list[list[str]], timeout: float = 300) -> list[str]:
    """Runs `python ARGV` for each ARGV concurrently, with this checkout's package first on the
    path (not whatever copy is installed); returns their outputs; kills them all on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for argv in argvs
    ]
    try:
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:]
            outs.append(out)
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture
def run_workers():
    """`run_workers(argvs, timeout=300)`: see `_run_workers`."""
    return _run_workers


@pytest.fixture
def free_port():
    """`free_port()`: a TCP port free at the time of the call (for a jax coordinator)."""
    return _free_port


# ----------------------------------------------------------------------------- shared on-disk data
# Built once per session and shared by the xdist workers through a file lock: a small reviews
# task, preference pairs made from it, and a short SFT run (the DPO tests' starting point, also
# used by the sweep and eval-hook tests).


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory shared by all xdist workers of this session."""
    return xdist_shared_dir(tmp_path_factory, "dpo_shared")


@pytest.fixture(scope="session")
def reviews(shared_dir):
    """(task, preference folder, number of pairs) for a 3000-text reviews task."""
    from rlhf_jax.data.tasks.reviews import build_reviews_task

    with file_lock(shared_dir / "reviews.lock"):
        task = build_reviews_task(shared_dir / "reviews", num_texts=3000, num_prompts=32,
                                  num_eval_prompts=16)  # fmt: skip
        path = shared_dir / "preferences"
        meta = shared_dir / "prefs.json"
        if not meta.exists():
            n = write_review_preferences(list(task.corpus()["train"]["text"]), path)
            meta.write_text(json.dumps({"pairs": n}))
        return task, path, json.loads(meta.read_text())["pairs"]


def _sft_data(task, batch_size: int, seed: int):
    from rlhf_jax.data.pipeline import make_sft_iterator
    from rlhf_jax.train.stage import StageData

    train, ev, tok = make_sft_iterator(task=task, batch_size=batch_size, seed=seed,
                                       buckets=(48,))  # fmt: skip
    return StageData(train=train, eval=ev, vocab_size=tok.vocab_size, seq_len=48,
                   tokenizer_path=tok.path)  # fmt: skip


@pytest.fixture(scope="session")
def sft_run(shared_dir, reviews) -> Path:
    """A 4-step SFT run of the tiny model on the reviews corpus (the DPO starting point)."""
    from rlhf_jax.train.sft import sft_stage

    task = reviews[0]
    run = shared_dir / "sft"
    with file_lock(shared_dir / "sft.lock"):
        if not (run / "summary.json").exists():
            gin.clear_config()
            gin.parse_config(
                [
                    "model_config.preset = 'tiny'",
                    "model_config.max_seq_len = 64",
                    "LoopConfig.train_steps = 4",
                    "LoopConfig.eval_batches = 1",
                    "LoopConfig.progress_bar = False",
                    "LoopConfig.tensorboard = False",
                    "LoopConfig.async_checkpointing = False",
                    "make_optimizer.learning_rate = 3e-3",
                ]
            )
            sft_stage(run_dir=str(run), data=functools.partial(_sft_data, task), batch_size=32)
            gin.clear_config()
    return run
