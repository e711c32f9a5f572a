"""The built-in reviews task: files, sizes, disjoint splits, determinism, idempotence, the
trained tokenizer, the gin file, and the corpus properties the gold judges rely on."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gin
import numpy as np

from rlhf_jax.data import make_prompt_iterator, make_sft_iterator
from rlhf_jax.data.tasks import build_reviews_task, score_texts
from rlhf_jax.data.tasks.reviews import generate_reviews

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_files_and_sizes(small_task):
    out = Path(small_task.out_dir)
    for name in ("task.json", "corpus", "tokenizer.json", "prompts.jsonl", "eval_prompts.jsonl"):
        assert (out / name).exists(), name
    corpus = small_task.corpus()
    assert len(corpus["train"]) == 1425 and len(corpus["eval"]) == 75  # 5% eval
    assert corpus["train"].column_names == ["text"]
    sizes = json.loads((out / "task.json").read_text())["sizes"]
    assert sizes["prompts"] == 200 and sizes["eval_prompts"] == 50


def test_splits_and_prompts_are_disjoint(small_task):
    corpus = small_task.corpus()
    train, ev = set(corpus["train"]["text"]), set(corpus["eval"]["text"])
    assert len(train) == 1425 and not train & ev
    prompts, eval_prompts = _jsonl(small_task.prompts_path), _jsonl(small_task.eval_prompts_path)
    p_set = {p["prompt"] for p in prompts}
    assert len(p_set) == len(prompts) and not p_set & {p["prompt"] for p in eval_prompts}
    for p in prompts + eval_prompts:
        assert 2 <= len(p["prompt"].split()) <= 5
        assert f"{p['prompt']} {p['reference']}" not in train | ev  # from held-out reviews


def test_texts_look_like_reviews(small_task):
    texts = list(small_task.corpus()["train"]["text"])
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= 8 and max(lengths) <= 30
    assert all(t == t.lower() for t in texts)
    assert 0.15 < np.mean(["!" in t for t in texts]) < 0.6
    scores = score_texts(texts)
    s, o = scores["sentiment"], scores["offensiveness"]
    assert np.mean(s > 0.3) > 0.25 and np.mean(s < -0.3) > 0.25  # both sentiments, balanced-ish
    assert 0.03 < np.mean(o > 0.5) < 0.3  # some rude texts, not many


def test_deterministic_and_idempotent(tmp_path, small_task):
    a = build_reviews_task(tmp_path / "a", num_texts=1500, num_prompts=200, num_eval_prompts=50)
    for name in ("tokenizer.json", "prompts.jsonl", "eval_prompts.jsonl"):
        assert (Path(a.out_dir) / name).read_bytes() == (
            Path(small_task.out_dir) / name
        ).read_bytes()
    assert list(a.corpus()["train"]["text"]) == list(small_task.corpus()["train"]["text"])
    stamp = os.stat(a.tokenizer_path).st_mtime_ns
    again = build_reviews_task(tmp_path / "a", num_texts=1500, num_prompts=200, num_eval_prompts=50)
    assert os.stat(again.tokenizer_path).st_mtime_ns == stamp  # reused, not rebuilt
    changed = build_reviews_task(tmp_path / "a", num_texts=800, num_prompts=20, num_eval_prompts=5)
    assert len(changed.corpus()["train"]) == 760
    assert json.loads((tmp_path / "a" / "task.json").read_text())["settings"]["num_texts"] == 800
    assert generate_reviews(50, seed=1) != generate_reviews(50, seed=2)


def test_tokenizer(small_task):
    tok = small_task.tokenizer()
    vocab = tok.backend.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 300 < tok.vocab_size <= 1536
    for text in small_task.corpus()["eval"]["text"]:
        ids = tok.encode(text)
        assert 3 not in ids and tok.decode(ids) == text  # exact round trip, spaces and "!"
    prompt, rest = "the food was", "great, really!"
    assert tok.decode(tok.encode(prompt) + tok.encode(rest)) == "the food was great, really!"


def test_iterators_from_task(small_task):
    train, ev, tok = make_sft_iterator(
        task=small_task, batch_size=8, buckets=(32, 48), process_index=0, process_count=1
    )
    b = next(train)
    assert b["input_ids"].shape[1] in (32, 48) and (b["input_ids"][:, 0] == tok.bos_id).all()
    assert len(ev) == -(-75 // 8)
    pt, pe, _ = make_prompt_iterator(
        task=small_task, batch_size=8, buckets=(8,), process_index=0, process_count=1
    )
    pb = next(pt)
    assert pb["prompt_ids"].shape == (8, 8) and (pb["prompt_ids"][:, -1] != tok.pad_id).all()
    assert len(pe) == -(-50 // 8)


def test_gin_file_parses_and_builds(tmp_path):
    import rlhf_jax.data  # noqa: F401  (registers the configurables)

    gin.add_config_file_search_path(str(REPO))
    gin.parse_config_file(str(REPO / "gin" / "tasks" / "reviews.gin"))
    gin.parse_config(
        f"REVIEWS_DIR = '{tmp_path / 'rv'}'\nREVIEWS_NUM_TEXTS = 400\n"
        "reviews_task.num_prompts = 16\nreviews_task.num_eval_prompts = 8\n"
        "GOLD_REWARD = 'hh'"
    )
    train, ev, tok = make_sft_iterator(batch_size=4, process_index=0, process_count=1)
    assert next(train)["input_ids"].shape[1] in (32, 48)
    assert re.search(r"rv/tokenizer.json$", tok.path)
    from rlhf_jax.data.tasks import gold_reward

    rude, nice = gold_reward(["you stupid idiot", "the food was great"])
    assert nice > rude
