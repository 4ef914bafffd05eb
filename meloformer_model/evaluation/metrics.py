"""Musical metrics for comparing generated pieces with real ones (design.md §6).

All metrics work on the tokenizer's grid (``HIDTokenizer.layout``), so real and generated music
are measured on the same bars and positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from meloformer_model.tokenizer.config import DRUM_INSTRUMENT
from meloformer_model.tokenizer.hid import HIDTokenizer, Layout

MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])


@dataclass
class Piece:
    """A piece on the grid: its layout and its per-bar note sets."""

    layout: Layout
    beat_units: int

    @property
    def pitched(self) -> np.ndarray:
        return self.layout.notes.instrument != DRUM_INSTRUMENT


def piece(tokenizer: HIDTokenizer, score) -> Piece:
    return Piece(tokenizer.layout(score), tokenizer.config.positions_per_quarter)


def bars_from(p: Piece, first: int) -> Piece:
    """The piece from bar ``first`` on, its times shifted to start at 0: a continuation measured
    without the prompt it shares with the real piece. Notes starting earlier are left out."""
    lay = p.layout
    if not 0 <= first < len(lay.starts):
        raise ValueError(f"bar {first} of a piece of {len(lay.starts)} bars")
    offset = int(lay.bounds[first])
    keep = lay.notes.onset >= offset
    notes = type(lay.notes)(**{name: values[keep] for name, values in vars(lay.notes).items()})
    notes.onset = notes.onset - offset
    layout = replace(lay, notes=notes, starts=lay.starts[first:] - offset,
                     bar_ts=lay.bar_ts[first:], bounds=lay.bounds[first:] - offset,
                     end=max(lay.end - offset, 1))  # fmt: skip
    return Piece(layout, p.beat_units)


def pitch_class_histogram(p: Piece) -> np.ndarray:
    pitches = p.layout.notes.pitch[p.pitched]
    hist = np.bincount(pitches % 12, minlength=12).astype(np.float64)
    return hist / hist.sum() if hist.sum() else hist


def pitch_class_entropy(p: Piece) -> float:
    """Entropy in bits of the pitched notes' pitch classes (log2 12 = 3.58 when all are even)."""
    hist = pitch_class_histogram(p)
    nz = hist[hist > 0]
    return float(-(nz * np.log2(nz)).sum())


def scale_consistency(p: Piece) -> float:
    """Largest fraction of pitched notes inside one major or minor scale."""
    pcs = p.layout.notes.pitch[p.pitched] % 12
    if not len(pcs):
        return 0.0
    best = 0.0
    for root in range(12):
        for scale in (MAJOR, MINOR):
            best = max(best, float(np.isin(pcs, (scale + root) % 12).mean()))
    return best


def _onset_grid(p: Piece) -> np.ndarray:
    """(bars, max bar length) binary onset patterns."""
    lay = p.layout
    lengths = np.diff(lay.bounds)
    grid = np.zeros((len(lay.starts), int(lengths.max())), dtype=bool)
    bar = np.searchsorted(lay.starts, lay.notes.onset, side="right") - 1
    grid[bar, lay.notes.onset - lay.starts[bar]] = True
    return grid


def groove_consistency(p: Piece) -> float:
    """1 − mean Hamming distance between consecutive bars' onset patterns."""
    grid = _onset_grid(p)
    if len(grid) < 2:
        return 1.0
    return float(1 - np.mean(np.mean(grid[1:] != grid[:-1], axis=1)))


def _sounding_per_beat(p: Piece) -> np.ndarray:
    notes = p.layout.notes
    end = int(p.layout.bounds[-1])
    beats = -(-end // p.beat_units)
    diff = np.zeros(beats + 1, dtype=np.int64)
    first = notes.onset // p.beat_units
    last = (notes.onset + notes.duration - 1) // p.beat_units
    np.add.at(diff, first, 1)
    np.add.at(diff, np.minimum(last + 1, beats), -1)
    return np.cumsum(diff)[:beats]


def empty_beat_rate(p: Piece) -> float:
    """Fraction of beats in which no note sounds."""
    sounding = _sounding_per_beat(p)
    return float(np.mean(sounding == 0)) if len(sounding) else 1.0


def polyphony(p: Piece) -> float:
    """Mean number of pitched notes sounding at each onset time."""
    notes = p.layout.notes
    on, end = notes.onset[p.pitched], (notes.onset + notes.duration)[p.pitched]
    times = np.unique(on)
    if not len(times):
        return 0.0
    starts = np.searchsorted(np.sort(on), times, side="right")
    ended = np.searchsorted(np.sort(end), times, side="right")
    return float(np.mean(starts - ended))


def pitch_range(p: Piece) -> float:
    """Semitones from the lowest to the highest pitched note."""
    pitches = p.layout.notes.pitch[p.pitched]
    return float(pitches.max() - pitches.min()) if len(pitches) else 0.0


def piece_metrics(p: Piece) -> dict[str, float]:
    return {name: float(fn(p)) for name, fn in METRICS.items()}


METRICS = {
    "pitch_class_entropy": pitch_class_entropy,
    "scale_consistency": scale_consistency,
    "groove_consistency": groove_consistency,
    "empty_beat_rate": empty_beat_rate,
    "polyphony": polyphony,
    "pitch_range": pitch_range,
}


def meaning(name: str) -> str:
    """What a metric measures, for reports: the first line of its docstring."""
    return (METRICS[name].__doc__ or "").strip().split("\n")[0]


def overlapping_area(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two normalised histograms (1 = identical)."""
    return float(np.minimum(a, b).sum())


def bar_note_sets(p: Piece) -> list[set[tuple[int, int, int]]]:
    """Per bar: the set of (onset in bar, pitch, duration) of its notes."""
    lay, notes = p.layout, p.layout.notes
    bar = np.searchsorted(lay.starts, notes.onset, side="right") - 1
    sets: list[set] = [set() for _ in lay.starts]
    for b, pos, pitch, dur in zip(bar.tolist(), (notes.onset - lay.starts[bar]).tolist(),
                                  notes.pitch.tolist(), notes.duration.tolist()):  # fmt: skip
        sets[b].add((pos, pitch, dur))
    return sets


def similarity_by_distance(p: Piece, max_distance: int) -> np.ndarray:
    """L_t: mean Jaccard similarity of bar pairs t bars apart, t = 1..max_distance (nan if none)."""
    sets = bar_note_sets(p)
    out = np.full(max_distance, np.nan)
    for t in range(1, max_distance + 1):
        scores = [len(a & b) / len(a | b) for a, b in zip(sets, sets[t:]) if a or b]
        if scores:
            out[t - 1] = float(np.mean(scores))
    return out


def _mean_ignoring_nan(rows: list[np.ndarray]) -> np.ndarray:
    """Column means over the pieces that have bar pairs at that distance (nan where none do)."""
    stacked = np.vstack(rows)
    counts = (~np.isnan(stacked)).sum(axis=0)
    sums = np.nansum(stacked, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def similarity_error(
    generated: list[Piece], real: list[Piece], max_distance: int = 16
) -> float | None:
    """MuseFormer's SE: mean over t of |L_t(generated) − L_t(real)|, each averaged over pieces.
    None where no distance has bar pairs in both sets (every piece under two bars): a NaN would
    reach the JSON report as a token no JSON reader accepts."""
    gen = _mean_ignoring_nan([similarity_by_distance(p, max_distance) for p in generated])
    ref = _mean_ignoring_nan([similarity_by_distance(p, max_distance) for p in real])
    valid = ~np.isnan(gen) & ~np.isnan(ref)
    return float(np.mean(np.abs(gen[valid] - ref[valid]))) if valid.any() else None


def similarity_error_text(value: float | None) -> str:
    """SE as the reports print it."""
    return "n/a (no piece has two bars)" if value is None else f"{value:.4f}"


def compare_sets(generated: list[Piece], real: list[Piece]) -> dict:
    """Per-metric means for both sets, PCH overlapping area and SE."""
    gen_values = [piece_metrics(p) for p in generated]
    real_values = [piece_metrics(p) for p in real]
    rows = {
        name: {"generated": float(np.mean([v[name] for v in gen_values])),
               "real": float(np.mean([v[name] for v in real_values]))}
        for name in METRICS
    }  # fmt: skip
    gen_hist = np.mean([pitch_class_histogram(p) for p in generated], axis=0)
    real_hist = np.mean([pitch_class_histogram(p) for p in real], axis=0)
    return {
        "metrics": rows,
        "pitch_class_overlap": overlapping_area(gen_hist, real_hist),
        "similarity_error": similarity_error(generated, real),
    }
