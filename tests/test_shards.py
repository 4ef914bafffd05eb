"""The corpus registry: what the folder scan lists, and which shards a refresh must redo (content
hashes decide; size and mtime only say what to re-hash)."""

import os
from pathlib import Path

import pytest

from meloformer_model.data.shards import file_hash, load_registry, plan_shards, scan_folder


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_scan_lists_midi_files_recursively(tmp_path):
    corpus = tmp_path / "corpus"
    _write(corpus / "a.mid", b"a")
    _write(corpus / "sub" / "deeper" / "B.MIDI", b"bb")
    _write(corpus / "sub" / "c.kar", b"ccc")
    _write(corpus / "sub" / "notes.txt", b"not midi")
    _write(corpus / ".hidden.mid", b"hidden")
    _write(tmp_path / "elsewhere" / "linked.mid", b"outside")
    os.symlink(tmp_path / "elsewhere", corpus / "link")  # symlinked folders are not followed
    listing = scan_folder(corpus)
    assert listing["path"].to_list() == ["a.mid", "sub/c.kar", "sub/deeper/B.MIDI"]
    assert listing["size"].to_list() == [1, 3, 2]
    stat = (corpus / "a.mid").stat()
    assert listing["mtime_ns"][0] == stat.st_mtime_ns


def test_plan_rehashes_touched_files_and_redoes_only_changed_shards(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(5):
        _write(corpus / f"f{i}.mid", bytes([i]) * 10)
    first = plan_shards(corpus, load_registry(tmp_path / "none.parquet"), shard_size=2)
    assert first.new_shards == ["shard-00000", "shard-00001", "shard-00002"]
    assert first.registry["file_hash"].to_list() == [
        file_hash(corpus / f"f{i}.mid") for i in range(5)
    ]
    registry = first.registry

    unchanged = plan_shards(corpus, registry, shard_size=2)
    assert (unchanged.new_shards, unchanged.changed_shards) == ([], [])
    assert unchanged.registry.equals(registry)

    os.utime(corpus / "f0.mid", ns=(1, 1))  # a new timestamp, same bytes: re-hashed, not redone
    touched = plan_shards(corpus, registry, shard_size=2)
    assert (touched.new_shards, touched.changed_shards) == ([], [])

    _write(corpus / "f2.mid", b"new content")  # new bytes: its shard is redone
    (corpus / "f4.mid").unlink()  # a deleted file: its shard is gone with it
    _write(corpus / "g.mid", b"added")  # an added file: a new shard
    changed = plan_shards(corpus, registry, shard_size=2)
    assert changed.changed_shards == ["shard-00001"]
    assert changed.new_shards == ["shard-00003"]
    assert changed.removed_files == 1
    rows = dict(zip(changed.registry["path"], changed.registry["shard"]))
    assert rows == {"f0.mid": "shard-00000", "f1.mid": "shard-00000", "f2.mid": "shard-00001",
                    "f3.mid": "shard-00001", "g.mid": "shard-00003"}  # fmt: skip
    hashes = dict(zip(changed.registry["path"], changed.registry["file_hash"]))
    assert hashes["f2.mid"] == file_hash(corpus / "f2.mid")

    (corpus / "f3.mid").unlink()  # one file of a shard deleted, another kept: shard redone
    assert plan_shards(corpus, changed.registry, shard_size=2).changed_shards == ["shard-00001"]


def test_prepare_corpus_redoes_a_shard_whose_run_failed(tmp_path, sample_files, monkeypatch):
    """``prepare_corpus`` saves the registry, then runs the stages: when they fail after a file
    changed, the next call still sees the shard's token file as built from the old file."""
    import polars as pl
    from symusic import Score

    from meloformer_model.data import stages
    from meloformer_model.data.pipeline import prepare_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sample_files[:6]:
        _write(corpus / path.name, path.read_bytes())
    root = tmp_path / "data"
    first = prepare_corpus(corpus, root, shard_size=4).dataset.version
    changed = corpus / sample_files[1].name
    score = Score(str(changed))
    for track in score.tracks:
        track.shift_pitch(2, inplace=True)
    score.dump_midi(str(changed))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stages, "token_shard", fail)
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(corpus, root, shard_size=4)
    prepared = prepare_corpus(corpus, root, shard_size=4)
    rows = pl.read_parquet(next((root / "hid_tokens").glob("*/shard-00000.parquet")))
    row = rows.filter(pl.col("path") == changed.name)
    assert row["file_hash"].to_list() == [file_hash(changed)]
    assert prepared.dataset.version != first
