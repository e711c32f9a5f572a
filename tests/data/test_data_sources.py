"""load_source: every local source kind, split handling, and errors for missing/bad files."""

from __future__ import annotations

import json

import datasets
import pytest

from rlhf_jax.data import DataError, load_source
from rlhf_jax.data.sources import ROW_INDEX, source_name

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]


def _texts(ds, col="prompt"):
    return list(ds.select_columns([col]).to_dict()[col])


def test_jsonl(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS)
    dd = load_source(str(f))
    assert list(dd) == ["train"]
    assert _texts(dd["train"]) == [r["prompt"] for r in ROWS]
    assert source_name(dd["train"]) == str(f)
    assert _texts(dd["train"], ROW_INDEX) == list(range(10))


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_key(tmp_path, wrap):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    assert _texts(load_source(f)["train"]) == [r["prompt"] for r in ROWS]


def test_parquet_and_csv(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        dd = load_source(tmp_path / name)
        assert _texts(dd["train"], "completion") == [r["completion"] for r in ROWS], name


def test_file_format_override(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "data.txt", ROWS)
    with pytest.raises(DataError, match="unknown file format"):
        load_source(f)
    assert len(load_source(f, file_format="jsonl")["train"]) == 10


def test_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert list(load_source(tmp_path / "one")) == ["train"]
    dd = datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 10))})
    dd.save_to_disk(str(tmp_path / "two"))
    out = load_source(str(tmp_path / "two"))
    assert sorted(out) == ["eval", "train"]
    assert _texts(out["eval"]) == ["p8", "p9"]


def test_mapping_folder_list_and_in_memory(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "validation.jsonl", ROWS[7:])
    by_map = load_source(
        {"train": tmp_path / "train.jsonl", "eval": str(tmp_path / "validation.jsonl")}
    )
    by_dir = load_source(tmp_path)
    for dd in (by_map, by_dir):
        assert len(dd["train"]) == 7 and _texts(dd["eval"]) == ["p7", "p8", "p9"]
        assert source_name(dd["eval"]).endswith("validation.jsonl")
    assert len(load_source(ROWS)["train"]) == 10
    mem = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    assert len(load_source(mem, split_fraction=0.2)["eval"]) == 2


def test_split_fraction_is_seeded_and_disjoint(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}"} for i in range(100)])
    a = load_source(f, split_fraction=0.1, seed=3)
    b = load_source(f, split_fraction=0.1, seed=3)
    c = load_source(f, split_fraction=0.1, seed=4)
    assert len(a["eval"]) == 10 and len(a["train"]) == 90
    assert _texts(a["eval"]) == _texts(b["eval"]) != _texts(c["eval"])
    assert not set(_texts(a["eval"])) & set(_texts(a["train"]))
    # Row indices refer to the file even after the split.
    for split in ("train", "eval"):
        for text, idx in zip(_texts(a[split]), _texts(a[split], ROW_INDEX), strict=True):
            assert text == f"p{idx}"


def test_split_fraction_ignored_when_source_has_eval(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "test.jsonl", ROWS[7:])
    assert len(load_source(tmp_path, split_fraction=0.5)["eval"]) == 3


def test_missing_and_malformed_sources(tmp_path, write_jsonl):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_source(tmp_path / "nope.jsonl")
    f = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl: invalid JSON on line 2"):
        load_source(f)
    g = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], [1, 2]])
    with pytest.raises(DataError, match="row 1 is a list"):
        load_source(g)
    with pytest.raises(DataError, match="split_fraction"):
        load_source(write_jsonl(tmp_path / "ok.jsonl", ROWS), split_fraction=1.5)
    with pytest.raises(DataError, match="leaves no training rows"):
        load_source(write_jsonl(tmp_path / "one.jsonl", ROWS[:1]), split_fraction=0.5)


def test_mixed_types_are_recorded_not_lost(tmp_path, write_jsonl):
    f = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": 5}, {"prompt": None}])
    ds = load_source(f)["train"]
    assert _texts(ds) == ["a", None, None]
    errors = _texts(ds, "_type_errors")
    assert errors[0] is None and json.loads(errors[1]) == {"prompt": ["int", "str"]}
    assert errors[2] is None


def test_mixed_types_keep_the_majority_kind(tmp_path, write_jsonl, word_tok):
    from rlhf_jax.data import build_preference_dataset

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    rej = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]
    rows = [{"chosen": conv, "rejected": rej}] * 3 + [{"chosen": "oops", "rejected": rej}]
    ds = load_source(write_jsonl(tmp_path / "conv.jsonl", rows))["train"]
    with pytest.raises(DataError, match="row 3: field 'chosen' is a str where the column holds"):
        build_preference_dataset(ds, word_tok, format="conversational")
    ex = build_preference_dataset(ds, word_tok, format="conversational", on_bad_row="skip")
    assert len(ex) == 3 and ex.stats["bad_rows"] == 1
