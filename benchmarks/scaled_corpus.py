"""A corpus scaled up from the sample: transposed and time-stretched copies, deterministic.

Every copy has different note content on the filter's beat grid, so the dedup keeps it:

- transposition by a semitone offset (non-drum tracks) changes every pitch;
- a 2x time stretch halves ``ticks_per_quarter`` (every note lasts twice as many quarters) and
  halves the time-signature denominators (4/4 -> 4/2, 3/4 -> 3/2, 6/8 -> 6/4), so bars hold the
  same music; the tempo doubles so the piece lasts about as long in seconds;
- a tempo scale (0.85-1.15, from the seed) varies the length in seconds; alone it would not make
  a copy distinct (the content hash ignores tempo), it only makes the copies less uniform;
- beyond the 48 pitch/stretch variants (about 20k files), 1-5 empty lead-in bars (of the first
  time signature) move every onset, so the corpus reaches 100k+ distinct pieces.

The order of the files is fixed by the seed: variant by variant, the sample's files in a seeded
permutation, so a smaller corpus is a prefix of a larger one and the files a refresh adds are
the next ones in the same order. Variant 0 is the sample file itself (its bytes, copied).

    python benchmarks/scaled_corpus.py --files 10240 --out /tmp/corpus
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from symusic import Score

from meloformer_model.data.midi_io import find_midi_files
from meloformer_model.paths import SAMPLE_CORPUS_DIR

EXTRA_OFFSETS = (6, -7, 7, -8, 8, -9, 9, -10, 10, -11, 11, -12)
LEAD_IN_BARS = 6
# (stretch, semitones): the original, transpositions -6..+5, the same stretched 2x, then wider
# transpositions at both stretches.
PITCH_AND_STRETCH: tuple[tuple[int, int], ...] = (
    ((1, 0),)
    + tuple((1, o) for o in range(-6, 6) if o)
    + tuple((2, o) for o in range(-6, 6))
    + tuple((s, o) for o in EXTRA_OFFSETS for s in (1, 2))
)
# (stretch, semitones, lead-in bars): all of the above without a lead-in first, so a corpus of
# up to ~20k files is the same as before lead-ins existed
VARIANTS: tuple[tuple[int, int, int], ...] = tuple(
    (s, o, lead) for lead in range(LEAD_IN_BARS) for s, o in PITCH_AND_STRETCH
)
HALVED_DENOMINATOR = {2: 1, 4: 2, 8: 4, 16: 8}
TEMPO_SCALE = (0.85, 1.15)


@dataclass(frozen=True)
class Entry:
    """One file of the scaled corpus: which sample file, how it is varied, where it goes."""

    source: Path
    stretch: int
    offset: int
    tempo_scale: float
    lead_in: int = 0

    @property
    def original(self) -> bool:
        return (self.stretch, self.offset, self.lead_in) == (1, 0, 0)

    @property
    def relpath(self) -> str:
        if self.original:
            return f"original/{self.source.name}"
        lead = f"_l{self.lead_in}" if self.lead_in else ""
        return f"x{self.stretch}_t{self.offset:+d}{lead}/{self.source.name}"


def _pitch_range(score: Score) -> tuple[int, int]:
    lo, hi = 127, 0
    for track in score.tracks:
        if track.is_drum or not len(track.notes):
            continue
        pitch = track.notes.numpy()["pitch"]
        lo, hi = min(lo, int(pitch.min())), max(hi, int(pitch.max()))
    return lo, hi


def plan(files: int, seed: int = 0, sources: list[Path] | None = None) -> list[Entry]:
    """The first ``files`` entries of the seeded order (variants that leave 0-127 are skipped)."""
    sources = sources or find_midi_files([SAMPLE_CORPUS_DIR])
    ranges = {p: _pitch_range(Score(str(p))) for p in sources}
    entries: list[Entry] = []
    for index, (stretch, offset, lead_in) in enumerate(VARIANTS):
        order = list(sources)
        random.Random(f"{seed}:{index}").shuffle(order)
        for source in order:
            lo, hi = ranges[source]
            if lo + offset < 0 or hi + offset > 127:
                continue
            scale = 1.0
            if index:
                scale = random.Random(f"{seed}:{index}:{source.name}").uniform(*TEMPO_SCALE)
            entries.append(Entry(source, stretch, offset, round(scale, 4), lead_in))
            if len(entries) == files:
                return entries
    raise ValueError(
        f"{files} files asked, only {len(entries)} variants of {len(sources)} files available"
    )


def render(entry: Entry) -> Score:
    score = Score(str(entry.source))
    if entry.offset:
        for track in score.tracks:
            if not track.is_drum:
                track.shift_pitch(entry.offset, inplace=True)
    tempo = entry.tempo_scale
    if entry.stretch == 2:
        if score.ticks_per_quarter % 2:
            score = score.resample(score.ticks_per_quarter * 2)
        score.ticks_per_quarter = score.ticks_per_quarter // 2
        for ts in score.time_signatures:
            ts.denominator = HALVED_DENOMINATOR.get(ts.denominator, ts.denominator)
        tempo *= 2
    for t in score.tempos:
        t.qpm = t.qpm * tempo
    if entry.lead_in:
        _prepend_bars(score, entry.lead_in)
    return score


def _prepend_bars(score: Score, bars: int) -> None:
    """Empty bars before the music: the events at time 0 (tempo, meter, key) govern them."""
    first = score.time_signatures[0] if len(score.time_signatures) else None
    numerator, denominator = (first.numerator, first.denominator) if first else (4, 4)
    lead = bars * numerator * score.ticks_per_quarter * 4 // denominator
    for track in score.tracks:
        track.shift_time(lead, inplace=True)
    for events in (score.tempos, score.time_signatures, score.key_signatures, score.markers):
        for event in events:
            if event.time > 0:
                event.time += lead


def write(entries: list[Entry], out: Path) -> int:
    """Write the entries under ``out`` (files already there are kept); return how many written."""
    written = 0
    for entry in entries:
        target = out / entry.relpath
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        if entry.original:
            shutil.copyfile(entry.source, tmp)
        else:
            render(entry).dump_midi(str(tmp))
        os.replace(tmp, target)
        written += 1
    return written


def link(entries: list[Entry], pool: Path, corpus: Path) -> None:
    """Hard-link the entries' files from a generated pool into a corpus folder."""
    for entry in entries:
        target = corpus / entry.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(pool / entry.relpath, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    entries = plan(args.files, args.seed)
    n = write(entries, Path(args.out))
    print(f"{n} files written to {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
