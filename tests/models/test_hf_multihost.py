"""Two JAX processes load one Hugging Face checkpoint: each reads only the slices its own
devices hold, and exporting from both gives back the original tensors (and their LoRA
adapters in PEFT's format)."""

import json
from pathlib import Path

import numpy as np
import transformers  # noqa: F401  (test extra: a missing install fails, never skips)

from rlhf_jax.models.safetensors_io import SafetensorsFile  # noqa: E402
from tests.models.hf_helpers import make_hf_model  # noqa: E402

WORKER = Path(__file__).with_name("hf_multihost_worker.py")


def test_each_process_reads_its_own_slices(tmp_path, run_workers, free_port):
    make_hf_model("qwen2").save_pretrained(tmp_path / "hf")
    port = free_port()
    run_workers(
        [
            [
                str(WORKER),
                str(i),
                "2",
                str(port),
                str(tmp_path / "hf"),
                str(tmp_path / "out"),
                str(tmp_path / f"p{i}.json"),
            ]
            for i in range(2)
        ]  # fmt: skip
    )
    r = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert r[0]["process_count"] == 2
    name = "model.layers.0.self_attn.q_proj.weight"  # ours [D=48, N, H], D over fsdp=4
    rows = [sorted(tuple(ix[0]) for n, ix in p["reads"] if n == name) for p in r]
    assert rows == [[(0, 12), (12, 24)], [(24, 36), (36, 48)]]
    for p in r:  # no process ever read a whole sharded matrix
        sizes = [np.prod([b - a for a, b in ix]) for n, ix in p["reads"] if n == name]
        assert max(sizes) == 48 * 48 // 4
    src = SafetensorsFile(tmp_path / "hf" / "model.safetensors")
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert sorted(src.entries) == sorted(out.entries)
    for k in src.entries:
        np.testing.assert_array_equal(np.asarray(out.array(k)), np.asarray(src.array(k)), k)
    peft = json.loads((tmp_path / "out_peft" / "adapter_config.json").read_text())
    assert peft["r"] == 2 and len(peft["target_modules"]) == 4  # q_proj, o_proj of 2 layers
    adapters = SafetensorsFile(tmp_path / "out_peft" / "adapter_model.safetensors")
    a = adapters.array("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert a.shape == (2, 48) and np.abs(np.asarray(a)).max() > 0  # gathered from both
