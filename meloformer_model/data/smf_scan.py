"""A structural scan of raw Standard MIDI File bytes.

symusic silently drops notes that are never released and refuses SMPTE files with a generic
message; the quality filter needs both facts by name, so this scan reads the chunk structure and
the note on/off balance directly. It does no musical interpretation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class SmfStructureError(ValueError):
    """The bytes are not a structurally valid SMF (the message says where)."""


@dataclass(frozen=True)
class SmfScan:
    format: int
    n_tracks: int
    division: int
    smpte: bool
    note_ons: int
    unterminated_notes: int


def _read_vlq(data: bytes, i: int, end: int) -> tuple[int, int]:
    value = 0
    for _ in range(4):
        if i >= end:
            raise SmfStructureError(f"variable-length quantity runs past the chunk end at byte {i}")
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i
    raise SmfStructureError(f"variable-length quantity longer than 4 bytes at byte {i}")


def _scan_track(data: bytes, i: int, end: int) -> tuple[int, int]:
    """Return (note-ons, notes still sounding at the end of the track). Running status survives
    meta and sysex events: the SMF spec cancels it there, but real files rely on it and the MIDI
    parsers (symusic, mido) read them so."""
    sounding = [0] * (16 * 128)
    note_ons = 0
    running = 0
    while i < end:
        if data[i] < 0x80:  # delta times of one or two bytes, nearly all of them: no call
            i += 1
        elif i + 1 < end and data[i + 1] < 0x80:
            i += 2
        else:
            _, i = _read_vlq(data, i, end)
        if i >= end:
            raise SmfStructureError(f"event missing after delta time at byte {i}")
        byte = data[i]
        if byte == 0xFF:
            if i + 1 >= end:
                raise SmfStructureError(f"meta event truncated at byte {i + 1}")
            length, i = _read_vlq(data, i + 2, end)
            i += length
        elif byte in (0xF0, 0xF7):
            length, i = _read_vlq(data, i + 1, end)
            i += length
        else:
            if byte & 0x80:
                running = byte
                i += 1
            elif not running:
                raise SmfStructureError(f"running status without a previous status at byte {i}")
            status = running
            kind = status & 0xF0
            if kind in (0xC0, 0xD0):
                i += 1
                continue
            if i + 2 > end:
                raise SmfStructureError(f"channel event truncated at byte {i}")
            key = ((status & 0x0F) << 7) | (data[i] & 0x7F)
            velocity = data[i + 1]
            i += 2
            if kind == 0x90 and velocity:
                sounding[key] += 1
                note_ons += 1
            elif (kind == 0x80 or kind == 0x90) and sounding[key]:
                sounding[key] -= 1
    if i > end:
        raise SmfStructureError("event data runs past the end of its track chunk")
    return note_ons, sum(sounding)


def scan_smf(data: bytes) -> SmfScan:
    """Check chunk structure and count notes that are switched on but never off."""
    if len(data) < 14 or data[:4] != b"MThd":
        raise SmfStructureError("not a MIDI file (no MThd header)")
    header_len, fmt, n_tracks, division = struct.unpack(">IHHH", data[4:14])
    if header_len < 6:
        raise SmfStructureError(f"header chunk length {header_len} < 6")
    if division & 0x8000:
        return SmfScan(fmt, n_tracks, division, True, 0, 0)
    if division == 0:
        raise SmfStructureError("division is 0 ticks per quarter note")
    i = 8 + header_len
    note_ons = unterminated = 0
    tracks_seen = 0
    while i + 8 <= len(data) and tracks_seen < n_tracks:
        chunk_type = data[i : i + 4]
        (length,) = struct.unpack(">I", data[i + 4 : i + 8])
        start, end = i + 8, i + 8 + length
        if end > len(data):
            raise SmfStructureError(
                f"truncated: chunk at byte {i} declares {length} bytes, {len(data) - start} remain"
            )
        if chunk_type == b"MTrk":
            ons, left = _scan_track(data, start, end)
            note_ons += ons
            unterminated += left
            tracks_seen += 1
        i = end
    if tracks_seen < n_tracks:
        raise SmfStructureError(
            f"truncated: header declares {n_tracks} tracks, found {tracks_seen}"
        )
    return SmfScan(fmt, n_tracks, division, False, note_ons, unterminated)
