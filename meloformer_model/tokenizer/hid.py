"""HID tokenization: bar-major, instrument-aware token sequences with per-token side information.

Order (design.md §2): ``BOS``, then per bar ``Bar``, the time signature when it changes,
``Pos Tempo`` pairs for tempo changes at their position, the bar's chord, then per instrument
(upstream priority order) its instrument token and its notes sorted by (onset, pitch, duration,
velocity), with a ``Pos`` token whenever the onset changes and ``Pitch|Drum Dur Vel`` per note;
``EOS``. Empty bars stay as a bare ``Bar Chord_N``.

Side information (bar, instrument, token type, onset group) is derived from the ids alone by
``side_information``, so training, evaluation and generation share exactly one rule set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from symusic import Note, Score, Tempo, TimeSignature, Track
from symusic.core import ScoreTick

from meloformer_model.data.midi_io import MidiSource, load_score, score_to_miditoolkit
from meloformer_model.data.timeline import bar_lines, bar_of, quantize
from meloformer_model.tokenizer.chords import detect_chords
from meloformer_model.tokenizer.config import (
    DRUM_INSTRUMENT,
    GLOBAL_INSTRUMENT,
    TokenizerConfig,
    instrument_rank_table,
)
from meloformer_model.tokenizer.vocab import FAMILIES, Vocabulary

_FAMILY = {name: i for i, name in enumerate(FAMILIES)}
_NOTE_FAMILIES = (
    _FAMILY["position"],
    _FAMILY["pitch"],
    _FAMILY["drum"],
    _FAMILY["duration"],
    _FAMILY["velocity"],
)
_IS_NOTE_FAMILY = np.isin(np.arange(len(FAMILIES)), _NOTE_FAMILIES)  # by family index
_OUTPUT_TPQ = 480


class TokenizeError(ValueError):
    """A score the tokenizer cannot represent (the message says what and where)."""


@dataclass
class TokenSequence:
    """Token ids and their side information, all aligned arrays of the same length."""

    ids: np.ndarray
    bar: np.ndarray
    instrument: np.ndarray
    token_type: np.ndarray
    onset_group: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "ids": self.ids,
            "bar": self.bar,
            "instrument": self.instrument,
            "token_type": self.token_type,
            "onset_group": self.onset_group,
        }


@dataclass
class _Notes:
    onset: np.ndarray
    duration: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    instrument: np.ndarray


@dataclass
class Layout:
    """A score's notes on the grid and its bar lines: what chords and tokens are built from."""

    notes: _Notes
    starts: np.ndarray
    bar_ts: np.ndarray
    bounds: np.ndarray
    end: int


def _forward_fill_index(mask: np.ndarray) -> np.ndarray:
    """For each position, the index of the latest position at or before it where mask is set."""
    idx = np.where(mask, np.arange(len(mask)), 0)
    return np.maximum.accumulate(idx)


# A safety bound, not a quality rule (the filter's ``max_beats`` is that): a few bytes of MIDI can
# claim millions of bars, and the tokenizer allocates per bar and per grid position.
MAX_QUARTERS = 100_000


def _refuse_hostile_extent(score: ScoreTick) -> None:
    """Refuse, before anything is allocated for it, a score no grid can hold."""
    tpq = score.ticks_per_quarter
    if tpq < 1:
        raise TokenizeError(f"a division of {tpq} ticks per quarter note")
    if score.start() < 0:
        raise TokenizeError("event times past the 32-bit tick range (they wrap to negative)")
    quarters = score.end() / tpq
    if quarters > MAX_QUARTERS:
        raise TokenizeError(
            f"{quarters:,.0f} quarter notes long, more than the {MAX_QUARTERS:,} the tokenizer "
            "takes"
        )


class HIDTokenizer:
    """Encode MIDI into HID tokens and decode tokens back into MIDI."""

    def __init__(self, config: TokenizerConfig | None = None, vocab: Vocabulary | None = None):
        self.config = config or (vocab.config if vocab else TokenizerConfig())
        self.vocab = vocab or Vocabulary(self.config)
        if self.vocab.config_hash() != self.config.config_hash():
            raise ValueError("vocabulary and tokenizer config differ")
        cfg = self.config
        self._durations = cfg.duration_values()
        self._tempi = cfg.tempo_values()
        log_tempi = np.log(self._tempi)
        self._tempo_bounds = (log_tempi[1:] + log_tempi[:-1]) / 2  # between neighbouring bins
        self._ts_index = {ts: i for i, ts in enumerate(cfg.time_signatures)}
        self._ts_units = np.asarray([cfg.bar_units(n, d) for n, d in cfg.time_signatures])
        self._ts_of_length: dict[int, list[int]] = {}  # bar length -> time signatures, in order
        for index, units in enumerate(self._ts_units.tolist()):
            self._ts_of_length.setdefault(units, []).append(index)
        self._ranks = instrument_rank_table()
        self._off = {family: self.vocab.offset(family) for family in FAMILIES}

    # ----------------------------------------------------------------- quantisation rules
    def duration_bin(self, units: np.ndarray) -> np.ndarray:
        """Index of the nearest representable duration (ties go to the shorter one)."""
        values = self._durations
        units = np.clip(np.asarray(units, dtype=np.int64), values[0], values[-1])
        hi = np.searchsorted(values, units, side="left")
        lo = np.maximum(hi - 1, 0)
        hi = np.minimum(hi, len(values) - 1)
        return np.where(units - values[lo] <= values[hi] - units, lo, hi)

    def tempo_bin(self, bpm: np.ndarray) -> np.ndarray:
        """Nearest tempo bin on a log scale; tempi beyond the ends take the end bins."""
        bpm = np.asarray(bpm, dtype=np.float64)
        return np.searchsorted(self._tempo_bounds, np.log(bpm)).astype(np.int64)

    def velocity_bin(self, velocity: np.ndarray) -> np.ndarray:
        return np.asarray(velocity, dtype=np.int64) * self.config.velocity_bins // 128

    def velocity_value(self, bins: np.ndarray) -> np.ndarray:
        """Bin centre, so re-binning a decoded velocity gives the same bin."""
        width = 128 / self.config.velocity_bins
        return np.clip((np.asarray(bins) * width + width / 2).astype(np.int64), 1, 127)

    # ----------------------------------------------------------------- encoding
    def encode(
        self, src: MidiSource | ScoreTick, chords: np.ndarray | None = None
    ) -> TokenSequence:
        """Tokenize a MIDI path, bytes, ``miditoolkit.MidiFile`` or symusic score.

        ``chords`` (one chord id per bar, as from ``bar_chords``) skips chord detection, so a
        pipeline can annotate chords once and tokenize from the annotation.
        """
        score = load_score(src)
        layout = self.layout(score)
        if chords is None:
            chords = self._detect(layout)
        elif len(chords) != len(layout.starts):
            raise TokenizeError(f"{len(chords)} chords given for {len(layout.starts)} bars")
        return self.side_information(self._encode_ids(score, layout, np.asarray(chords)))

    def bar_chords(self, src: MidiSource | ScoreTick) -> np.ndarray:
        """One ``CHORD_NAMES`` index per bar, over the same bars the tokens use."""
        return self._detect(self.layout(load_score(src)))

    def layout(self, score: ScoreTick) -> Layout:
        _refuse_hostile_extent(score)
        ppq = self.config.positions_per_quarter
        notes = self._collect_notes(score, ppq)
        ts_times, ts_index = self._time_signatures(score, ppq)
        end = int(notes.onset.max()) + 1 if len(notes.onset) else 1
        starts, owner = bar_lines(
            ts_times, self._ts_units[ts_index], end, self._ts_of_length.__contains__
        )
        bar_ts = ts_index[owner]
        lengths = np.diff(starts)
        for bar in np.flatnonzero(lengths != self._ts_units[bar_ts[:-1]]).tolist():
            bar_ts[bar] = self._shortened_bar_ts(int(lengths[bar]), int(bar_ts[bar]))
        bounds = np.append(starts, starts[-1] + self._ts_units[bar_ts[-1]])
        return Layout(notes, starts, bar_ts, bounds, end)

    def _shortened_bar_ts(self, length: int, written: int) -> int:
        """The time signature a bar cut short by a change takes: one of its length, with the
        written signature's denominator when there is one (2/4 for half a 4/4 bar)."""
        candidates = self._ts_of_length[length]
        denominator = self.config.time_signatures[written][1]
        same = [i for i in candidates if self.config.time_signatures[i][1] == denominator]
        return (same or candidates)[0]

    @staticmethod
    def _detect(layout: Layout) -> np.ndarray:
        notes = layout.notes
        pitched = notes.instrument != DRUM_INSTRUMENT
        return detect_chords(
            notes.onset[pitched],
            notes.duration[pitched],
            notes.pitch[pitched],
            notes.velocity[pitched],
            layout.bounds,
        )

    def _collect_notes(self, score: ScoreTick, per_quarter: int) -> _Notes:
        tpq = score.ticks_per_quarter
        parts = []
        for track in score.tracks:
            if not len(track.notes):
                continue
            arr = track.notes.numpy()
            start = arr["time"].astype(np.int64)
            onset = quantize(start, tpq, per_quarter)
            end = quantize(start + arr["duration"].astype(np.int64), tpq, per_quarter)
            inst = DRUM_INSTRUMENT if track.is_drum else int(track.program)
            parts.append(
                (
                    onset,
                    np.maximum(end - onset, 1),
                    arr["pitch"].astype(np.int64) & 0x7F,
                    arr["velocity"].astype(np.int64) & 0x7F,
                    np.full(len(onset), inst),
                )
            )
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return _Notes(empty, empty, empty, empty, empty)
        return _Notes(*(np.concatenate(cols).astype(np.int64) for cols in zip(*parts)))

    def _time_signatures(self, score: ScoreTick, per_quarter: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantised change times (first at 0) and vocabulary indices."""
        arr = score.time_signatures.numpy()
        times = quantize(arr["time"], score.ticks_per_quarter, per_quarter)
        index = []
        for t, num, den in zip(arr["time"], arr["numerator"], arr["denominator"]):
            key = (int(num), int(den))
            if key not in self._ts_index:
                raise TokenizeError(
                    f"time signature {key[0]}/{key[1]} at tick {t} is not in the vocabulary"
                )
            index.append(self._ts_index[key])
        index = np.asarray(index, dtype=np.int64)
        if not len(times) or times[0] > 0:
            default = self._ts_index[self.config.default_time_signature]
            times = np.concatenate(([0], times))
            index = np.concatenate(([default], index))
        last_at_time = np.append(times[1:] != times[:-1], True)
        return times[last_at_time], index[last_at_time]

    def _encode_ids(self, score: ScoreTick, layout: Layout, chords: np.ndarray) -> np.ndarray:
        cfg, off = self.config, self._off
        notes, starts, bar_ts = layout.notes, layout.starts, layout.bar_ts
        n_bars = len(starts)

        # Each token gets a sort key (bar, section, rank, pos, order, k) and an id.
        keys: list[tuple[np.ndarray, ...]] = []
        ids: list[np.ndarray] = []

        def add(token_ids, bar, section, rank=0, pos=0, order=0, k=0):
            n = len(token_ids)
            cols = (bar, section, rank, pos, order, k)
            keys.append(tuple(np.broadcast_to(np.asarray(c, dtype=np.int64), (n,)) for c in cols))
            ids.append(np.asarray(token_ids, dtype=np.int64))

        bars = np.arange(n_bars)
        add(np.full(n_bars, off["bar"]), bars, 0)
        ts_change = np.append(True, bar_ts[1:] != bar_ts[:-1])
        add(off["time_signature"] + bar_ts[ts_change], bars[ts_change], 1)

        tempo_bar, tempo_pos, tempo_bin = self._tempo_events(
            score, cfg.positions_per_quarter, starts, int(layout.bounds[-1])
        )
        order = np.arange(len(tempo_bar))
        add(off["position"] + tempo_pos, tempo_bar, 2, 0, tempo_pos, order, 0)
        add(off["tempo"] + tempo_bin, tempo_bar, 2, 0, tempo_pos, order, 1)

        add(off["chord"] + chords, bars, 3)

        if len(notes.onset):
            nbar = bar_of(notes.onset, starts)
            npos = notes.onset - starts[nbar]
            rank = self._ranks[notes.instrument]
            dur_bin = self.duration_bin(notes.duration)
            vel_bin = self.velocity_bin(notes.velocity)
            within = np.empty(len(nbar), dtype=np.int64)
            within[np.lexsort((vel_bin, dur_bin, notes.pitch))] = np.arange(len(nbar))

            inst_key, inst_first = np.unique(nbar * 4096 + rank, return_index=True)
            add(
                off["instrument"] + notes.instrument[inst_first],
                inst_key // 4096,
                4,
                inst_key % 4096,
                -1,
            )
            onset_key, onset_first = np.unique(
                (nbar * 4096 + rank) * cfg.max_bar_units + npos, return_index=True
            )
            add(
                off["position"] + npos[onset_first],
                nbar[onset_first],
                4,
                rank[onset_first],
                npos[onset_first],
                -1,
            )
            drum = notes.instrument == DRUM_INSTRUMENT
            pitch_ids = np.where(drum, off["drum"], off["pitch"]) + notes.pitch
            for k, token in enumerate(
                (pitch_ids, off["duration"] + dur_bin, off["velocity"] + vel_bin)
            ):
                add(token, nbar, 4, rank, npos, within, k)

        key_cols = [np.concatenate(col) for col in zip(*keys)]
        perm = np.lexsort(key_cols[::-1])
        body = np.concatenate(ids)[perm]
        bos, eos = self.vocab["BOS"], self.vocab["EOS"]
        return np.concatenate(([bos], body, [eos])).astype(np.int32)

    def _tempo_events(
        self, score: ScoreTick, per_quarter: int, starts: np.ndarray, end: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bar, position, bin) of each effective tempo change before ``end`` (the last bar's end: a
        change under the last notes, a ritardando, stays); always one at 0."""
        arr = score.tempos.numpy()
        mspq = arr["mspq"].astype(np.float64)
        if np.any(mspq <= 0):
            raise TokenizeError("tempo of 0 microseconds per quarter note")
        times = quantize(arr["time"], score.ticks_per_quarter, per_quarter)
        bins = self.tempo_bin(60e6 / mspq) if len(mspq) else np.zeros(0, dtype=np.int64)
        if not len(times) or times[0] > 0:
            times = np.concatenate(([0], times))
            bins = np.concatenate((self.tempo_bin([self.config.default_tempo_bpm]), bins))
        keep = (times < end) & np.append(times[1:] != times[:-1], True)
        times, bins = times[keep], bins[keep]
        changed = np.append(True, bins[1:] != bins[:-1])
        times, bins = times[changed], bins[changed]
        bars = bar_of(times, starts)
        return bars, times - starts[bars], bins

    # ----------------------------------------------------------------- side information
    def side_information(self, ids: np.ndarray) -> TokenSequence:
        """Bar index, instrument id, token type and onset group, from the ids alone."""
        return self._side_information(ids, 0, 0)[0]

    def _side_information(self, ids: np.ndarray, bars: int, onsets: int
                          ) -> tuple[TokenSequence, int, int]:  # fmt: skip
        """``side_information`` of ``ids`` that follow ``bars`` bar tokens and ``onsets`` note
        onsets (then ``ids`` start with a bar token, which resets the instrument in force),
        and both counts after ``ids``: the only state that crosses a bar token."""
        ids = np.asarray(ids, dtype=np.int32)
        fam = self.vocab.family_of(ids)
        is_bar = fam == _FAMILY["bar"]
        bar = np.maximum(np.cumsum(is_bar) + bars - 1, 0).astype(np.int32)

        is_inst = fam == _FAMILY["instrument"]
        resets = is_bar | (fam == _FAMILY["special"])
        marker = np.where(is_inst, ids - self._off["instrument"], GLOBAL_INSTRUMENT)
        source = _forward_fill_index(is_inst | resets)
        instrument = marker[source].astype(np.int16)
        in_stream = instrument != GLOBAL_INSTRUMENT

        note_pos = in_stream & (fam == _FAMILY["position"])
        group = np.cumsum(note_pos) + (onsets - 1)
        grouped = in_stream & _IS_NOTE_FAMILY[fam] & (group >= 0)
        onset_group = np.where(grouped, group, -1).astype(np.int32)
        token_type = self.vocab.token_type_table[ids]
        sequence = TokenSequence(ids, bar, instrument, token_type, onset_group)
        return sequence, bars + int(is_bar.sum()), onsets + int(note_pos.sum())

    # ----------------------------------------------------------------- decoding
    def decode_score(self, ids: np.ndarray) -> ScoreTick:
        """Tokens to a symusic score. Fragments that break the grammar are skipped."""
        cfg, off = self.config, self._off
        seq = self.side_information(ids)
        ids = seq.ids.astype(np.int64)
        eos = np.flatnonzero(ids == self.vocab["EOS"])
        if len(eos):
            ids = ids[: eos[0]]
            seq = self.side_information(ids)
        fam = self.vocab.family_of(ids)
        n_bars = max(int(np.sum(fam == _FAMILY["bar"])), 1)

        ts_tok = fam == _FAMILY["time_signature"]
        bar_ts = np.full(n_bars, -1, dtype=np.int64)
        bar_ts[seq.bar[ts_tok]] = ids[ts_tok] - off["time_signature"]
        bar_ts[0] = bar_ts[0] if bar_ts[0] >= 0 else self._ts_index[cfg.default_time_signature]
        bar_ts = bar_ts[_forward_fill_index(bar_ts >= 0)]
        lengths = self._ts_units[bar_ts]
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))

        is_pos = fam == _FAMILY["position"]
        is_bar = fam == _FAMILY["bar"]
        last = _forward_fill_index(is_pos | is_bar)
        pos = np.where(is_pos[last], ids[last] - off["position"], 0)
        time = starts[seq.bar] + pos

        tpq = math.lcm(_OUTPUT_TPQ, cfg.positions_per_quarter)
        scale = tpq // cfg.positions_per_quarter
        score = Score(tpq)
        change = np.append(True, bar_ts[1:] != bar_ts[:-1])
        ts_values = np.asarray(cfg.time_signatures)[bar_ts[change]]
        score.time_signatures = TimeSignature.from_numpy(
            (starts[change] * scale).astype(np.int32),
            ts_values[:, 0].astype(np.uint8),
            ts_values[:, 1].astype(np.uint8),
        )
        is_tempo = fam == _FAMILY["tempo"]
        bpm = self._tempi[ids[is_tempo] - off["tempo"]]
        score.tempos = Tempo.from_numpy(
            (time[is_tempo] * scale).astype(np.int32), np.rint(60e6 / bpm).astype(np.int32)
        )
        self._decode_notes(score, fam, ids, seq, time, scale)
        return score

    def _decode_notes(self, score, fam, ids, seq, time, scale) -> None:
        off = self._off
        padded = np.append(fam, [-1, -1])
        head = np.flatnonzero(
            np.isin(fam, (_FAMILY["pitch"], _FAMILY["drum"]))
            & (padded[1:-1] == _FAMILY["duration"])
            & (padded[2:] == _FAMILY["velocity"])
        )
        inst = seq.instrument[head].astype(np.int64)
        is_drum_token = fam[head] == _FAMILY["drum"]
        valid = (inst != GLOBAL_INSTRUMENT) & (is_drum_token == (inst == DRUM_INSTRUMENT))
        head, inst = head[valid], inst[valid]
        pitch = np.where(is_drum_token[valid], ids[head] - off["drum"], ids[head] - off["pitch"])
        duration = self._durations[ids[head + 1] - off["duration"]]
        velocity = self.velocity_value(ids[head + 2] - off["velocity"])
        onset = time[head]
        for instrument in sorted(np.unique(inst).tolist(), key=lambda i: self._ranks[i]):
            sel = inst == instrument
            order = np.lexsort((pitch[sel], onset[sel]))
            drum = instrument == DRUM_INSTRUMENT
            track = Track(
                "Drums" if drum else f"Program {instrument}", 0 if drum else instrument, drum
            )
            track.notes = Note.from_numpy(
                (onset[sel][order] * scale).astype(np.int32),
                (duration[sel][order] * scale).astype(np.int32),
                pitch[sel][order].astype(np.int8),
                velocity[sel][order].astype(np.int8),
            )
            score.tracks.append(track)

    def decode(self, ids: np.ndarray):
        """Tokens to a ``miditoolkit.MidiFile`` (the interop type)."""
        return score_to_miditoolkit(self.decode_score(ids))


class IncrementalSideInformation:
    """The side information of a sequence growing token by token, as ``side_information``
    gives it for the whole sequence, at the cost of the current bar rather than of the whole
    sequence (generation asks for it at every token): the rules run over the tokens since the
    last bar token, with the bar and onset counts before it carried over."""

    def __init__(self, tokenizer: HIDTokenizer):
        self.tokenizer = tokenizer
        self.current: list[int] = []  # the tokens since the last bar token, that one included
        self.bars = self.onsets = 0  # counted before ``current``

    def append(self, token: int) -> tuple[int, int, int, int]:
        """(bar, instrument, token type, onset group) of ``token``, the sequence's next id."""
        if self.current and self.tokenizer.vocab.family_of(token) == _FAMILY["bar"]:
            _, self.bars, self.onsets = self.tokenizer._side_information(
                self.current, self.bars, self.onsets
            )
            self.current = []
        self.current.append(token)
        side, _, _ = self.tokenizer._side_information(self.current, self.bars, self.onsets)
        return (int(side.bar[-1]), int(side.instrument[-1]), int(side.token_type[-1]),
                int(side.onset_group[-1]))  # fmt: skip
