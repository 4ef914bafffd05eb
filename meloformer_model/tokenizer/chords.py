"""Per-segment chord detection by template matching on pitch-class weights.

Chords are detected over arbitrary time segments (bars, or groups of beats)
so the tokenizer can emit one chord token per segment. Everything is
vectorised over notes and segments because corpora contain files with
~100k notes and ~10k bars; memory stays O(notes + segments).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

CHORD_ROOTS: tuple[str, ...] = (
    "C",
    "C#",
    "D",
    "D#",
    "E",
    "F",
    "F#",
    "G",
    "G#",
    "A",
    "A#",
    "B",
)
# Order is the tie-break priority between templates that score equally
# (e.g. A-C-E-G is A:min7 rather than C:6); see QUALITY_PRIORITY.
CHORD_QUALITIES: tuple[str, ...] = (
    "maj",
    "min",
    "dim",
    "aug",
    "7",
    "maj7",
    "min7",
    "dim7",
    "hdim7",
    "sus2",
    "sus4",
    "7sus4",
    "6",
    "min6",
    "9",
    "maj9",
    "min9",
    "5",
)
CHORD_INTERVALS: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dim7": (0, 3, 6, 9),
    "hdim7": (0, 3, 6, 10),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "7sus4": (0, 5, 7, 10),
    "6": (0, 4, 7, 9),
    "min6": (0, 3, 7, 9),
    "9": (0, 4, 7, 10, 2),
    "maj9": (0, 4, 7, 11, 2),
    "min9": (0, 3, 7, 10, 2),
    "5": (0, 7),
}
NO_CHORD = "N"
# Index 0 is "N"; index 1 + root * len(CHORD_QUALITIES) + quality is "root:quality".
CHORD_NAMES: tuple[str, ...] = (NO_CHORD,) + tuple(
    f"{root}:{quality}" for root in CHORD_ROOTS for quality in CHORD_QUALITIES
)

# Penalty per unit of weight on pitch classes outside the template: keeps
# small templates (e.g. "5") from winning when the third is present.
OUTSIDE_PENALTY = 1.0
# Penalty per missing template tone (as a fraction of template size): keeps
# larger templates (maj7, 6) from winning over a complete triad.
MISSING_PENALTY = 0.3
TIE_TOLERANCE = 1e-9

_N_QUALITIES = len(CHORD_QUALITIES)
# Tie-break level per quality: the CHORD_QUALITIES order, except that sus4 shares sus2's level.
QUALITY_PRIORITY = np.arange(_N_QUALITIES)
QUALITY_PRIORITY[CHORD_QUALITIES.index("sus4")] = CHORD_QUALITIES.index("sus2")


def _build_templates() -> np.ndarray:
    """Binary (216, 12) matrix; row root * 18 + quality is that chord's pitch classes."""
    templates = np.zeros((12 * _N_QUALITIES, 12), dtype=np.float64)
    for q, quality in enumerate(CHORD_QUALITIES):
        intervals = np.asarray(CHORD_INTERVALS[quality])
        for root in range(12):
            templates[root * _N_QUALITIES + q, (root + intervals) % 12] = 1.0
    return templates


CHORD_TEMPLATES = _build_templates()
_TEMPLATE_SIZE = CHORD_TEMPLATES.sum(axis=1)
# Shares sum to 1, so the score is (1 + OUTSIDE_PENALTY) * inside
# - MISSING_PENALTY * missing / size - OUTSIDE_PENALTY: one matmul of
# [shares, share == 0] (m, 24) against this (24, 216) matrix, with no
# (m, 216) temporaries.
_SCORE_MATRIX = np.vstack(
    [
        (1.0 + OUTSIDE_PENALTY) * CHORD_TEMPLATES.T,
        -MISSING_PENALTY * CHORD_TEMPLATES.T / _TEMPLATE_SIZE,
    ]
)


def segment_pitch_class_weights(
    onsets: ArrayLike,
    durations: ArrayLike,
    pitches: ArrayLike,
    velocities: ArrayLike,
    boundaries: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (weights (m, 12), bass MIDI pitch (m,)) for the m segments between boundaries.

    A note adds overlap length x velocity to every segment it overlaps, so
    held, tied and partially overlapping notes count where they sound. The
    bass is the lowest pitch sounding in the segment (-1 where none).
    Notes spanning many segments (e.g. a missing note-off held to the end of
    the file) are handled with difference arrays over segments: only their
    first and last segments are touched individually, so memory stays
    O(notes + segments) whatever the note lengths.
    """
    onsets = np.asarray(onsets, dtype=np.float64)
    offsets = onsets + np.asarray(durations, dtype=np.float64)
    pitches = np.asarray(pitches, dtype=np.int64)
    velocities = np.asarray(velocities, dtype=np.float64)
    boundaries = np.asarray(boundaries, dtype=np.float64)
    n_segments = max(len(boundaries) - 1, 0)

    first = np.maximum(np.searchsorted(boundaries, onsets, side="right") - 1, 0)
    last = np.minimum(np.searchsorted(boundaries, offsets, side="left") - 1, n_segments - 1)
    keep = (last >= first) & (offsets > onsets) & (velocities > 0)
    first, last, onsets, offsets = first[keep], last[keep], onsets[keep], offsets[keep]
    pitches, velocities = pitches[keep], velocities[keep]
    pitch_class = pitches % 12
    spanned = last > first
    rows = n_segments + 1

    def overlap_weight(segment: np.ndarray) -> np.ndarray:
        end = np.minimum(offsets, boundaries[segment + 1])
        return (end - np.maximum(onsets, boundaries[segment])) * velocities

    def scatter(
        segment: np.ndarray, column: np.ndarray, width: int, values: np.ndarray | None = None
    ) -> np.ndarray:
        flat = np.bincount(segment * width + column, weights=values, minlength=rows * width)
        return flat.reshape(rows, width)

    # Segments strictly between a note's first and last get velocity x segment length.
    inner = np.where(spanned, velocities, 0.0)
    held_velocity = np.cumsum(
        scatter(first + 1, pitch_class, 12, inner) - scatter(last, pitch_class, 12, inner), axis=0
    )
    weights = (
        held_velocity[:n_segments] * np.diff(boundaries)[:, None]
        + scatter(first, pitch_class, 12, overlap_weight(first))[:n_segments]
        + scatter(last, pitch_class, 12, np.where(spanned, overlap_weight(last), 0.0))[:n_segments]
    )

    sounding = (
        np.cumsum(scatter(first, pitches, 128) - scatter(last + 1, pitches, 128), axis=0)[
            :n_segments
        ]
        > 0
    )
    present = np.pad(sounding, ((0, 0), (0, 4))).reshape(n_segments, 11, 12).any(axis=1)
    # Float cancellation in the cumulative sum can leave residue where nothing sounds.
    weights[~present] = 0.0
    bass = np.where(sounding.any(axis=1), np.argmax(sounding, axis=1), -1)
    return weights, bass


def score_templates(weights: np.ndarray) -> np.ndarray:
    """Score every (segment, template) pair; weights is (m, 12), result (m, 216).

    score = in-template share - OUTSIDE_PENALTY * out-of-template share
            - MISSING_PENALTY * (silent template tones / template size).
    """
    totals = weights.sum(axis=1, keepdims=True)
    normalised = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    return np.hstack([normalised, normalised == 0]) @ _SCORE_MATRIX - OUTSIDE_PENALTY


def choose_chords(
    scores: np.ndarray, bass: np.ndarray, silent: np.ndarray, bass_aware: bool = True
) -> np.ndarray:
    """Pick one CHORD_NAMES index per segment from (m, 216) scores.

    Among scores within TIE_TOLERANCE of the best, prefer the quality with the best
    QUALITY_PRIORITY (music21's stacked-thirds naming: A-C-E-G is A:min7, not C:6); sus2 and
    sus4 share a level because the same tones are either, depending on the bass. Then, if
    bass_aware, prefer the template rooted on the bass pitch class (this also names symmetric
    chords such as aug and dim7 by their bass), then the lowest root, then the earlier quality.
    """
    tied = scores >= scores.max(axis=1, keepdims=True) - TIE_TOLERANCE
    tied = tied.reshape(-1, 12, _N_QUALITIES)
    rows = np.arange(len(tied))
    level = np.where(tied, QUALITY_PRIORITY, _N_QUALITIES).min(axis=(1, 2))
    candidates = tied & (QUALITY_PRIORITY == level[:, None, None])
    root = np.argmax(candidates.any(axis=2), axis=1)
    if bass_aware:
        bass_root = bass % 12
        root = np.where(candidates[rows, bass_root].any(axis=1), bass_root, root)
    quality = np.argmax(candidates[rows, root], axis=1)
    return np.where(silent, 0, 1 + root * _N_QUALITIES + quality).astype(np.int64)


def detect_chords(
    onsets: ArrayLike,
    durations: ArrayLike,
    pitches: ArrayLike,
    velocities: ArrayLike,
    boundaries: ArrayLike,
    bass_aware: bool = True,
) -> np.ndarray:
    """Return one CHORD_NAMES index (int64) per segment [boundaries[i], boundaries[i+1]).

    Times may be in any unit shared by onsets, durations and boundaries;
    pitches are MIDI numbers 0-127. Pass non-drum notes only: drums have no
    pitch class. Segments with no sounding weight are "N" (0).
    """
    weights, bass = segment_pitch_class_weights(onsets, durations, pitches, velocities, boundaries)
    scores = score_templates(weights)
    return choose_chords(scores, bass, weights.sum(axis=1) <= 0, bass_aware)
