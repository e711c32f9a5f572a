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

import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

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
