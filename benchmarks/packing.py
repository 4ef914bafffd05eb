"""Padding left by the training loader's packing, against packing in order.

Every padding token in a training row is computed and thrown away: the tokens/s and the
model-FLOPs utilisation of ``train.py`` count only real tokens, so the padding share of an
epoch's rows comes straight off both. Reference, in the same run: the same shuffled windows
packed in order, a row closed as soon as the next window does not fit (the loader's packing
before best fit). Ours: ``training.packing.pack`` (best fit over ``OPEN_ROWS`` open rows).

Per row length: rows per epoch, padding share, the real tokens a row carries (ours over the
reference: the tokens/s a training step of fixed shape gains) and the time to plan the epoch.
Data: the train split of the sample corpus (``prepare_corpus``, cached under
``build/bench_data`` like ``train.py``) or ``--dataset``; then a corpus of Lakh MIDI's size
(176k documents) with lengths drawn from that split, for the planning time at scale.

Run: ``.venv/bin/python benchmarks/packing.py``; writes ``results/packing.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
from common import machine, print_table, write_result  # noqa: E402

from meloformer_model.paths import SAMPLE_CORPUS_DIR  # noqa: E402
from meloformer_model.training.packing import PACKING, pack, windows  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parent.parent / "build" / "bench_data"
LAKH_DOCUMENTS = 176_581


def in_order(pieces: np.ndarray, seq_len: int) -> list[list[tuple[int, int, int]]]:
    """The reference: a row is closed when the next piece does not fit."""
    rows: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for doc, start, end in pieces.tolist():
        if used + end - start > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((doc, start, end))
        used += end - start
    return rows


def measure(lengths: np.ndarray, seq_len: int, packer, seed: int = 0) -> dict:
    pieces = windows(lengths, seq_len)
    pieces = pieces[np.random.default_rng([seed, 0]).permutation(len(pieces))]
    start = time.perf_counter()
    rows = packer(pieces, seq_len)
    plan_s = time.perf_counter() - start
    tokens = int((pieces[:, 2] - pieces[:, 1]).sum())
    return {
        "windows": len(pieces),
        "rows": len(rows),
        "padding": 1 - tokens / (len(rows) * seq_len),
        "tokens_per_row": tokens / len(rows),
        "plan_s": plan_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default=None, help="an Arrow dataset version folder")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 8192, 32768])
    args = parser.parse_args()
    if args.dataset:
        dataset_path = Path(args.dataset)
    else:
        from meloformer_model.data.pipeline import prepare_corpus

        dataset_path = prepare_corpus(SAMPLE_CORPUS_DIR, DATA_ROOT, workers=2).dataset.path
    lengths = np.asarray(datasets.load_from_disk(str(dataset_path))["train"]["length"])
    lakh = np.random.default_rng(0).choice(lengths, LAKH_DOCUMENTS)

    results, table = {}, []
    for corpus, corpus_lengths in (("sample", lengths), ("lakh-sized", lakh)):
        for seq_len in args.seq_lens:
            ref = measure(corpus_lengths, seq_len, in_order)
            ours = measure(corpus_lengths, seq_len, pack)
            gain = ours["tokens_per_row"] / ref["tokens_per_row"]
            results[f"{corpus}-{seq_len}"] = {
                "documents": len(corpus_lengths),
                "windows": ours["windows"],
                **{f"{name}_in_order": value for name, value in ref.items() if name != "windows"},
                **{f"{name}_best_fit": value for name, value in ours.items() if name != "windows"},
                "tokens_per_row_ratio": gain,
            }
            table.append([corpus, seq_len, ours["windows"], ref["rows"], ours["rows"],
                          f"{ref['padding']:.1%}", f"{ours['padding']:.1%}", f"{gain:.3f}x",
                          f"{ref['plan_s']:.2f}", f"{ours['plan_s']:.2f}"])  # fmt: skip
    print_table(
        ["corpus", "row", "windows", "rows in order", "rows best fit", "padding in order",
         "padding best fit", "real tokens/row", "plan s in order", "plan s best fit"],
        table,
    )  # fmt: skip
    path = write_result(
        "packing",
        {"machine": machine(), "dataset": str(dataset_path), "packing": PACKING,
         "results": results},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
