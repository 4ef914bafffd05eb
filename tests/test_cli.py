"""The meloformer command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from symusic import Score

from meloformer_model.data.corrupt import CORRUPT_CASES, write_corrupt_corpus


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meloformer_model.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_filter_writes_tables_and_summarises_reasons(tmp_path, sample_files):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sample_files[:12]:
        (corpus / path.name).write_bytes(path.read_bytes())
    (corpus / "nested").mkdir()
    (corpus / "nested" / "dup.mid").write_bytes(sample_files[0].read_bytes())
    expected = write_corrupt_corpus(corpus / "broken")
    out = tmp_path / "out"
    result = run_cli("filter", corpus, "--out", out, "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    accepted = pl.read_parquet(out / "accepted.parquet")
    rejected = pl.read_parquet(out / "rejected.parquet")
    assert accepted.height + rejected.height == 12 + 1 + len(CORRUPT_CASES)
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert {Path(p).name: r for p, r in reasons.items() if "broken" in p} == {
        p.name: r.value for p, r in expected.items()
    }
    dup = rejected.filter(pl.col("reason") == "duplicate")
    assert dup.height == 1 and dup["duplicate_of"][0] in accepted["path"].to_list()
    assert f"{accepted.height} accepted" in result.stdout
    assert "unreadable" in result.stdout


def test_tokenize_decode_round_trip_through_files(tmp_path, sample_files):
    src = sample_files[1]
    tokens = tmp_path / "t.json"
    result = run_cli("tokenize", src, "-o", tokens)
    assert result.returncode == 0, result.stderr
    data = json.loads(tokens.read_text())
    assert data["tokens"][0] == "BOS" and data["tokens"][-1] == "EOS"
    assert (
        len(data["ids"]) == len(data["bar"]) == len(data["instrument"]) == len(data["onset_group"])
    )
    out = tmp_path / "back.mid"
    result = run_cli("decode", tokens, "-o", out)
    assert result.returncode == 0, result.stderr
    assert Score(str(out)).note_num() == Score(str(src)).note_num()


def test_inspect_prints_bars_and_chords(sample_files):
    result = run_cli("inspect", sample_files[2])
    assert result.returncode == 0, result.stderr
    bar_lines = [line for line in result.stdout.splitlines() if line.startswith("bar ")]
    assert len(bar_lines) > 4
    assert "chord" in bar_lines[0] and "Bar" in bar_lines[0]


def test_a_reader_that_stops_early_gets_no_traceback(sample_files):
    """``meloformer inspect FILE | head``: the pipe closes while the command still writes."""
    longest = max(sample_files, key=lambda p: p.stat().st_size)
    proc = subprocess.Popen([sys.executable, "-m", "meloformer_model.cli", "inspect", str(longest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline().startswith(str(longest).encode())
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and stderr == "", stderr


def test_unreadable_input_gives_one_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi at all")
    for command in ("inspect", "tokenize"):
        args = [command, bad] + (["-o", tmp_path / "x.json"] if command == "tokenize" else [])
        result = run_cli(*args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "bad.mid" in lines[0] and "unreadable" in lines[0]
    result = run_cli("decode", bad, "-o", tmp_path / "x.mid")
    assert result.returncode == 1 and "bad.mid" in result.stderr
    assert not (tmp_path / "x.mid").exists()


def test_token_files_with_ids_that_are_not_token_ids_are_named(tmp_path, sample_files):
    """Fractional ids were truncated into other tokens; an id past 64 bits was a traceback."""
    tokens = tmp_path / "t.json"
    assert run_cli("tokenize", sample_files[0], "-o", tokens).returncode == 0
    data = json.loads(tokens.read_text())
    for ids, reason in (([1.5, 2.7], "ids must be whole numbers"), ([2**70], "too large")):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "ids": ids}))
        result = run_cli("decode", tmp_path / "bad.json", "-o", tmp_path / "x.mid")
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"meloformer decode: {tmp_path / 'bad.json'}: not a token")
        assert reason in result.stderr
    assert not (tmp_path / "x.mid").exists()


def test_a_broken_dataset_folder_is_named_in_one_line(prepared, tmp_path):
    """A copy of the dataset whose train split lost its folder (datasets raised a traceback)."""
    import shutil

    broken = shutil.copytree(prepared.dataset.path, tmp_path / "dataset")
    shutil.rmtree(broken / "train")
    result = run_cli("train", broken, "--vocab", prepared.vocab_path, "--out", tmp_path / "run",
                     "--max-steps", "1")  # fmt: skip
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"meloformer train: {broken}: not a readable Arrow dataset")
    vocab = tmp_path / "vocab.json"
    vocab.write_text("{}")
    result = run_cli("train", prepared.dataset.path, "--vocab", vocab, "--out", tmp_path / "run")
    assert result.stderr == (
        f"meloformer train: {vocab}: not a valid vocabulary file ('config')\n"
    )  # the file named once


def test_corpus_commands_name_missing_sources_and_bad_worker_counts(tmp_path, capsys):
    """A mistyped folder is reported before any work (it used to become one rejected
    'unreadable' file in the tables); an empty folder and a worker count below 1 as well."""
    from meloformer_model.cli import main

    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    for command in ("filter", "prepare"):
        assert main([command, str(tmp_path / "typo"), str(empty), "--out", str(out)]) == 1
        assert capsys.readouterr().err == (
            f"meloformer {command}: no such file or folder: {tmp_path / 'typo'}\n"
        )
        assert main([command, str(empty), "--out", str(out)]) == 1
        assert f"no MIDI files found in {empty}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["filter", str(empty), "--out", str(out), "--workers", "0"])
    assert "argument --workers: '0' is not a whole number >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_prepare_streams_in_chunks_with_the_same_result(tmp_path, sample_files, monkeypatch):
    """`prepare` tokenizes chunk by chunk (flat memory); chunks of 16 give the same tokens and
    counts as one chunk, and a broken file is rejected without stopping the run."""
    from meloformer_model import cli
    from meloformer_model.tokenizer.vocab import Vocabulary

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sample_files[:40]:
        (corpus / path.name).write_bytes(path.read_bytes())
    (corpus / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    whole = tmp_path / "whole"
    result = run_cli("prepare", corpus, "--out", whole, "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(cli, "PREPARE_CHUNK", 16)
    chunked = tmp_path / "chunked"
    assert (
        cli.main(["prepare", str(corpus), "--out", str(chunked), "--workers", "1", "--quiet"]) == 0
    )
    tokens = pl.read_parquet(chunked / "tokens.parquet")
    assert tokens.equals(pl.read_parquet(whole / "tokens.parquet"))
    accepted = pl.read_parquet(chunked / "filter" / "accepted.parquet")
    assert tokens.height == accepted.height > 16 * 2
    assert "broken.mid" in pl.read_parquet(chunked / "filter" / "rejected.parquet")["path"][0]
    vocab = Vocabulary.load(chunked / "vocab.json")
    ids = tokens["ids"].explode().to_numpy()
    assert vocab.counts.sum() == len(ids) == tokens["length"].sum()
    assert (vocab.counts == Vocabulary.load(whole / "vocab.json").counts).all()


def test_train_runs_resumes_and_refuses_another_config_in_its_folder(prepared, tmp_path):
    """``meloformer train`` outside Dagster: a short run writes its checkpoint and figures;
    asked again it returns the finished run; another size into the same folder, a folder that
    is not a dataset and an unknown profile each stop with one line naming the cause."""
    dataset, vocab, out = prepared.dataset.path, prepared.vocab_path, tmp_path / "run"
    args = ("train", dataset, "--vocab", vocab, "--out", out, "--max-steps", "2")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith("2 steps, validation loss ") and "tokens/s" in last
    assert last.endswith(f"checkpoint {out / 'step-0000002'}, best {out / 'step-0000002'}")
    again = run_cli(*args)
    assert again.returncode == 0 and "finished its 2 steps" in again.stdout
    for bad, cause in (
        (("--size", "small"), "holds another run (size 'tiny' → 'small')"),
        (("--profile", "a100"), "unknown training profile 'a100'"),
        (("--max-steps", "0"), "training config: max_steps 0 must be >= 1"),
        (("--device", "gpu"), "device 'gpu': not a device name (cpu, cuda, cuda:1)"),
    ):
        proc = run_cli(*args, *bad)
        assert proc.returncode == 1 and cause in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("train", tmp_path, "--vocab", vocab, "--out", out)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"meloformer train: {tmp_path}: not an Arrow dataset version folder (no dataset_dict.json)"
    )


def test_outputs_that_would_overwrite_an_input_are_refused_before_any_work(tmp_path, sample_files):
    """An output equal to an input (or a folder, or under a file) is named in one line and
    nothing is written: the input is what the user would lose."""
    midi = tmp_path / "piece.mid"
    midi.write_bytes(sample_files[0].read_bytes())
    original = midi.read_bytes()
    result = run_cli("tokenize", midi, "-o", midi)
    assert result.returncode == 1 and midi.read_bytes() == original
    assert result.stderr == f"meloformer tokenize: {midi}: the output would overwrite an input\n"
    assert run_cli("tokenize", midi, "-o", tmp_path / "t.json").returncode == 0
    tokens = tmp_path / "t.json"
    before = tokens.read_bytes()
    result = run_cli("decode", tokens, "-o", tokens)
    assert result.returncode == 1 and tokens.read_bytes() == before
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run_cli("decode", tokens, "-o", folder)
    assert result.stderr == f"meloformer decode: {folder}: is a folder, not a file to write\n"
    result = run_cli("decode", tokens, "-o", midi / "out.mid")
    assert (
        result.stderr == f"meloformer decode: {midi / 'out.mid'}: {midi} is a file, not a folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "piece.mid", "t.json"]
