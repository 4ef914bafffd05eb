"""Reading and writing MIDI.

The hot path parses with symusic (two orders of magnitude faster than the pure-Python parsers);
miditoolkit stays the user-facing interop type, so the public functions accept a path, raw bytes
or a ``miditoolkit.MidiFile`` and hand back ``miditoolkit.MidiFile`` objects.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import miditoolkit
from symusic import Score
from symusic.core import ScoreTick

from meloformer_model.atomic import write_bytes_atomic

MidiSource = Union[str, os.PathLike, bytes, bytearray, miditoolkit.MidiFile]  # noqa: UP007

MIDI_SUFFIXES = (".mid", ".midi", ".kar", ".smf")


class MidiReadError(ValueError):
    """A MIDI source that cannot be parsed; the message names the source and the reason."""


def source_name(src: MidiSource) -> str:
    """A short human-readable name for error messages."""
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, miditoolkit.MidiFile):
        return "<miditoolkit.MidiFile>"
    return str(src)


def read_bytes(src: MidiSource) -> bytes:
    """The raw SMF bytes of any accepted source."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if isinstance(src, miditoolkit.MidiFile):
        buf = io.BytesIO()
        src.dump(file=buf)
        return buf.getvalue()
    try:
        return Path(src).read_bytes()
    except OSError as exc:
        raise MidiReadError(f"{src}: cannot read file ({exc.strerror or exc})") from exc


def load_score(src: MidiSource | ScoreTick) -> ScoreTick:
    """Parse any accepted source into a tick-time symusic score (the internal representation)."""
    if isinstance(src, ScoreTick):
        return src
    data = read_bytes(src)
    try:
        return Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError with a parser message
        raise MidiReadError(f"{source_name(src)}: unreadable MIDI ({exc})") from exc


def score_to_miditoolkit(score: ScoreTick) -> miditoolkit.MidiFile:
    """Convert at the API edge; going through SMF bytes keeps channels and programs exact."""
    return miditoolkit.MidiFile(file=io.BytesIO(score.dumps_midi()))


def load_midi(src: MidiSource) -> miditoolkit.MidiFile:
    """Read a MIDI file into ``miditoolkit.MidiFile`` (the interop type)."""
    if isinstance(src, miditoolkit.MidiFile):
        return src
    return score_to_miditoolkit(load_score(src))


def write_midi(midi: miditoolkit.MidiFile | ScoreTick, path: str | os.PathLike) -> Path:
    """Write a score or ``miditoolkit.MidiFile`` atomically."""
    if isinstance(midi, ScoreTick):
        return write_bytes_atomic(path, midi.dumps_midi())
    buf = io.BytesIO()
    midi.dump(file=buf)
    return write_bytes_atomic(path, buf.getvalue())


def find_midi_files(sources: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted, de-duplicated list of MIDI paths."""
    found: set[Path] = set()
    for src in sources:
        path = Path(src)
        if path.is_dir():
            found.update(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES
            )
        else:
            found.add(path)
    return sorted(found)
