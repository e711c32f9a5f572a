"""The preferences folder is replaced as a whole (never half old, half new), and a folder whose
manifest does not match its files is refused by the loader."""

import json

import pytest

from rlhf_jax.data import DataError, labelling
from rlhf_jax.data.sources import load_source


def _pairs(n, tag):
    return [
        {"prompt": f"p{i}", "chosen": f" {tag} yes", "rejected": f" {tag} no"} for i in range(n)
    ]


def _write(out, train, ev, tag):
    splits = {"train": _pairs(train, tag), "eval": _pairs(ev, tag)}
    labelling._write_preference_files(out, splits, {"tag": tag})


def test_rewrite_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "prefs"
    _write(out, 6, 2, "old")
    meta = json.loads((out / "preferences.json").read_text())
    assert meta["files"] == {"train.parquet": 6, "eval.parquet": 2}
    splits = load_source(str(out))
    assert (len(splits["train"]), len(splits["eval"])) == (6, 2)
    _write(out, 5, 0, "new")  # no eval pairs this time: the old eval file must not survive
    assert sorted(p.name for p in out.iterdir()) == ["preferences.json", "train.parquet"]
    assert set(load_source(str(out))) == {"train"}
    assert [p.name for p in tmp_path.iterdir()] == ["prefs"]  # no temporary siblings left


def test_a_failed_rewrite_leaves_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "prefs"
    _write(out, 6, 2, "old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = labelling._write_parquet

    def dies_on_eval(path, pairs):
        if path.name == labelling.EVAL_FILE:
            raise KeyboardInterrupt  # a kill part-way through
        real(path, pairs)

    monkeypatch.setattr(labelling, "_write_parquet", dies_on_eval)
    with pytest.raises(KeyboardInterrupt):
        _write(out, 5, 3, "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["prefs"]


@pytest.mark.parametrize("damage", ["no_train", "no_eval", "extra_rows"])
def test_manifest_mismatch_is_refused(tmp_path, damage):
    out = tmp_path / "prefs"
    _write(out, 6, 2, "old")
    if damage == "no_train":
        (out / "train.parquet").unlink()
    elif damage == "no_eval":
        (out / "eval.parquet").unlink()
    else:
        meta = json.loads((out / "preferences.json").read_text())
        meta["files"]["train.parquet"] = 7
        (out / "preferences.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="incomplete"):
        load_source(str(out))


def test_an_eval_split_alone_is_never_used_as_train(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="no train file"):
        load_source(str(tmp_path))
