"""Worker for test_commands_in_two_processes: `generate` and `make-preferences` from one policy
in a 1- or 2-process CPU job (2 fake devices per process).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT PROMPTS OUT_DIR
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

from rlhf_jax import partitioning as P  # noqa: E402


def main() -> None:
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    checkpoint, prompts, out = sys.argv[4], sys.argv[5], Path(sys.argv[6])
    if nproc > 1:
        P.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    from rlhf_jax.commands import generate_command, make_preferences_command

    common = dict(checkpoint=checkpoint, prompts=prompts, batch_size=8, max_new_tokens=8)
    gen = generate_command(output=str(out / "gen.jsonl"), limit=12, **common)
    # Every process returns only once process 0 has written the file.
    assert gen.exists(), f"process {pid}: {gen} missing on return"
    prefs = make_preferences_command(output=str(out / "prefs"), limit=16, **common)
    assert (prefs / "train.parquet").exists(), f"process {pid}: train.parquet missing on return"


if __name__ == "__main__":
    main()
