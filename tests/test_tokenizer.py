"""HID tokenizer: exact token order, side information, and MIDI round trips on real music."""

from __future__ import annotations

import io
from collections import Counter

import mido
import numpy as np
import pytest
from symusic import Note, Score, Tempo, TimeSignature, Track

from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.hid import HIDTokenizer, IncrementalSideInformation, TokenizeError

TOK = HIDTokenizer()
CFG = TOK.config
PPQ = CFG.positions_per_quarter


def make_score(tracks, tempos=((0, 120.0),), time_sigs=((0, 4, 4),), tpq=480):
    """tracks: list of (program, is_drum, [(start, duration, pitch, velocity), ...]) in ticks."""
    score = Score(tpq)
    for t, qpm in tempos:
        score.tempos.append(Tempo(t, qpm=qpm))
    for t, num, den in time_sigs:
        score.time_signatures.append(TimeSignature(t, num, den))
    for program, drum, notes in tracks:
        track = Track(f"t{program}", program, drum)
        for start, dur, pitch, vel in notes:
            track.notes.append(Note(start, dur, pitch, vel))
        score.tracks.append(track)
    return score


def names(seq) -> list[str]:
    return TOK.vocab.decode_names(seq.ids)


# ----------------------------------------------------------------------------- reference spec
def _round_half_up(ticks: np.ndarray, tpq: int) -> np.ndarray:
    return np.floor(ticks * PPQ / tpq + 0.5).astype(np.int64)


def _nearest_duration(units: int) -> int:
    values = CFG.duration_values()
    diffs = np.abs(values - units)
    return int(values[np.flatnonzero(diffs == diffs.min())[0]])


def expected_notes(score) -> Counter:
    """What the round trip must reproduce, stated independently of the tokenizer's code."""
    tpq = score.ticks_per_quarter
    out = Counter()
    for track in score.tracks:
        for note in track.notes:
            onset = int(_round_half_up(np.array([note.time]), tpq)[0])
            end = int(_round_half_up(np.array([note.time + note.duration]), tpq)[0])
            dur = _nearest_duration(max(end - onset, 1))
            program = -1 if track.is_drum else track.program
            out[(onset, note.pitch, dur, note.velocity // 4, program, track.is_drum)] += 1
    return out


def decoded_notes(score) -> Counter:
    tpq = score.ticks_per_quarter
    out = Counter()
    for track in score.tracks:
        for note in track.notes:
            assert note.time * PPQ % tpq == 0 and note.duration * PPQ % tpq == 0
            program = -1 if track.is_drum else track.program
            key = (
                note.time * PPQ // tpq,
                note.pitch,
                note.duration * PPQ // tpq,
                note.velocity // 4,
                program,
                track.is_drum,
            )
            out[key] += 1
    return out


def tempo_bin_of(bpm: float) -> int:
    return int(np.argmin(np.abs(np.log(CFG.tempo_values()) - np.log(bpm))))


def expected_tempos(score) -> list[tuple[int, int]]:
    """Changes up to the end of the bar of the last onset (a change under the last notes stays)."""
    tpq = score.ticks_per_quarter
    last_onset = max(
        int(_round_half_up(np.array([n.time]), tpq)[0]) for t in score.tracks for n in t.notes
    )
    start, num, den = expected_time_signatures(score, last_onset)[-1]
    length = num * 4 * PPQ // den
    end = start + ((last_onset - start) // length + 1) * length
    events = {0: tempo_bin_of(CFG.default_tempo_bpm)}
    for tempo in score.tempos:
        events[int(_round_half_up(np.array([tempo.time]), tpq)[0])] = tempo_bin_of(tempo.qpm)
    out: list[tuple[int, int]] = []
    for t in sorted(events):
        if t < end and (not out or out[-1][1] != events[t]):
            out.append((t, events[t]))
    return out


def expected_time_signatures(score, last_onset: int) -> list[tuple[int, int, int]]:
    """A change inside a bar cuts the bar there when a time signature of the cut length exists
    (of the bar's denominator if possible), else takes effect at the next bar line; up to the
    last onset."""
    tpq = score.ticks_per_quarter
    changes = {0: (4, 4)}
    for t in score.time_signatures:
        changes[int(_round_half_up(np.array([t.time]), tpq)[0])] = (t.numerator, t.denominator)

    def units(ts):
        return ts[0] * 4 * PPQ // ts[1]

    def shortened(length, written):
        fits = [ts for ts in CFG.time_signatures if units(ts) == length]
        return ([ts for ts in fits if ts[1] == written[1]] or fits)[0]

    bar_start, current = 0, changes[0]
    bars = {0: current}
    for time in sorted(changes)[1:]:
        if time > last_onset:
            break
        while bar_start + units(current) <= time:
            bar_start += units(current)
        if time > bar_start:
            if any(units(ts) == time - bar_start for ts in CFG.time_signatures):
                bars[bar_start] = shortened(time - bar_start, current)
                bar_start = time
            else:
                bar_start += units(current)
        current = changes[time]
        bars[bar_start] = current
    out: list[tuple[int, int, int]] = []
    for start in sorted(bars):
        if start <= last_onset and (not out or out[-1][1:] != bars[start]):
            out.append((start, *bars[start]))
    return out


def decoded_tempos(score) -> list[tuple[int, int]]:
    tpq = score.ticks_per_quarter
    return [(t.time * PPQ // tpq, tempo_bin_of(t.qpm)) for t in score.tempos]


# ----------------------------------------------------------------------------- exact sequences
def test_token_order_is_bar_major_with_instrument_priority_and_sorted_onsets():
    score = make_score(
        [
            (0, False, [(480, 480, 67, 80), (0, 480, 64, 80), (0, 480, 60, 80)]),  # piano
            (33, False, [(0, 960, 36, 100)]),  # bass comes before piano
            (0, True, [(0, 120, 36, 100)]),  # drums come first
        ]
    )
    seq = TOK.encode(score)
    assert names(seq) == [
        "BOS",
        "Bar",
        "TimeSig_4/4",
        "Pos_0",
        "Tempo_120.0",
        "Chord_C:maj",
        "#D",
        "Pos_0",
        "Drum_36",
        "Dur_3",
        "Vel_25",
        "#P33",
        "Pos_0",
        "Pitch_36",
        "Dur_24",
        "Vel_25",
        "#P0",
        "Pos_0",
        "Pitch_60",
        "Dur_12",
        "Vel_20",
        "Pitch_64",
        "Dur_12",
        "Vel_20",
        "Pos_12",
        "Pitch_67",
        "Dur_12",
        "Vel_20",
        "EOS",
    ]


def test_side_information_exact_values():
    score = make_score([(0, False, [(0, 480, 60, 80), (0, 480, 64, 80), (1920, 480, 62, 80)])])
    seq = TOK.encode(score)
    got = list(
        zip(
            names(seq),
            seq.bar.tolist(),
            seq.instrument.tolist(),
            seq.token_type.tolist(),
            seq.onset_group.tolist(),
        )
    )
    tempo = "Tempo_120.0"
    assert got == [
        ("BOS", 0, 129, 0, -1),
        ("Bar", 0, 129, 0, -1),
        ("TimeSig_4/4", 0, 129, 0, -1),
        ("Pos_0", 0, 129, 1, -1),
        (tempo, 0, 129, 0, -1),
        ("Chord_C:maj", 0, 129, 0, -1),
        ("#P0", 0, 0, 0, -1),
        ("Pos_0", 0, 0, 1, 0),
        ("Pitch_60", 0, 0, 2, 0),
        ("Dur_12", 0, 0, 3, 0),
        ("Vel_20", 0, 0, 4, 0),
        ("Pitch_64", 0, 0, 2, 0),
        ("Dur_12", 0, 0, 3, 0),
        ("Vel_20", 0, 0, 4, 0),
        ("Bar", 1, 129, 0, -1),
        ("Chord_D:5", 1, 129, 0, -1),
        ("#P0", 1, 0, 0, -1),
        ("Pos_0", 1, 0, 1, 1),
        ("Pitch_62", 1, 0, 2, 1),
        ("Dur_12", 1, 0, 3, 1),
        ("Vel_20", 1, 0, 4, 1),
        ("EOS", 1, 129, 0, -1),
    ]


def test_empty_bars_are_explicit():
    score = make_score([(0, False, [(0, 480, 60, 80), (1920 * 3, 480, 62, 80)])])
    seq = TOK.encode(score)
    tokens = names(seq)
    assert tokens.count("Bar") == 4
    assert tokens[tokens.index("Bar", 7) : tokens.index("Bar", 7) + 4] == [
        "Bar",
        "Chord_N",
        "Bar",
        "Chord_N",
    ]


def test_time_signature_changes_set_the_grid_and_round_trip():
    # 4/4 bar, then two 3/4 bars, then 6/8: bar starts at 0, 48, 84, 120 grid units.
    score = make_score(
        [
            (
                0,
                False,
                [
                    (0, 480, 60, 80),
                    (1920, 480, 62, 80),
                    (1920 + 1440, 480, 64, 80),
                    (1920 + 2880, 240, 65, 80),
                    (1920 + 2880 + 1200, 240, 67, 80),
                ],
            )
        ],
        time_sigs=((0, 4, 4), (1920, 3, 4), (1920 + 2880, 6, 8)),
    )
    seq = TOK.encode(score)
    tokens = names(seq)
    assert [t for t in tokens if t.startswith("TimeSig")] == [
        "TimeSig_4/4",
        "TimeSig_3/4",
        "TimeSig_6/8",
    ]
    last_bar = tokens[len(tokens) - 1 - tokens[::-1].index("Bar") :]
    assert "Pos_30" in last_bar  # 1200 ticks into the 6/8 bar = 2.5 quarters = 30 units
    out = TOK.decode_score(seq.ids)
    assert [(t.time, t.numerator, t.denominator) for t in out.time_signatures] == [
        (0, 4, 4),
        (1920, 3, 4),
        (1920 + 2880, 6, 8),
    ]
    assert decoded_notes(out) == expected_notes(score)


def test_time_signature_change_inside_a_bar_cuts_the_bar_when_a_signature_fits():
    """A change two beats into a 4/4 bar marks a bar line there: the bar becomes 2/4 and the
    3/4 bars start at the change (bars after it stay on the score's bar lines). A change one
    sixteenth in (no signature is that short) takes effect at the next bar line."""
    notes = [(0, 480, 60, 80), (2400, 480, 62, 80), (4800, 480, 64, 80)]
    score = make_score([(0, False, notes)], time_sigs=((0, 4, 4), (960, 3, 4)))
    seq = TOK.encode(score)
    out = TOK.decode_score(seq.ids)
    assert [(t.time, t.numerator, t.denominator) for t in out.time_signatures] == [
        (0, 2, 4),
        (960, 3, 4),
    ]
    assert [t for t in names(seq) if t.startswith("TimeSig")] == ["TimeSig_2/4", "TimeSig_3/4"]
    assert decoded_notes(out) == expected_notes(score)
    late = make_score([(0, False, notes)], time_sigs=((0, 4, 4), (120, 3, 4)))
    out = TOK.decode_score(TOK.encode(late).ids)
    assert [(t.time, t.numerator) for t in out.time_signatures] == [(0, 4), (1920, 3)]
    assert decoded_notes(out) == expected_notes(late)


def test_notes_at_bar_end_and_long_notes_are_not_clamped():
    score = make_score([(0, False, [(1920 - 40, 40, 60, 80), (0, 1920 * 3, 48, 80)])])
    out = TOK.decode_score(TOK.encode(score).ids)
    assert decoded_notes(out) == expected_notes(score)
    notes = sorted((n.time, n.duration) for n in out.tracks[0].notes)
    assert notes == [(0, 1920 * 3), (1880, 40)]


def test_tempo_changes_keep_their_time():
    score = make_score(
        [(0, False, [(i * 480, 480, 60 + i % 12, 80) for i in range(16)])],
        tempos=((0, 90.0), (1200, 150.0), (1920 * 2 + 480, 60.0)),
    )
    out = TOK.decode_score(TOK.encode(score).ids)
    assert decoded_tempos(out) == expected_tempos(score)
    assert [t for t, _ in decoded_tempos(out)] == [0, 30, 2 * 48 + 12]


def test_common_tempi_come_back_exactly():
    """The MIDI default (120) and its octaves decode to the tempo they were written at (the
    range's own log spacing gave 123 for 120); other round tempi come back within 0.3 %."""
    exact, near = (60.0, 120.0, 240.0), (80.0, 90.0, 160.0, 180.0)
    tempos = tuple((1920 * i, qpm) for i, qpm in enumerate(exact + near))
    notes = [(i * 480, 480, 60 + i % 12, 80) for i in range(4 * len(tempos))]
    out = TOK.decode_score(TOK.encode(make_score([(0, False, notes)], tempos=tempos)).ids)
    decoded = [t.qpm for t in out.tempos]
    assert decoded[:3] == list(exact)
    assert np.allclose(decoded[3:], near, rtol=3e-3)
    values = CFG.tempo_values()
    assert len(values) == 32 and 40 <= values[0] < values[-1] <= 250


def test_a_tempo_change_under_the_last_notes_stays():
    """A ritardando over the final held chord: the change comes after the last onset, inside its
    bar, and the piece keeps it (it played at the first tempo before)."""
    chord = [(1920 * 4, 1920 * 2, pitch, 80) for pitch in (48, 55, 64)]
    score = make_score(
        [(0, False, [(i * 480, 480, 60 + i % 12, 80) for i in range(16)] + chord)],
        tempos=((0, 120.0), (1920 * 4 + 480, 40.0)),
    )
    out = TOK.decode_score(TOK.encode(score).ids)
    assert decoded_tempos(out) == expected_tempos(score)
    assert decoded_tempos(out)[-1] == (4 * 48 + 12, tempo_bin_of(40.0))


def test_each_track_gets_its_own_channel_and_drums_channel_10():
    score = make_score(
        [(p, False, [(0, 480, 60 + p % 12, 80)]) for p in (0, 24, 33, 40, 73)]
        + [(0, True, [(0, 120, 36, 100)])]
    )
    midi = TOK.decode(TOK.encode(score).ids)
    buf = io.BytesIO()
    midi.dump(file=buf)
    parsed = mido.MidiFile(file=io.BytesIO(buf.getvalue()))
    channel_program = {}
    drum_channels = set()
    for track in parsed.tracks:
        for msg in track:
            if msg.type == "program_change":
                channel_program[msg.channel] = msg.program
            if msg.type == "note_on" and msg.velocity and msg.note == 36 and msg.channel == 9:
                drum_channels.add(msg.channel)
    assert drum_channels == {9}
    pitched = {ch: prog for ch, prog in channel_program.items() if ch != 9}
    assert sorted(pitched.values()) == [0, 24, 33, 40, 73]
    assert len(pitched) == 5  # five distinct channels


def test_type0_file_with_channels_round_trips_programs_and_drums():
    from meloformer_model.data.corrupt import smf

    events = [
        (0, b"\xc0\x18"),
        (0, b"\xc1\x21"),
        (0, b"\x90\x3c\x64"),
        (0, b"\x91\x30\x64"),
        (0, b"\x99\x24\x64"),
        (480, b"\x80\x3c\x00"),
        (0, b"\x81\x30\x00"),
        (0, b"\x89\x24\x00"),
    ]
    seq = TOK.encode(smf([events], fmt=0))
    tokens = names(seq)
    assert ["#D", "#P33", "#P24"] == [t for t in tokens if t.startswith("#")]
    out = TOK.decode_score(seq.ids)
    assert sorted((t.program, t.is_drum, t.notes[0].pitch) for t in out.tracks) == [
        (0, True, 36),
        (24, False, 60),
        (33, False, 48),
    ]


def test_side_information_is_a_function_of_ids_alone():
    score = make_score(
        [
            (0, False, [(i * 240, 240, 60 + i % 7, 80) for i in range(40)]),
            (0, True, [(i * 480, 120, 36, 100) for i in range(20)]),
        ]
    )
    seq = TOK.encode(score)
    again = TOK.side_information(seq.ids)
    for name, values in seq.arrays().items():
        np.testing.assert_array_equal(values, again.arrays()[name])


def test_incremental_side_information_equals_the_whole_sequences(sample_files):
    """Token by token, as generation asks for it, over real pieces (several instruments,
    drums, meter and tempo changes) and a sequence with tokens out of the grammar's order."""
    pieces = [TOK.encode(path).ids for path in sample_files[::60]]
    v = TOK.vocab
    odd = [v["BOS"], v.offset("pitch"), v["Bar"], v.offset("instrument") + 5, v.offset("pitch"),
           v["Bar"], v["Bar"], v.offset("instrument"), v["EOS"], v.offset("pitch")]  # fmt: skip
    for ids in [*pieces, np.asarray(odd)]:
        whole = TOK.side_information(ids)
        incremental = IncrementalSideInformation(TOK)
        rows = np.array([incremental.append(int(token)) for token in ids])
        expected = np.stack([whole.bar, whole.instrument, whole.token_type, whole.onset_group], 1)
        np.testing.assert_array_equal(rows, expected)
    assert sum(len(ids) for ids in pieces) > 10_000


def test_unsupported_time_signature_is_a_named_error():
    score = make_score([(0, False, [(0, 480, 60, 80)])], time_sigs=((0, 13, 16),))
    with pytest.raises(TokenizeError, match="13/16"):
        TOK.encode(score)


def test_decoder_skips_broken_grammar():
    v = TOK.vocab
    ids = [
        v["BOS"],
        v["Bar"],
        v["Pitch_60"],
        v["#P0"],
        v["Pos_0"],
        v["Pitch_60"],
        v["Dur_12"],
        v["Vel_20"],
        v["Pitch_62"],
        v["Dur_12"],
        v["Drum_36"],
        v["Dur_3"],
        v["Vel_25"],
        v["EOS"],
        v["Pitch_70"],
        v["Dur_12"],
        v["Vel_20"],
    ]
    out = TOK.decode_score(np.asarray(ids))
    assert [(n.time, n.pitch) for t in out.tracks for n in t.notes] == [(0, 60)]


def test_config_rejects_grids_that_cannot_hold_a_bar():
    with pytest.raises(ValueError, match="5/16"):
        TokenizerConfig(positions_per_quarter=2, time_signatures=((4, 4), (5, 16)))


# ----------------------------------------------------------------------------- real corpus
def test_round_trip_every_sample_file_note_by_note(sample_files):
    checked_notes = 0
    for path in sample_files:
        score = Score(str(path))
        seq = TOK.encode(score)
        out = TOK.decode_score(seq.ids)
        want = expected_notes(score)
        got = decoded_notes(out)
        lost, extra = sum((want - got).values()), sum((got - want).values())
        assert got == want, f"{path.name}: {lost} notes lost, {extra} extra"
        assert decoded_tempos(out) == expected_tempos(score), path.name
        out_ts = [
            (t.time * PPQ // out.ticks_per_quarter, t.numerator, t.denominator)
            for t in out.time_signatures
        ]
        last_onset = max(k[0] for k in want)
        assert out_ts == expected_time_signatures(score, last_onset), path.name
        checked_notes += sum(want.values())
    assert checked_notes > 100_000


def test_precomputed_chords_give_the_same_tokens(sample_files):
    for path in sample_files[:20]:
        chords = TOK.bar_chords(path)
        seq = TOK.encode(path)
        assert len(chords) == seq.bar.max() + 1
        np.testing.assert_array_equal(TOK.encode(path, chords=chords).ids, seq.ids)
    with pytest.raises(TokenizeError, match="chords given"):
        TOK.encode(sample_files[0], chords=np.zeros(1, dtype=np.int64))


def _far_note_midi(ticks_per_quarter: int, deltas: list[int]) -> bytes:
    """One track: a note after ``deltas`` (variable-length deltas of 28 bits at most)."""
    track = mido.MidiTrack()
    for delta in deltas:
        track.append(mido.MetaMessage("marker", text="x", time=delta))
    track += [mido.Message("note_on", note=60, velocity=80, time=0),
              mido.Message("note_off", note=60, velocity=0, time=1)]  # fmt: skip
    midi = mido.MidiFile(ticks_per_beat=ticks_per_quarter)
    midi.tracks.append(track)
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_far_note_midi(1, [0x0FFFFFFF]), "quarter notes long, more than"),  # 42 bytes, 64 GiB
        (_far_note_midi(480, [0x0FFFFFFF] * 10), "wrap"),  # past 32-bit ticks
    ],
)
def test_hostile_lengths_are_refused_before_anything_is_allocated(data, reason):
    """A few bytes can claim a piece of millions of bars: the tokenizer refuses it by its
    length instead of allocating bars for it (the filter refuses such files too)."""
    with pytest.raises(TokenizeError, match=reason):
        TOK.encode(data)
