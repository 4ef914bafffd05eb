"""Bar lines and grids: the time arithmetic shared by the quality filter and the tokenizer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def quantize(ticks: np.ndarray, tpq: int, per_quarter: int) -> np.ndarray:
    """Ticks to grid units, rounding halves up, in exact integer arithmetic."""
    ticks = np.asarray(ticks, dtype=np.int64)
    return (ticks * per_quarter * 2 + tpq) // (2 * tpq)


def bar_lines(
    change_times: np.ndarray,
    bar_lengths: np.ndarray,
    end: int,
    can_cut: Callable[[int], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bar start times covering ``[0, end)`` and, per bar, the index of its time signature.

    ``change_times`` (ascending, first one 0) and ``bar_lengths`` describe the time-signature
    changes. A change that falls inside a bar marks a bar line there (a shortened bar, as score
    exports write one) when ``can_cut`` accepts the shortened bar's length; otherwise it takes
    effect at the next bar line. Note times are never moved. There is always at least one bar.
    """
    starts: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    n_changes = len(change_times)
    end = max(int(end), 1)
    t, k = 0, 0
    while t < end:
        length = int(bar_lengths[k])
        last = k + 1 >= n_changes
        limit = end if last else min(int(change_times[k + 1]), end)
        count = max(0, -(-(limit - t) // length))
        starts.append(t + length * np.arange(count, dtype=np.int64))
        owners.append(np.full(count, k, dtype=np.int64))
        short = (limit - t) % length
        cut = not last and limit < end and short and can_cut is not None and can_cut(short)
        t = limit if cut else t + count * length
        if last:
            break
        k += 1
        while k + 1 < n_changes and change_times[k + 1] <= t:
            k += 1
    return np.concatenate(starts), np.concatenate(owners)


def bar_of(times: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index of the bar containing each time."""
    return np.searchsorted(starts, times, side="right") - 1


def seconds_at(
    ticks: np.ndarray, tempo_times: np.ndarray, mspq: np.ndarray, tpq: int
) -> np.ndarray:
    """Wall-clock seconds at each tick under a tempo map (120 BPM before the first tempo)."""
    times = np.concatenate(([0], np.asarray(tempo_times, dtype=np.int64)))
    tempi = np.concatenate(([500_000], np.asarray(mspq, dtype=np.float64))).astype(np.float64)
    keep = np.ones(len(times), dtype=bool)
    keep[:-1] = times[1:] != times[:-1]
    times, tempi = times[keep], tempi[keep]
    seg_seconds = np.diff(times) * tempi[:-1] / 1e6 / tpq
    cum = np.concatenate(([0.0], np.cumsum(seg_seconds)))
    ticks = np.asarray(ticks, dtype=np.int64)
    idx = np.searchsorted(times, ticks, side="right") - 1
    return cum[idx] + (ticks - times[idx]) * tempi[idx] / 1e6 / tpq
