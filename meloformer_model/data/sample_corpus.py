"""Build the small bundled MIDI corpus from music21's public-domain corpus.

The repository ships a few hundred real pieces so that tests, benchmarks and
demos have realistic symbolic music without any download. They are rendered
from music21's bundled scores (all public domain):

* every Bach score music21 ships as MusicXML (``bach/*.mxl``/``*.xml``): the
  chorales, some with obbligato instruments, plus the WTC prelude BWV 846;
* a handful of multi-instrument pieces (string quartets, a trio, songs with
  piano), listed in ``MULTI_INSTRUMENT_PIECES``.

Each part becomes its own track of a type-1 MIDI file, at music21's default
resolution (10080 ticks per quarter), with its own channel (never channel 10,
the drum channel) and a General MIDI program chosen from the part's name.
music21's own program choices are ignored because the corpus files are
unreliable there (e.g. Beethoven op. 18/1 mvt. 4 labels the first violin a
cello, Haydn op. 74/1 mvt. 1 labels every part a piano).

Chorale voices are rendered as a wind quartet, so that the tokenizer sees
several programs rather than a single choir patch::

    Soprano -> 68 Oboe      Alto -> 71 Clarinet
    Tenor   -> 60 Horn      Bass -> 70 Bassoon

Instruments map to their GM patch (violin 40, viola 41, cello 42, violone 43,
trumpet/cornett 56, horn 60, oboe 68, clarinet 71, flute 73, recorder 74,
timpani 47, piano 0, organ/continuo 19, choir 52, solo voice 53). A part
whose name matches none of these makes the piece fail loudly (it is logged
and skipped) rather than silently get a wrong program.

Rebuild with ``python -m meloformer_model.data.sample_corpus [OUT_DIR]``; the
output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from pathlib import Path

import symusic
from music21 import common, corpus, instrument, midi, stream
from music21.midi import ChannelModeMessages, ChannelVoiceMessages
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from meloformer_model.atomic import write_bytes_atomic
from meloformer_model.paths import SAMPLE_CORPUS_DIR

logger = logging.getLogger(__name__)


MULTI_INSTRUMENT_PIECES: tuple[str, ...] = (
    "beethoven/opus18no1/movement1.mxl",
    "beethoven/opus18no1/movement2.mxl",
    "beethoven/opus18no1/movement3.mxl",
    "beethoven/opus18no1/movement4.mxl",
    "corelli/opus3no1/1grave.xml",
    "handel/rinaldo/Lascia_chio_pianga.mxl",
    "haydn/opus74no1/movement1.mxl",
    "haydn/opus74no1/movement2.mxl",
    "mozart/k80/movement1.mxl",
    "mozart/k80/movement2.mxl",
    "mozart/k80/movement3.mxl",
    "mozart/k80/movement4.mxl",
    "mozart/k458/movement3.mxl",
    "schubert/Lindenbaum.xml",
    "schumann_clara/opus17/movement3.xml",
    "schumann_robert/opus41no1/movement2.mxl",
    "weber/concertino_clarinet.mxl",
)
"""music21 corpus paths of the pieces that add instrument variety."""

_GM_PROGRAMS: dict[str, int] = {
    # Chorale voices as a wind quartet (see module docstring).
    "soprano": 68,
    "alto": 71,
    "tenor": 60,
    "bass": 70,
    "choir": 52,
    "voice": 53,
    "violin": 40,
    "violino": 40,
    "viola": 41,
    "violoncello": 42,
    "cello": 42,
    "violone": 43,
    "trumpet": 56,
    "cornet": 56,
    "horn": 60,
    "oboe": 68,
    "clarinet": 71,
    "flutes": 73,
    "recorder": 74,
    "recorders": 74,
    "timpani": 47,
    "piano": 0,
    "organ": 19,
    "continuo": 19,
}
"""GM program per lower-case word of a part name; the first known word wins,
so "Soprano / Oboe 1 / Violin 1" is a soprano and "1st Violin" a violin."""

_MIDI_CHANNELS: tuple[int, ...] = (*range(1, 10), *range(11, 17))
"""1-based MIDI channels for melodic tracks: all but 10, which GM reserves for drums."""

_CHANNEL_MESSAGES = (ChannelVoiceMessages, ChannelModeMessages)


def _corpus_pieces() -> list[str]:
    """Corpus paths to convert, in build order: Bach chorales, then the extras."""
    corpus_root = Path(common.getCorpusFilePath())
    bach = sorted(
        path.relative_to(corpus_root).as_posix()
        for path in map(Path, corpus.getComposer("bach"))
        if path.suffix in {".mxl", ".xml"}
    )
    pieces = bach + list(MULTI_INSTRUMENT_PIECES)
    names = [_midi_name(piece) for piece in pieces]
    if len(set(names)) != len(names):
        raise RuntimeError("two corpus pieces map to the same MIDI file name")
    return pieces


def _midi_name(corpus_path: str) -> str:
    """Stable file name: 'bach/bwv248.23-2.mxl' -> 'bach_bwv248.23-2.mid'.

    Lower-cased so names cannot collide on case-insensitive file systems.
    """
    stem = corpus_path.rsplit(".", 1)[0].replace("/", "_").lower()
    return re.sub(r"[^a-z0-9._-]", "_", stem) + ".mid"


def _gm_program(part_name: str) -> int:
    """GM program for a part, from the first word of its name we recognise."""
    for word in re.findall(r"[a-z]+", part_name.lower()):
        if word in _GM_PROGRAMS:
            return _GM_PROGRAMS[word]
    raise ValueError(f"no General MIDI program known for part {part_name!r}")


def _set_instrument(part: stream.Part) -> None:
    """Replace every instrument in `part` by one carrying our GM program.

    Removing all of them (not just the first) also drops stray mid-part
    instrument changes, which some corpus files contain by mistake.
    """
    name = " ".join((part.partName or "").split())
    program = _gm_program(name)
    for old in list(part.recurse().getElementsByClass(instrument.Instrument)):
        part.remove(old, recurse=True)
    new = instrument.Instrument()
    new.partName = name
    new.midiProgram = program
    part.insert(0, new)


def _score_to_midi(corpus_path: str) -> bytes:
    """Render one corpus piece to type-1 MIDI bytes, one channel per part.

    music21 allocates channels per *program*, so parts sharing a program (two
    violins, two piano staves) would share a channel; we reassign channels per
    track afterwards.
    """
    with warnings.catch_warnings():
        # Overfull-measure and similar notation warnings are expected for
        # these scores and would only garble the progress bar.
        warnings.simplefilter("ignore")
        score = corpus.parse(corpus_path)
        parts = list(score.parts)
        if len(parts) > len(_MIDI_CHANNELS):
            raise ValueError(
                f"{len(parts)} parts exceed the {len(_MIDI_CHANNELS)} melodic channels"
            )
        for part in parts:
            _set_instrument(part)
        # Lyrics would become MIDI meta events that add bytes and make symusic
        # open a spurious note-less track; a music model has no use for them.
        for note in score.recurse().notes:
            note.lyrics = []
        midi_file = midi.translate.streamToMidiFile(score)
    # Track 0 is music21's conductor track (tempo, meter); parts follow in order.
    for track, channel in zip(midi_file.tracks[1:], _MIDI_CHANNELS):
        for event in track.events:
            if isinstance(event.type, _CHANNEL_MESSAGES):
                event.channel = channel
    return midi_file.writestr()


def _write_verified(data: bytes, target: Path) -> None:
    """Write `data` atomically once symusic reads notes from it, so a failed piece never
    leaves a truncated or unreadable file in the corpus."""
    if symusic.Score.from_midi(data).note_num() == 0:
        raise ValueError("symusic reads no notes")
    write_bytes_atomic(target, data)


def build_sample_corpus(out_dir: Path, limit: int | None = None) -> list[Path]:
    """Convert the selected corpus pieces into MIDI files under `out_dir`.

    `limit` keeps only the first pieces in build order (chorales first), for
    quick checks. A piece that fails to convert or verify is logged and
    skipped so one bad score cannot abort the build. Existing files of
    pieces not rebuilt are left in place. Returns the paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = _corpus_pieces()[:limit]
    written: list[Path] = []
    for corpus_path in tqdm(pieces, desc="sample corpus", unit="piece"):
        target = out_dir / _midi_name(corpus_path)
        try:
            _write_verified(_score_to_midi(corpus_path), target)
        except Exception as error:  # noqa: BLE001 - any failure just skips the piece
            logger.warning("skipped %s: %s: %s", corpus_path, type(error).__name__, error)
            continue
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: rebuild the corpus and print a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=SAMPLE_CORPUS_DIR,
        help=f"output folder (default: {SAMPLE_CORPUS_DIR})",
    )
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N pieces")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    with logging_redirect_tqdm():  # keep skip warnings from breaking the progress bar
        written = build_sample_corpus(args.out_dir, args.limit)
    size = sum(path.stat().st_size for path in written)
    print(
        f"wrote {len(written)} MIDI files ({size / 1e6:.2f} MB) to {args.out_dir} "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
