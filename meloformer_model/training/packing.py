"""How a split's documents become rows: row-sized windows, packed by best fit. Free of torch,
like the training config whose run key names this algorithm (``PACKING``)."""

from __future__ import annotations

import bisect

import numpy as np


def windows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """(doc, start, end) windows of at most seq_len tokens covering every document."""
    rows = []
    for doc, length in enumerate(np.asarray(lengths).tolist()):
        for start in range(0, max(length - 1, 1), seq_len):
            rows.append((doc, start, min(start + seq_len, length)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


OPEN_ROWS = 32  # rows a piece may join while packing: enough for ~3 % padding at 8192 tokens
PACKING = f"best-fit/{OPEN_ROWS}"  # names the plan's algorithm in run keys and checkpoints


def pack(pieces: np.ndarray, seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Best fit over a bounded set of open rows, in the given order: each piece joins the open
    row it leaves least room in; a row closes when full, or (the fullest) when ``OPEN_ROWS``
    rows are open and the piece fits none of them. Closing a row as soon as the next piece does
    not fit left 14 % of an epoch's 8192-token rows as padding on the sample corpus, this
    leaves 3.5 % (``benchmarks/packing.py``), and a row still mixes pieces from nearby in the
    shuffled order. Rows come in the order they close, then the open ones in the order they
    opened."""
    rows: list[list[tuple[int, int, int]]] = []
    open_rows: dict[int, list[tuple[int, int, int]]] = {}
    fill: list[tuple[int, int]] = []  # (tokens used, row serial), sorted
    for serial, (doc, start, end) in enumerate(pieces.tolist()):
        n = end - start
        at = bisect.bisect_right(fill, (seq_len - n, serial)) - 1  # the fullest that fits
        if at >= 0:
            used, row = fill.pop(at)
        else:
            used, row = 0, serial
            open_rows[row] = []
        open_rows[row].append((doc, start, end))
        if used + n == seq_len:
            rows.append(open_rows.pop(row))
            continue
        if len(fill) == OPEN_ROWS:
            rows.append(open_rows.pop(fill.pop()[1]))
        bisect.insort(fill, (used + n, row))
    return rows + list(open_rows.values())
