"""Tests for per-segment chord detection (meloformer_model.tokenizer.chords)."""

from __future__ import annotations

import tracemalloc

import music21
import numpy as np
import pytest

from meloformer_model.tokenizer.chords import (
    CHORD_INTERVALS,
    CHORD_NAMES,
    CHORD_QUALITIES,
    CHORD_ROOTS,
    MISSING_PENALTY,
    NO_CHORD,
    OUTSIDE_PENALTY,
    TIE_TOLERANCE,
    detect_chords,
    score_templates,
    segment_pitch_class_weights,
)

MUSIC21_QUALITY = {
    "major triad": "maj",
    "minor triad": "min",
    "diminished triad": "dim",
    "dominant seventh chord": "7",
    "major seventh chord": "maj7",
    "minor seventh chord": "min7",
    "half-diminished seventh chord": "hdim7",
}


def name_of(pitches: list[int], bass_aware: bool = True) -> str:
    """Detect one chord from simultaneous notes of equal length and velocity."""
    n = len(pitches)
    index = detect_chords(
        np.zeros(n),
        np.ones(n),
        np.asarray(pitches),
        np.full(n, 80),
        np.array([0.0, 1.0]),
        bass_aware=bass_aware,
    )
    return CHORD_NAMES[int(index[0])]


def test_vocabulary_layout() -> None:
    assert len(CHORD_NAMES) == 217 == 1 + len(CHORD_ROOTS) * len(CHORD_QUALITIES)
    assert CHORD_NAMES[0] == NO_CHORD == "N"
    assert CHORD_NAMES[1] == "C:maj"
    assert CHORD_NAMES[1 + 6 * 18 + CHORD_QUALITIES.index("min7")] == "F#:min7"
    assert CHORD_NAMES[-1] == "B:5"
    assert set(CHORD_INTERVALS) == set(CHORD_QUALITIES)


# --- 1. agreement with music21 -------------------------------------------------


def voicings(root: int, quality: str, inversion: int) -> list[list[int]]:
    """Close, open (bass doubled, upper tones spread) and wide-doubled voicings."""
    stacked = sorted(CHORD_INTERVALS[quality])
    order = stacked[inversion:] + stacked[:inversion]
    close = [48 + (root + order[0]) % 12]
    for interval in order[1:]:
        pitch = close[-1] + 1
        while pitch % 12 != (root + interval) % 12:
            pitch += 1
        close.append(pitch)
    open_ = [close[0] - 12, close[0]] + [p + 12 * (i % 2 == 0) for i, p in enumerate(close[1:])]
    wide = [close[0] - 12] + [p + 12 * i for i, p in enumerate(close)] + [close[-1] + 36]
    return [close, open_, wide]


SHARP_SPELLING = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_SPELLING = ("C", "D-", "D", "E-", "E", "F", "G-", "G", "A-", "A", "B-", "B")


def music21_name(pitches: list[int]) -> str | None:
    """music21's name for MIDI pitches, or None if it is not one of MUSIC21_QUALITY.

    MIDI carries no spelling, and music21's root finder works on letter names:
    from raw MIDI numbers it misroots e.g. G#-D-F as "enharmonic equivalent to
    diminished triad E#". So music21 sees the notes spelled all-sharp, all-flat,
    then as raw MIDI numbers (its own, slower, spelling: needed for C#-E#-G#-B),
    and the first spelling it names as a plain (not "enharmonic ...") chord is used.
    """
    spellings = [
        [f"{names[p % 12]}{p // 12 - 1}" for p in pitches]
        for names in (SHARP_SPELLING, FLAT_SPELLING)
    ] + [pitches]
    chords = (music21.chord.Chord(spelling) for spelling in spellings)
    chord = next((c for c in chords if c.commonName in MUSIC21_QUALITY), None)
    if chord is None:
        return None
    return f"{CHORD_ROOTS[chord.root().pitchClass]}:{MUSIC21_QUALITY[chord.commonName]}"


def test_agrees_with_music21_on_unambiguous_chords() -> None:
    qualities = {"maj": 3, "min": 3, "dim": 3, "7": 4, "maj7": 4, "min7": 4, "hdim7": 4}
    cases = agree = 0
    disagreements = []
    for root in range(12):
        for quality, n_inversions in qualities.items():
            for inversion in range(n_inversions):
                for pitches in voicings(root, quality, inversion):
                    reference = music21_name(pitches)
                    ours = name_of(pitches)
                    cases += 1
                    if reference == ours:
                        agree += 1
                    else:
                        disagreements.append((pitches, reference, ours))
    rate = agree / cases
    print(f"music21 agreement: {agree}/{cases} = {rate:.1%}; disagreements: {disagreements[:5]}")
    assert cases == 12 * (3 * 3 + 4 * 4) * 3
    assert rate >= 0.95


# --- 2. exact expectations -----------------------------------------------------


def test_score_formula_values() -> None:
    # C 0.5, E 0.3, F# 0.2 (unnormalised input); G is silent.
    weights = np.zeros((1, 12))
    weights[0, [0, 4, 6]] = [5.0, 3.0, 2.0]
    scores = score_templates(weights)[0]
    c_maj = CHORD_NAMES.index("C:maj") - 1
    c_7 = CHORD_NAMES.index("C:7") - 1
    c_5 = CHORD_NAMES.index("C:5") - 1
    # inside - 1.0 * outside - 0.3 * missing / size
    assert scores[c_maj] == pytest.approx(0.8 - 0.2 - 0.3 / 3)
    assert scores[c_7] == pytest.approx(0.8 - 0.2 - 0.3 * 2 / 4)
    assert scores[c_5] == pytest.approx(0.5 - 0.5 - 0.3 / 2)


@pytest.mark.parametrize(
    ("pitches", "expected"),
    [
        ([60, 64, 67], "C:maj"),
        ([64, 67, 72], "C:maj"),
        ([57, 60, 64, 67], "A:min7"),
        ([60, 67], "C:5"),
        ([60, 64, 67, 70], "C:7"),
        ([60, 64, 67, 71, 74], "C:maj9"),
        ([59, 62, 65, 69], "B:hdim7"),
        ([62, 65, 69, 72], "D:min7"),
        # sus2 and sus4 share tones: the bass decides between them.
        ([60, 65, 67], "C:sus4"),
        ([53, 60, 67], "F:sus2"),
        ([55, 60, 62], "G:sus4"),
        ([48, 55, 62], "C:sus2"),
        ([60, 64, 67, 69], "A:min7"),
        ([48, 60, 64, 67, 72, 76], "C:maj"),
    ],
)
def test_exact_chords(pitches: list[int], expected: str) -> None:
    assert name_of(pitches) == expected


def test_bass_resolves_symmetric_chords() -> None:
    assert name_of([64, 68, 72]) == "E:aug"
    assert name_of([64, 68, 72], bass_aware=False) == "C:aug"
    assert name_of([63, 66, 69, 72]) == "D#:dim7"
    assert name_of([63, 66, 69, 72], bass_aware=False) == "C:dim7"


def test_empty_and_silent_segments_are_no_chord() -> None:
    result = detect_chords(
        np.array([0.0, 0.0]),
        np.array([1.0, 1.0]),
        np.array([60, 64]),
        np.array([0, 0]),
        np.array([0.0, 1.0, 2.0]),
    )
    assert result.tolist() == [0, 0]
    nothing = np.array([])
    empty = detect_chords(nothing, nothing, nothing.astype(int), nothing, np.array([0, 4, 8]))
    assert empty.dtype == np.int64
    assert empty.tolist() == [0, 0]


def test_held_note_counts_in_every_segment_it_overlaps() -> None:
    # C held through both bars; bar 0 adds E-G, bar 1 adds Eb-G.
    onsets = np.array([0, 0, 0, 4, 4])
    durations = np.array([8, 4, 4, 4, 4])
    pitches = np.array([48, 64, 67, 63, 67])
    result = detect_chords(onsets, durations, pitches, np.full(5, 90), np.array([0, 4, 8]))
    assert [CHORD_NAMES[i] for i in result] == ["C:maj", "C:min"]


def test_note_ending_on_a_boundary_does_not_reach_the_next_segment() -> None:
    # Low C ends exactly at 4; it must not become the bass of the E-G#-C augmented chord.
    onsets = np.array([0, 0, 4, 4, 4])
    durations = np.array([4, 4, 4, 4, 4])
    pitches = np.array([36, 60, 64, 68, 72])
    weights, bass = segment_pitch_class_weights(
        onsets, durations, pitches, np.full(5, 80), [0, 4, 8]
    )
    assert bass.tolist() == [36, 64]
    assert weights[1, 0] == 320.0  # only the C5 inside the chord
    result = detect_chords(onsets, durations, pitches, np.full(5, 80), np.array([0, 4, 8]))
    assert [CHORD_NAMES[i] for i in result] == ["C:5", "E:aug"]


def test_weights_are_overlap_times_velocity() -> None:
    # One note from 3 to 13 at velocity 50 across segments [0,4) [4,8) [8,12) [12,16).
    weights, bass = segment_pitch_class_weights(
        np.array([3.0]),
        np.array([10.0]),
        np.array([62]),
        np.array([50]),
        np.array([0.0, 4.0, 8.0, 12.0, 16.0]),
    )
    assert weights[:, 2].tolist() == [50.0, 200.0, 200.0, 50.0]
    assert weights.sum() == 500.0
    assert bass.tolist() == [62, 62, 62, 62]


def test_float_cancellation_leaves_no_phantom_weight() -> None:
    # Many long notes with float times and velocities end before bar 20; bars 20-29 are silent.
    rng = np.random.default_rng(5)
    onsets = rng.uniform(0, 10, 200)
    durations = np.minimum(rng.uniform(0.5, 10, 200), 19.9 - onsets)
    pitches = rng.integers(40, 80, 200)
    velocities = rng.uniform(0.1, 1.0, 200)
    boundaries = np.arange(31.0)
    weights, bass = segment_pitch_class_weights(onsets, durations, pitches, velocities, boundaries)
    assert (weights[20:] == 0).all()
    assert (bass[20:] == -1).all()
    assert (detect_chords(onsets, durations, pitches, velocities, boundaries)[20:] == 0).all()


@pytest.mark.parametrize(
    ("e_duration", "e_velocity", "expected"),
    [
        (1, 120, "C:min"),  # loud short E (120) loses to quiet long Eb (4 x 40 = 160)
        (2, 120, "C:maj"),  # E at 240 beats Eb at 160 although it is shorter
    ],
)
def test_overlap_times_velocity_decides(e_duration: int, e_velocity: int, expected: str) -> None:
    onsets = np.array([0, 0, 0, 0])
    durations = np.array([4, 4, e_duration, 4])
    pitches = np.array([48, 55, 64, 63])
    velocities = np.array([80, 80, e_velocity, 40])
    result = detect_chords(onsets, durations, pitches, velocities, np.array([0, 4]))
    assert CHORD_NAMES[int(result[0])] == expected


# --- 3. multi-segment input and reference loop ---------------------------------


def test_three_bars_in_one_call() -> None:
    bars = [[60, 64, 67], [57, 60, 64], [55, 59, 62, 65]]
    onsets = np.concatenate([np.full(len(b), 480 * 4 * i) for i, b in enumerate(bars)])
    durations = np.full(len(onsets), 1920)
    pitches = np.concatenate(bars)
    velocities = np.full(len(onsets), 100)
    result = detect_chords(onsets, durations, pitches, velocities, np.array([0, 1920, 3840, 5760]))
    assert [CHORD_NAMES[i] for i in result] == ["C:maj", "A:min", "G:7"]


def reference_detect(
    onsets, durations, pitches, velocities, boundaries, bass_aware: bool = True
) -> list[int]:
    """Straightforward per-segment loop with the same scoring rule."""
    templates = []
    for r in range(12):
        for q, quality in enumerate(CHORD_QUALITIES):
            tones = {(r + i) % 12 for i in CHORD_INTERVALS[quality]}
            templates.append((r, q, tones))
    result = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        weight = [0.0] * 12
        bass = None
        for on, dur, pitch, vel in zip(onsets, durations, pitches, velocities):
            overlap = min(on + dur, end) - max(on, start)
            if overlap > 0 and vel > 0:
                weight[pitch % 12] += overlap * vel
                bass = pitch if bass is None else min(bass, pitch)
        total = sum(weight)
        if total == 0:
            result.append(0)
            continue
        w = [x / total for x in weight]
        scores = []
        for _, _, tones in templates:
            inside = sum(w[pc] for pc in tones)
            missing = sum(1 for pc in tones if w[pc] == 0)
            penalty = OUTSIDE_PENALTY * (1 - inside) + MISSING_PENALTY * missing / len(tones)
            scores.append(inside - penalty)
        best = max(scores)
        level = {q: q for q in range(len(CHORD_QUALITIES))}
        level[CHORD_QUALITIES.index("sus4")] = CHORD_QUALITIES.index("sus2")
        candidates = [
            (level[q], bass_aware and r != bass % 12, r, q, j)
            for j, ((r, q, _), s) in enumerate(zip(templates, scores))
            if s >= best - TIE_TOLERANCE
        ]
        result.append(1 + min(candidates)[4])
    return result


@pytest.mark.parametrize("bass_aware", [True, False])
def test_vectorised_matches_reference_loop(bass_aware: bool) -> None:
    rng = np.random.default_rng(1234)
    lengths = rng.choice([2, 3, 4, 6], size=50)
    boundaries = np.concatenate([[0], np.cumsum(lengths)])
    n = 400
    onsets = rng.integers(-2, boundaries[-1] + 2, size=n)
    durations = rng.choice([0, 1, 2, 3, 8, 25], size=n, p=[0.05, 0.3, 0.3, 0.2, 0.1, 0.05])
    # Mostly tones of a per-segment triad so segments carry real chords, plus noise.
    segment_of = np.clip(np.searchsorted(boundaries, onsets, side="right") - 1, 0, 49)
    roots = rng.integers(0, 12, size=50)
    chord_tone = rng.choice([0, 3, 4, 7, 10, 11], size=n)
    noise = rng.integers(30, 90, size=n)
    pitches = np.where(rng.random(n) < 0.8, 48 + roots[segment_of] + chord_tone, noise)
    velocities = rng.integers(0, 128, size=n)
    ours = detect_chords(onsets, durations, pitches, velocities, boundaries, bass_aware=bass_aware)
    expected = reference_detect(onsets, durations, pitches, velocities, boundaries, bass_aware)
    assert ours.tolist() == expected
    assert len(set(expected)) > 10


# --- 4. scale -----------------------------------------------------------------


def test_scale_without_notes_by_segments_matrix() -> None:
    rng = np.random.default_rng(0)
    n_notes, n_segments = 100_000, 5_000
    boundaries = np.arange(n_segments + 1) * 1920.0
    onsets = rng.uniform(0, boundaries[-1], size=n_notes)
    durations = rng.exponential(480.0, size=n_notes)
    durations[:1000] = boundaries[-1]  # stuck notes held to the end of the file
    pitches = rng.integers(21, 109, size=n_notes)
    velocities = rng.integers(1, 128, size=n_notes)
    tracemalloc.start()
    result = detect_chords(onsets, durations, pitches, velocities, boundaries)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.shape == (n_segments,)
    assert result.dtype == np.int64
    assert (result > 0).all()
    assert peak < 200e6 < n_notes * n_segments  # a bool notes x segments matrix alone is 500 MB


# --- segments inside a bar -------------------------------------------------------


def test_segments_inside_a_bar_get_their_own_chords() -> None:
    # C major for two beats then F major for two beats inside one 4/4 bar.
    boundaries = np.array([0, 2, 4])
    pitches = np.array([60, 64, 67, 60, 65, 69])
    onsets = np.array([0, 0, 0, 2, 2, 2])
    result = detect_chords(onsets, np.full(6, 2), pitches, np.full(6, 70), boundaries)
    assert [CHORD_NAMES[i] for i in result] == ["C:maj", "F:maj"]
