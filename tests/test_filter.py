"""Quality filter: named reasons for every corruption, thresholds from config, content dedup."""

from __future__ import annotations

import random

import polars as pl
import pytest
from symusic import Score

from meloformer_model.data.corpus import inspect_files, write_filter_results
from meloformer_model.data.corrupt import (
    CORRUPT_CASES,
    melody,
    smf,
    valid_file,
    write_corrupt_corpus,
)
from meloformer_model.data.filtering import FilterConfig, Reason, content_hash, inspect_file
from meloformer_model.data.smf_scan import scan_smf


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_each_corruption_is_rejected_with_its_reason(case):
    make, reason = CORRUPT_CASES[case]
    report = inspect_file(make(), path=f"{case}.mid")
    assert not report.accepted
    assert report.reason == reason.value, report.message
    assert report.message.startswith(f"{case}.mid: ")


def test_valid_file_is_accepted_with_stats():
    report = inspect_file(valid_file(), path="ok.mid")
    assert report.accepted, report.message
    assert report.stats["notes"] == 64
    assert report.stats["pitches"] == 10
    assert report.stats["beats"] == 64.0
    assert report.stats["seconds"] == pytest.approx(32.0)
    assert report.stats["time_signatures"] == ["4/4"]
    assert report.stats["mean_tempo_bpm"] == pytest.approx(120.0)
    assert report.stats["tracks"] == 1
    assert report.stats["cross_bar_rate"] == 0.0
    assert len(report.content_hash) == 32


def test_thresholds_come_from_the_config():
    assert inspect_file(valid_file()).accepted
    report = inspect_file(valid_file(), FilterConfig(min_notes=65), path="ok.mid")
    assert (report.reason, report.message) == ("too_few_notes", "ok.mid: 64 notes < 65")
    assert inspect_file(valid_file(), FilterConfig(min_seconds=33)).reason == Reason.TOO_SHORT.value
    assert (
        inspect_file(valid_file(), FilterConfig(min_pitches=11)).reason
        == Reason.TOO_FEW_PITCHES.value
    )
    assert inspect_file(valid_file(), FilterConfig(time_signatures=((3, 4),))).reason == (
        Reason.UNSUPPORTED_TIME_SIGNATURE.value
    )


def test_scan_counts_unterminated_notes():
    make, _ = CORRUPT_CASES["unterminated_notes"]
    scan = scan_smf(make())
    assert (scan.note_ons, scan.unterminated_notes) == (104, 40)
    assert scan_smf(valid_file()).unterminated_notes == 0


def test_running_status_survives_meta_events():
    """Running status continued after a meta event (against the SMF spec, common in real files)
    is read as symusic reads it: the file is accepted with all its notes."""
    events = []
    for i, (on, off) in enumerate(zip(melody()[::2], melody()[1::2])):
        events.append((on[0], on[1] if i == 0 else on[1][1:]))  # status byte only once
        events.append((off[0], bytes([off[1][1], 0])))  # note off as a running note on, velocity 0
        events.append((0, b"\xff\x01\x01x"))  # a text event between notes
    data = smf([[(0, b"\xff\x51\x03\x07\xa1\x20")], events])
    assert sum(len(t.notes) for t in Score.from_midi(data).tracks) == 64
    assert (scan_smf(data).note_ons, scan_smf(data).unterminated_notes) == (64, 0)
    report = inspect_file(data, path="running.mid")
    assert report.accepted and report.stats["notes"] == 64, report.message


def test_content_hash_ignores_resolution_velocity_and_track_order(sample_files):
    score = Score(str(sample_files[0]))
    resampled = score.resample(960)
    reordered = score.copy()
    reordered.tracks = list(reversed(list(reordered.tracks)))
    for track in reordered.tracks:
        track.shift_velocity(-10, inplace=True)
    base = content_hash(score)
    assert content_hash(resampled) == base
    assert content_hash(reordered) == base
    moved = score.copy()
    moved.tracks[0].shift_pitch(1, inplace=True)
    assert content_hash(moved) != base


def test_duplicates_name_the_original(tmp_path, sample_files):
    original = sample_files[0]
    copy = tmp_path / "zz_copy.mid"
    Score(str(original)).resample(960).dump_midi(str(copy))
    third = tmp_path / "zz_third.mid"
    third.write_bytes(original.read_bytes())
    frame = inspect_files([original, copy, third], FilterConfig(), workers=1, progress=False)
    assert frame["accepted"].to_list() == [True, False, False]
    assert frame["reason"].to_list() == [None, "duplicate", "duplicate"]
    assert frame["duplicate_of"].to_list() == [None, str(original), str(original)]
    assert frame["message"][1] == f"{copy}: same note content as {original}"
    no_dedup = inspect_files([original, copy], FilterConfig(dedup=False), 1, progress=False)
    assert no_dedup["accepted"].to_list() == [True, True]


def test_reports_become_rows_chunk_by_chunk(tmp_path, sample_files, monkeypatch):
    """Reports fold into the table a chunk at a time (memory: one chunk of report objects);
    the table, and duplicates across chunks, are the same as in one piece."""
    from meloformer_model.data import corpus

    copy = tmp_path / "zz_copy.mid"
    copy.write_bytes(sample_files[0].read_bytes())
    paths = [*sample_files[:6], copy]
    whole = inspect_files(paths, FilterConfig(), workers=2, progress=False)
    monkeypatch.setattr(corpus, "INSPECT_CHUNK", 3)
    chunked = inspect_files(paths, FilterConfig(), workers=2, progress=False)
    assert chunked.equals(whole)
    assert chunked["duplicate_of"].to_list()[-1] == str(sample_files[0])


def test_corrupt_files_never_stop_a_corpus_run(tmp_path, sample_files):
    expected = write_corrupt_corpus(tmp_path / "corrupt")
    good = sample_files[:20]
    paths = good + sorted(expected)
    frame = inspect_files(paths, FilterConfig(), workers=2, progress=False)
    summary = write_filter_results(frame, tmp_path / "out", FilterConfig())
    accepted = pl.read_parquet(tmp_path / "out" / "accepted.parquet")
    rejected = pl.read_parquet(tmp_path / "out" / "rejected.parquet")
    assert summary["files"] == len(paths)
    assert set(accepted["path"]) | set(rejected["path"]) == {str(p) for p in paths}
    got = dict(zip(rejected["path"], rejected["reason"]))
    for path, reason in expected.items():
        assert got[str(path)] == reason.value
    good_accepted = accepted.filter(pl.col("path").is_in([str(p) for p in good]))
    assert good_accepted.height + sum(str(p) in got for p in good) == len(good)
    assert good_accepted["notes"].min() > 0


def test_random_byte_mutations_of_real_files_never_raise(sample_files):
    rng = random.Random(1234)
    outcomes = set()
    for path in sample_files[:10]:
        data = bytearray(path.read_bytes())
        for _ in range(30):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated = mutated[: rng.randrange(len(mutated))]
            report = inspect_file(bytes(mutated), path=path.name)
            assert report.accepted or report.reason in {r.value for r in Reason}
            outcomes.add(report.reason)
    assert Reason.UNREADABLE.value in outcomes and None in outcomes


def test_sample_corpus_passes_the_filter(sample_files):
    frame = inspect_files(sample_files, FilterConfig(), workers=2, progress=False)
    rejected = frame.filter(~pl.col("accepted"))
    assert frame.filter(pl.col("accepted")).height >= 400
    # Chorales are clean; the few rejections are long held notes over bar lines and one
    # chorale that music21 ships twice.
    assert set(rejected["reason"]) <= {"cross_bar_rate", "duplicate"}, rejected.rows()[:5]
    duplicates = rejected.filter(pl.col("reason") == "duplicate")
    assert set(duplicates["duplicate_of"]) <= set(frame["path"])
    assert frame.filter(pl.col("accepted"))["notes"].min() >= 32
