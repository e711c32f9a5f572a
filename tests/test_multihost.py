"""Two JAX processes on localhost (gloo collectives, fake CPU devices) compute the same sharded
loss as one process, each reading only its own slice of the batch, and sample the same
completions as one process."""

import json
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("multihost_worker.py")


def test_two_process_loss_equals_single_process(tmp_path, run_workers, free_port):
    port = free_port()
    run_workers(
        [[str(WORKER), str(i), "2", str(port), str(tmp_path / f"p{i}.json")] for i in range(2)]
        + [[str(WORKER), "0", "1", "0", str(tmp_path / "single.json")]]
    )
    r = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    s = json.loads((tmp_path / "single.json").read_text())
    assert r[0]["process_count"] == 2 and r[0]["devices"] == 4
    assert s["process_count"] == 1 and s["devices"] == 2
    assert abs(r[0]["loss"] - r[1]["loss"]) < 1e-6
    assert abs(r[0]["loss"] - s["loss"]) < 1e-5, (r, s)
    # The sampler across two processes: every process gets the whole output, equal to one
    # process's (greedy exactly; sampled with the same key, given the same logits).
    for key in ("greedy", "sampled"):
        assert r[0][key] == r[1][key] == s[key], key
        assert len(s[key]) == 8 and len(s[key][0]) == 6
    np.testing.assert_allclose(r[0]["sampled_logprobs"], s["sampled_logprobs"], atol=1e-3)
    assert r[0]["greedy"] != r[0]["sampled"]  # sampling really sampled
    # A failure on process 0 inside on_process_0 reaches every process (none is left waiting).
    assert r[0]["process_0_failure"] == ["'written'", "OSError"]
    assert r[1]["process_0_failure"][0] == "None"
    assert r[1]["process_0_failure"][1].startswith("RuntimeError: process 0 failed while writing")
    assert s["process_0_failure"] == ["'written'", "OSError"]
