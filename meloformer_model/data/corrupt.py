"""Generators for the corrupt MIDI files real corpora contain (design.md §5).

Each case is raw SMF bytes written by hand, because the point is to produce what well-behaved
writers never would. ``CORRUPT_CASES`` maps a case name to its generator and the filter reason
it must be rejected with; the tests run every case through the filter.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from meloformer_model.atomic import write_bytes_atomic
from meloformer_model.data.filtering import Reason

Event = tuple[int, bytes]  # (delta ticks, event bytes)


def vlq(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def track_chunk(events: list[Event]) -> bytes:
    body = b"".join(vlq(delta) + data for delta, data in events) + b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(body)) + body


def smf(tracks: list[list[Event]], division: int = 480, fmt: int = 1) -> bytes:
    header = b"MThd" + struct.pack(">IHHH", 6, fmt, len(tracks), division)
    return header + b"".join(track_chunk(t) for t in tracks)


def melody(
    n_notes: int = 64, step: int = 480, duration: int = 480, channel: int = 0
) -> list[Event]:
    """A plain scale melody that passes every quality rule on its own (32 s at 120 BPM)."""
    scale = (60, 62, 64, 65, 67, 69, 71, 72, 74, 76)
    events: list[Event] = []
    rest = 0
    for i in range(n_notes):
        pitch = scale[i % len(scale)]
        events.append((rest, bytes([0x90 | channel, pitch, 90])))
        events.append((duration, bytes([0x80 | channel, pitch, 0])))
        rest = step - duration
    return events


def valid_file() -> bytes:
    return smf([[(0, b"\xff\x51\x03\x07\xa1\x20"), (0, b"\xff\x58\x04\x04\x02\x18\x08")], melody()])


def two_notes_huge_delta() -> bytes:
    """Two notes 2^28 ticks apart: parsers accept it and it becomes ~280k empty bars."""
    return smf(
        [
            [
                (0, b"\x90\x3c\x64"),
                (10, b"\x80\x3c\x00"),
                (0x0FFFFFFF, b"\x90\x3e\x64"),
                (10, b"\x80\x3e\x00"),
            ]
        ]
    )


def zero_length_notes() -> bytes:
    return smf([melody(duration=0, step=240)])


def unterminated_notes() -> bytes:
    stuck = [(0, bytes([0x91, 30 + i, 80])) for i in range(40)]
    return smf([melody(), stuck])


def tempo_zero() -> bytes:
    return smf([[(0, b"\xff\x51\x03\x00\x00\x00")], melody()])


def tempo_absurdly_slow() -> bytes:
    return smf([[(0, b"\xff\x51\x03\xff\xff\xff")], melody()])


def time_signature_zero() -> bytes:
    return smf([[(0, b"\xff\x58\x04\x00\x02\x18\x08")], melody()])


def smpte_division() -> bytes:
    return smf([melody()], division=0xE728)


def truncated() -> bytes:
    data = valid_file()
    return data[: len(data) // 2]


def empty_file() -> bytes:
    return b""


def not_midi() -> bytes:
    return b"This is a text file someone renamed to .mid\n" * 4


def bad_header() -> bytes:
    return b"MThd" + bytes(range(64))


def huge_chunk_length() -> bytes:
    """A track that claims 4 GB: a reader that trusts it would allocate or loop for ever."""
    return (
        b"MThd" + struct.pack(">IHHH", 6, 1, 1, 480) + b"MTrk\xff\xff\xff\xff" + b"\x00\x90\x3c\x64"
    )


def running_status_without_status() -> bytes:
    return (
        b"MThd"
        + struct.pack(">IHHH", 6, 0, 1, 480)
        + b"MTrk"
        + struct.pack(">I", 4)
        + b"\x00\x3c\x64\x00"
    )


def no_notes() -> bytes:
    return smf([[(0, b"\xff\x51\x03\x07\xa1\x20"), (480, b"\xff\x2f\x00")]])


CORRUPT_CASES: dict[str, tuple[Callable[[], bytes], Reason]] = {
    "two_notes_huge_delta": (two_notes_huge_delta, Reason.ABSURD_GAP),
    "zero_length_notes": (zero_length_notes, Reason.ZERO_LENGTH_NOTES),
    "unterminated_notes": (unterminated_notes, Reason.UNTERMINATED_NOTES),
    "tempo_zero": (tempo_zero, Reason.INVALID_TEMPO),
    "tempo_absurdly_slow": (tempo_absurdly_slow, Reason.INVALID_TEMPO),
    "time_signature_zero": (time_signature_zero, Reason.INVALID_TIME_SIGNATURE),
    "smpte_division": (smpte_division, Reason.SMPTE_DIVISION),
    "truncated": (truncated, Reason.UNREADABLE),
    "empty_file": (empty_file, Reason.UNREADABLE),
    "not_midi": (not_midi, Reason.UNREADABLE),
    "bad_header": (bad_header, Reason.UNREADABLE),
    "huge_chunk_length": (huge_chunk_length, Reason.UNREADABLE),
    "running_status_without_status": (running_status_without_status, Reason.UNREADABLE),
    "no_notes": (no_notes, Reason.NO_NOTES),
}


def write_corrupt_corpus(out_dir: Path) -> dict[Path, Reason]:
    """Write every case as ``<name>.mid``; return each path with the reason it must get."""
    return {
        write_bytes_atomic(out_dir / f"{name}.mid", make()): reason
        for name, (make, reason) in CORRUPT_CASES.items()
    }
