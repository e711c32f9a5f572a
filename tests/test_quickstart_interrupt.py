"""SIGTERM during the quickstart's SFT stage: the stage checkpoints and stops, and the quickstart
exits with status 143 instead of going on to label, train and evaluate with a half-trained
policy (which would print a table that looks right and is not)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rlhf_jax.quickstart import INTERRUPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_in_a_stage_stops_the_quickstart(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.cli", "quickstart", "--fast", "--out_dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    lines = []
    try:
        deadline = time.time() + 240
        # Wait until the SFT stage's loop runs (its SIGTERM handler is installed by then).
        for line in proc.stdout:
            lines.append(line)
            if "starting at step 0" in line and "sft" in line:
                break
            assert time.time() < deadline, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == INTERRUPTED_EXIT_CODE, text[-3000:]
    assert "interrupted at step" in text and "rerun the same command" in text, text[-3000:]
    assert not (out / "sft" / "summary.json").exists()
    assert any((out / "sft" / "checkpoints").iterdir())  # the stage saved where it stopped
    # Nothing after the SFT stage ran.
    assert not (out / "preferences").exists() and not (out / "reward").exists()
    assert not (out / "report.md").exists()
