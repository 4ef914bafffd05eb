"""The quality filter: per-file statistics, named rejection reasons, and note-content dedup.

Rules run in a fixed order and the first failure wins (the upstream convention), with the
structural corruption checks (design.md §5) ahead of the statistical thresholds so that a broken
file is reported as broken rather than as merely "too short".
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from symusic.core import ScoreTick

from meloformer_model.data.midi_io import (
    MidiReadError,
    MidiSource,
    load_score,
    read_bytes,
    source_name,
)
from meloformer_model.data.smf_scan import SmfStructureError, scan_smf
from meloformer_model.data.timeline import bar_lines, bar_of, quantize, seconds_at
from meloformer_model.tokenizer.config import (
    DEFAULT_TIME_SIGNATURES,
    DRUM_INSTRUMENT,
    POSITIONS_PER_QUARTER,
)


class Reason(str, Enum):
    """Machine-readable rejection reasons, in rule order."""

    UNREADABLE = "unreadable"
    SMPTE_DIVISION = "smpte_division"
    NO_NOTES = "no_notes"
    INVALID_TEMPO = "invalid_tempo"
    INVALID_TIME_SIGNATURE = "invalid_time_signature"
    ZERO_LENGTH_NOTES = "zero_length_notes"
    UNTERMINATED_NOTES = "unterminated_notes"
    ABSURD_GAP = "absurd_gap"
    TOO_FEW_BEATS = "too_few_beats"
    TOO_MANY_BEATS = "too_many_beats"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    TOO_FEW_NOTES = "too_few_notes"
    TOO_MANY_NOTES = "too_many_notes"
    TOO_FEW_PITCHES = "too_few_pitches"
    CROSS_BAR_RATE = "cross_bar_rate"
    TOO_FEW_TRACKS = "too_few_tracks"
    TOO_MANY_TRACKS = "too_many_tracks"
    UNSUPPORTED_TIME_SIGNATURE = "unsupported_time_signature"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class FilterConfig:
    """Every threshold of the quality filter: the upstream rules plus corruption checks.

    ``time_signatures`` is the allow-list (``None`` disables it); by default it is the
    tokenizer's vocabulary, so an accepted file is always tokenizable.
    """

    min_beats: float = 16
    max_beats: float = 10_000
    min_seconds: float = 10.0
    max_seconds: float = 1800.0
    min_notes: int = 32
    max_notes: int = 100_000
    min_pitches: int = 8
    max_cross_bar_rate: float = 0.15
    min_tracks: int = 1
    max_tracks: int = 50
    time_signatures: tuple[tuple[int, int], ...] | None = DEFAULT_TIME_SIGNATURES
    min_tempo_bpm: float = 10.0
    max_tempo_bpm: float = 1000.0
    max_zero_length_rate: float = 0.1
    max_unterminated_rate: float = 0.05
    max_gap_beats: float = 256.0
    dedup: bool = True
    hash_positions_per_quarter: int = POSITIONS_PER_QUARTER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileReport:
    """The outcome for one file: stats for every readable file, a reason for every rejection."""

    path: str
    accepted: bool
    reason: str | None = None
    message: str | None = None
    content_hash: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class _Rejected(Exception):
    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _check(ok: bool, reason: Reason, message: str) -> None:
    if not ok:
        raise _Rejected(reason, message)


def content_hash(score: ScoreTick, per_quarter: int = POSITIONS_PER_QUARTER) -> str:
    """Hash of (instrument, onset, duration, pitch) on a beat grid: the same music re-exported
    with another tick resolution, track order, tempo or velocity hashes the same."""
    tpq = score.ticks_per_quarter
    rows = []
    for track in score.tracks:
        if not len(track.notes):
            continue
        arr = track.notes.numpy()
        start = arr["time"].astype(np.int64)
        inst = DRUM_INSTRUMENT if track.is_drum else int(track.program)
        rows.append(
            np.stack(
                [
                    np.full(len(start), inst),
                    quantize(start, tpq, per_quarter),
                    quantize(arr["duration"], tpq, per_quarter),
                    arr["pitch"].astype(np.int64),
                ],
                axis=1,
            )
        )
    table = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)
    table = table[np.lexsort(table.T[::-1])]
    return hashlib.blake2b(table.astype("<i8").tobytes(), digest_size=16).hexdigest()


def _stats(score: ScoreTick) -> dict[str, Any]:
    tpq = score.ticks_per_quarter
    tracks = [t for t in score.tracks if len(t.notes)]
    notes = [t.notes.numpy() for t in tracks]

    def column(name: str) -> np.ndarray:
        parts = [n[name] for n in notes]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    start, dur, pitch = column("time"), column("duration"), column("pitch")
    end_tick = int((start + dur).max()) if len(start) else 0
    tempos = score.tempos.numpy()
    ts = score.time_signatures.numpy()
    mspq = tempos["mspq"].astype(np.float64)
    seconds = float(seconds_at(np.asarray([end_tick]), tempos["time"], np.maximum(mspq, 1), tpq)[0])
    return {
        "notes": int(len(start)),
        "pitches": int(len(np.unique(pitch))),
        "beats": end_tick / tpq,
        "seconds": seconds,
        "tracks": len(tracks),
        "time_signatures": sorted({f"{n}/{d}" for n, d in zip(ts["numerator"], ts["denominator"])}),
        "mean_tempo_bpm": float(np.mean(60e6 / mspq)) if len(mspq) and np.all(mspq > 0) else 120.0,
        "instruments": sorted({int(t.program) for t in tracks if not t.is_drum}),
        "has_drums": any(t.is_drum for t in tracks),
        "ticks_per_quarter": tpq,
        "_start": start,
        "_dur": dur,
    }


def _cross_bar_rate(
    score: ScoreTick,
    start: np.ndarray,
    dur: np.ndarray,
    signatures: tuple[tuple[int, int], ...],
) -> float:
    """Fraction of notes that sound across a bar line (held over, not re-struck), on the
    tokenizer's bar lines: a change inside a bar cuts it when one of ``signatures`` has the cut
    length."""
    if not len(start):
        return 0.0
    ts = score.time_signatures.numpy()
    tpq = score.ticks_per_quarter
    times = ts["time"].astype(np.int64)
    lengths = ts["numerator"].astype(np.int64) * 4 * tpq // np.maximum(ts["denominator"], 1)
    if not len(times) or times[0] > 0:
        times, lengths = np.concatenate(([0], times)), np.concatenate(([4 * tpq], lengths))
    keep = np.append(times[1:] != times[:-1], True)
    end = int((start + dur).max()) + 1
    cuts = {n * 4 * tpq // d for n, d in signatures if n * 4 * tpq % d == 0}
    starts, _ = bar_lines(times[keep], np.maximum(lengths[keep], 1), end, cuts.__contains__)
    last_tick = start + np.maximum(dur, 1) - 1
    return float(np.mean(bar_of(start, starts) != bar_of(last_tick, starts)))


def _apply_rules(score: ScoreTick, scan, stats: dict[str, Any], config: FilterConfig) -> None:
    c = config
    _check(stats["notes"] > 0, Reason.NO_NOTES, "the file contains no notes")
    tempos = score.tempos.numpy()
    mspq = tempos["mspq"].astype(np.float64)
    _check(
        bool(np.all(mspq > 0)), Reason.INVALID_TEMPO, "tempo event of 0 microseconds per quarter"
    )
    bpm = 60e6 / mspq
    bad = bpm[(bpm < c.min_tempo_bpm) | (bpm > c.max_tempo_bpm)]
    if len(bad):
        raise _Rejected(
            Reason.INVALID_TEMPO,
            f"tempo {bad[0]:.3g} BPM outside [{c.min_tempo_bpm:g}, {c.max_tempo_bpm:g}]",
        )
    ts = score.time_signatures.numpy()
    for num, den in zip(ts["numerator"], ts["denominator"]):
        _check(num > 0 and den > 0, Reason.INVALID_TIME_SIGNATURE, f"time signature {num}/{den}")
    start, dur = stats["_start"], stats["_dur"]
    zero_rate = float(np.mean(dur <= 0))
    _check(
        zero_rate <= c.max_zero_length_rate,
        Reason.ZERO_LENGTH_NOTES,
        f"{zero_rate:.0%} of notes have zero length (max {c.max_zero_length_rate:.0%})",
    )
    ons = max(scan.note_ons, 1)
    open_rate = scan.unterminated_notes / ons
    _check(
        open_rate <= c.max_unterminated_rate,
        Reason.UNTERMINATED_NOTES,
        f"{scan.unterminated_notes} of {scan.note_ons} notes are never released",
    )
    onsets = np.unique(start)
    gap = float(np.max(np.diff(onsets), initial=0)) / score.ticks_per_quarter
    _check(
        gap <= c.max_gap_beats,
        Reason.ABSURD_GAP,
        f"{gap:.0f} beats without a note onset (max {c.max_gap_beats:g})",
    )
    beats = stats["beats"]
    _check(beats >= c.min_beats, Reason.TOO_FEW_BEATS, f"{beats:.1f} beats < {c.min_beats:g}")
    _check(beats <= c.max_beats, Reason.TOO_MANY_BEATS, f"{beats:.0f} beats > {c.max_beats:g}")
    secs = stats["seconds"]
    _check(secs >= c.min_seconds, Reason.TOO_SHORT, f"{secs:.1f} s < {c.min_seconds:g} s")
    _check(secs <= c.max_seconds, Reason.TOO_LONG, f"{secs:.0f} s > {c.max_seconds:g} s")
    n = stats["notes"]
    _check(n >= c.min_notes, Reason.TOO_FEW_NOTES, f"{n} notes < {c.min_notes}")
    _check(n <= c.max_notes, Reason.TOO_MANY_NOTES, f"{n} notes > {c.max_notes}")
    p = stats["pitches"]
    _check(p >= c.min_pitches, Reason.TOO_FEW_PITCHES, f"{p} distinct pitches < {c.min_pitches}")
    rate = _cross_bar_rate(score, start, dur, c.time_signatures or DEFAULT_TIME_SIGNATURES)
    stats["cross_bar_rate"] = rate
    _check(
        rate <= c.max_cross_bar_rate,
        Reason.CROSS_BAR_RATE,
        f"cross-bar rate {rate:.2f} > {c.max_cross_bar_rate}",
    )
    t = stats["tracks"]
    _check(t >= c.min_tracks, Reason.TOO_FEW_TRACKS, f"{t} tracks < {c.min_tracks}")
    _check(t <= c.max_tracks, Reason.TOO_MANY_TRACKS, f"{t} tracks > {c.max_tracks}")
    if c.time_signatures is not None:
        allowed = {f"{n}/{d}" for n, d in c.time_signatures}
        unsupported = sorted(set(stats["time_signatures"]) - allowed)
        _check(
            not unsupported,
            Reason.UNSUPPORTED_TIME_SIGNATURE,
            f"time signature(s) {', '.join(unsupported)} not in the allow-list",
        )


def inspect_file(
    src: MidiSource, config: FilterConfig | None = None, path: str | None = None
) -> FileReport:
    """Run every rule on one file. Never raises for bad input: the report carries the reason."""
    name = path or source_name(src)
    try:
        data = read_bytes(src)
    except MidiReadError as exc:
        return FileReport(name, False, Reason.UNREADABLE.value, f"{name}: {exc}")
    return inspect_bytes(data, config, name)[0]


def inspect_bytes(
    data: bytes, config: FilterConfig | None = None, name: str = "<bytes>"
) -> tuple[FileReport, ScoreTick | None]:
    """Like ``inspect_file``, also returning the parsed score so callers need not parse twice."""
    config = config or FilterConfig()
    stats: dict[str, Any] = {}
    score = None
    try:
        try:
            scan = scan_smf(data)
        except SmfStructureError as exc:
            raise _Rejected(Reason.UNREADABLE, str(exc)) from exc
        _check(
            not scan.smpte,
            Reason.SMPTE_DIVISION,
            "SMPTE time division (frames per second) is not supported",
        )
        try:
            score = load_score(data)
        except MidiReadError as exc:
            raise _Rejected(Reason.UNREADABLE, str(exc)) from exc
        stats = _stats(score)
        _apply_rules(score, scan, stats, config)
        digest = content_hash(score, config.hash_positions_per_quarter)
        return FileReport(name, True, content_hash=digest, stats=_public(stats)), score
    except _Rejected as rej:
        report = FileReport(
            name, False, rej.reason.value, f"{name}: {rej.message}", stats=_public(stats)
        )
    except Exception as exc:  # a parser edge case must not stop a corpus run
        report = FileReport(
            name,
            False,
            Reason.UNREADABLE.value,
            f"{name}: unexpected {type(exc).__name__}: {exc}",
            stats=_public(stats),
        )
    return report, score


def _public(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if not k.startswith("_")}
