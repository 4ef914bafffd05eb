"""MIDI reading at the API edge: paths, bytes and miditoolkit objects in, miditoolkit out."""

from __future__ import annotations

import miditoolkit
import pytest

from meloformer_model.data.corrupt import valid_file
from meloformer_model.data.midi_io import (
    MidiReadError,
    find_midi_files,
    load_midi,
    load_score,
    write_midi,
)
from meloformer_model.tokenizer.hid import HIDTokenizer


def test_all_sources_give_the_same_tokens(tmp_path):
    path = tmp_path / "a.mid"
    path.write_bytes(valid_file())
    midi = load_midi(path)
    assert isinstance(midi, miditoolkit.MidiFile)
    assert sum(len(i.notes) for i in midi.instruments) == 64
    tok = HIDTokenizer()
    ids = [tok.encode(src).ids.tolist() for src in (path, str(path), valid_file(), midi)]
    assert ids[0] == ids[1] == ids[2] == ids[3]


def test_decode_returns_and_writes_miditoolkit(tmp_path):
    tok = HIDTokenizer()
    midi = tok.decode(tok.encode(valid_file()).ids)
    assert isinstance(midi, miditoolkit.MidiFile)
    out = write_midi(midi, tmp_path / "sub" / "out.mid")
    assert [n.pitch for n in load_midi(out).instruments[0].notes][:3] == [60, 62, 64]
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_errors_name_the_input(tmp_path):
    with pytest.raises(MidiReadError, match="missing.mid: cannot read file"):
        load_score(tmp_path / "missing.mid")
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"garbage")
    with pytest.raises(MidiReadError, match="bad.mid: unreadable MIDI"):
        load_score(bad)


def test_find_midi_files_recurses_and_keeps_explicit_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mid", "a/b/y.MIDI", "a/b/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = find_midi_files([tmp_path / "a", tmp_path / "explicit.mid"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/b/y.MIDI",
        "a/x.mid",
        "explicit.mid",
    ]
