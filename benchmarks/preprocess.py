"""Preprocessing throughput on the sample corpus, single core, against MidiTok REMI+ with chords.

Stages: read (parse bytes), filter (scan + parse + rules + content hash), chords (per-bar
detection on parsed notes), tokenize (HID encode of a parsed score, chords included), and the
whole chain from a path (read + filter + tokenize with one parse). MidiTok 3.x REMI+ (programs,
time signatures, tempos, chords; one token stream) parses and tokenizes the same files.
Goal: chain >= 2x MidiTok per core. Run: `make bench` (installs MidiTok from the bench extra).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, machine, pin_single_core, print_table, write_result  # noqa: E402

pin_single_core()

import numpy as np  # noqa: E402
from symusic import Score  # noqa: E402

from meloformer_model.data.filtering import FilterConfig, inspect_bytes  # noqa: E402
from meloformer_model.data.midi_io import find_midi_files  # noqa: E402
from meloformer_model.paths import SAMPLE_CORPUS_DIR  # noqa: E402
from meloformer_model.tokenizer.chords import detect_chords  # noqa: E402
from meloformer_model.tokenizer.hid import HIDTokenizer  # noqa: E402

GOAL_RATIO = 2.0


def miditok_tokenizer():
    try:
        from miditok import REMI, TokenizerConfig
    except ImportError as exc:  # the reference is an optional dependency
        raise SystemExit(
            f"preprocess.py times MidiTok as its reference ({exc}): install the bench extra, "
            "pip install -e '.[bench]' (make bench does)"
        ) from None

    config = TokenizerConfig(
        use_chords=True,
        use_programs=True,
        use_tempos=True,
        use_time_signatures=True,
        one_token_stream_for_programs=True,
    )
    return REMI(config)


def chord_inputs(scores: list) -> list[tuple]:
    """Per file: notes in ticks and 4/4-or-first-time-signature bar boundaries."""
    inputs = []
    for score in scores:
        tpq = score.ticks_per_quarter
        cols = [t.notes.numpy() for t in score.tracks if not t.is_drum and len(t.notes)]
        if not cols:
            continue
        onset = np.concatenate([c["time"] for c in cols]).astype(np.int64)
        dur = np.concatenate([c["duration"] for c in cols]).astype(np.int64)
        pitch = np.concatenate([c["pitch"] for c in cols]).astype(np.int64)
        vel = np.concatenate([c["velocity"] for c in cols]).astype(np.int64)
        bar = 4 * tpq
        bounds = np.arange(0, int((onset + dur).max()) + bar, bar)
        inputs.append((onset, dur, pitch, vel, bounds))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default=str(SAMPLE_CORPUS_DIR))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    paths = find_midi_files([args.corpus])
    blobs = [p.read_bytes() for p in paths]
    n = len(paths)
    config = FilterConfig()
    tokenizer = HIDTokenizer()
    scores = [Score.from_midi(b) for b in blobs]
    chords_in = chord_inputs(scores)
    n_bars = sum(len(c[4]) - 1 for c in chords_in)
    tokens = [0]

    def read():
        for b in blobs:
            Score.from_midi(b)

    def filt():
        for p, b in zip(paths, blobs):
            inspect_bytes(b, config, str(p))

    def chords():
        for c in chords_in:
            detect_chords(*c)

    def tokenize():
        tokens[0] = sum(len(tokenizer.encode(s)) for s in scores)

    def chain():
        for p in paths:
            report, score = inspect_bytes(p.read_bytes(), config, str(p))
            if report.accepted:
                tokenizer.encode(score)

    remi = miditok_tokenizer()

    def miditok():
        for p in paths:
            remi.encode(p)

    stages = {
        "read": read,
        "filter": filt,
        "chords": chords,
        "tokenize": tokenize,
        "chain (read+filter+chords+tokenize)": chain,
        "MidiTok REMI+ with chords": miditok,
    }
    seconds = {name: best_time(fn, args.repeats) for name, fn in stages.items()}
    chain_rate = n / seconds["chain (read+filter+chords+tokenize)"]
    miditok_rate = n / seconds["MidiTok REMI+ with chords"]
    rows = []
    for name, secs in seconds.items():
        extra = f"{secs / n_bars * 1e6:.1f} us/bar" if name == "chords" else ""
        rows.append([name, n / secs, secs / n * 1e3, f"{(n / secs) / miditok_rate:.2f}x", extra])
    print(
        f"{n} files from {args.corpus}, one core, best of {args.repeats}; {tokens[0]:,} HID tokens"
    )
    print_table(["stage", "files/s", "ms/file", "vs MidiTok", "note"], rows)
    ratio = chain_rate / miditok_rate
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    print(f"chain / MidiTok = {ratio:.2f}x ({verdict} the >= {GOAL_RATIO:.0f}x goal)")
    path = write_result(
        "preprocess",
        {
            "benchmark": "preprocess",
            "files": n,
            "hid_tokens": tokens[0],
            "bars": n_bars,
            "repeats": args.repeats,
            "machine": machine(),
            "versions": {pkg: md.version(pkg) for pkg in ("symusic", "miditok", "numpy")},
            "files_per_second": {name: n / s for name, s in seconds.items()},
            "chord_us_per_bar": seconds["chords"] / n_bars * 1e6,
            "chain_vs_miditok": ratio,
            "goal_ratio": GOAL_RATIO,
            "goal_met": ratio >= GOAL_RATIO,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
