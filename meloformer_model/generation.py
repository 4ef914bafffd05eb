"""Sampling with the KV cache, under the HID grammar, so every generated sequence decodes.

Each step masks the logits to the tokens the grammar allows next (bar structure, meta events,
instrument order, increasing positions inside the bar, pitch → duration → velocity), samples
with temperature / top-k / top-p, and derives the new token's side information with the
tokenizer's own rules (``IncrementalSideInformation``: ``side_information`` over the current
bar) — the same rules the model was trained with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from meloformer_model.data.midi_io import MidiSource, load_score, source_name
from meloformer_model.model import IncrementalDecoder, MeloFormer
from meloformer_model.sampling import TOKENS_TO_END, SamplingConfig
from meloformer_model.tokenizer.config import DRUM_INSTRUMENT, instrument_rank_table
from meloformer_model.tokenizer.hid import HIDTokenizer, IncrementalSideInformation
from meloformer_model.tokenizer.vocab import FAMILIES


@dataclass
class _State:
    """Where the sequence is in the grammar."""

    bar_units: int  # the current bar's length in grid units
    phase: str = "start"
    meta_pos: int = -1
    instrument: int = -1
    rank: int = -1
    note_pos: int = -1
    bars: int = 0
    instruments_used: set[int] = field(default_factory=set)


class Grammar:
    """The set of allowed next tokens, updated token by token."""

    def __init__(self, tokenizer: HIDTokenizer, instruments: list[int] | None = None):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.ranks = instrument_rank_table()
        programs = set(range(DRUM_INSTRUMENT + 1))
        if instruments is not None and (not instruments or not set(instruments) <= programs):
            raise ValueError(
                f"instruments {instruments}: give GM programs 0-127, or {DRUM_INSTRUMENT} for drums"
            )
        self.allowed_instruments = programs if instruments is None else set(instruments)
        cfg = tokenizer.config
        self.ts_units = [cfg.bar_units(n, d) for n, d in cfg.time_signatures]
        self.state = _State(bar_units=cfg.bar_units(*cfg.default_time_signature))

    def _range(self, family: str) -> np.ndarray:
        start, end = self.vocab.family_ranges[family]
        return np.arange(start, end)

    def opens_a_bar(self) -> bool:
        """Whether the sequence ends inside a bar that has no chord yet (a scratch prompt: the
        bar is the model's to fill, so it is the first bar generated)."""
        return self.state.phase in ("bar", "ts", "meta_pos", "tempo")

    def allowed(self, bars_left: int, ending: bool = False) -> np.ndarray:
        """Ids allowed next; ``ending``: only those on the shortest way to EOS (a bar's header
        takes its chord, not more tempo changes)."""
        s, v = self.state, self.vocab
        if ending and s.phase in ("bar", "ts", "tempo"):
            return self._range("chord")
        off = self.vocab.offset
        if s.phase == "start":
            return np.array([v["BOS"]])
        if s.phase == "bos":
            return np.array([v["Bar"]])
        if s.phase == "bar":
            allowed = [self._range("time_signature"), self._range("chord")]
            allowed.append(off("position") + np.arange(0, s.bar_units))
            return np.concatenate(allowed)
        if s.phase in ("ts", "tempo"):
            start = s.meta_pos + 1
            return np.concatenate([self._range("chord"),
                                   off("position") + np.arange(start, s.bar_units)])  # fmt: skip
        if s.phase == "meta_pos":
            return self._range("tempo")
        end = np.array([v["Bar"]] if bars_left > 0 else [v["EOS"]])
        later = [i for i in sorted(self.allowed_instruments, key=lambda i: self.ranks[i])
                 if self.ranks[i] > s.rank and i not in s.instruments_used]  # fmt: skip
        insts = off("instrument") + np.asarray(later, dtype=np.int64)
        if s.phase == "chord":
            return np.concatenate([insts, end])
        if s.phase == "instrument":
            return off("position") + np.arange(0, s.bar_units)
        pitches = self._range("drum" if s.instrument == DRUM_INSTRUMENT else "pitch")
        if s.phase == "note_pos":
            return pitches
        if s.phase == "pitch":
            return self._range("duration")
        if s.phase == "duration":
            return self._range("velocity")
        # after a velocity: another note at this onset, a later onset, another instrument, or end
        positions = off("position") + np.arange(s.note_pos + 1, s.bar_units)
        return np.concatenate([pitches, positions, insts, end])

    def advance(self, token: int) -> None:
        s, fam = self.state, FAMILIES[int(self.vocab.family_of(np.array([token]))[0])]
        value = token - self.vocab.offset(fam)
        if fam == "special":
            s.phase = "bos"
        elif fam == "bar":
            s.phase, s.meta_pos, s.rank, s.note_pos = "bar", -1, -1, -1
            s.instrument, s.instruments_used = -1, set()
            s.bars += 1
        elif fam == "time_signature":
            s.phase, s.bar_units = "ts", self.ts_units[value]
        elif fam == "position" and s.phase in ("bar", "ts", "tempo"):
            s.phase, s.meta_pos = "meta_pos", value
        elif fam == "tempo":
            s.phase = "tempo"
        elif fam == "chord":
            s.phase = "chord"
        elif fam == "instrument":
            s.phase, s.instrument, s.rank = "instrument", value, int(self.ranks[value])
            s.instruments_used.add(value)
            s.note_pos = -1
        elif fam == "position":
            s.phase, s.note_pos = "note_pos", value
        elif fam in ("pitch", "drum"):
            s.phase = "pitch"
        elif fam == "duration":
            s.phase = "duration"
        elif fam == "velocity":
            s.phase = "velocity"


def _sample(logits: torch.Tensor, allowed: np.ndarray, config: SamplingConfig, gen) -> int:
    """One token from the allowed ones: ``logits`` (V,) float on the CPU, where the piece's
    generator lives, so a seed gives the same choices from the same logits on any device."""
    masked = torch.full_like(logits, float("-inf"))
    index = torch.as_tensor(allowed, dtype=torch.long)
    masked[index] = logits[index] / max(config.temperature, 1e-5)
    if config.top_k and config.top_k < len(allowed):
        kth = torch.topk(masked, config.top_k).values[-1]
        masked[masked < kth] = float("-inf")
    probs = torch.softmax(masked, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def prompt_from_scratch(
    tokenizer: HIDTokenizer,
    tempo_bpm: float | None = None,
    time_signature: tuple[int, int] | None = None,
) -> list[int]:
    """BOS, the first bar, its time signature and tempo (default: the tokenizer's): the rest is
    the model's. Settings the vocabulary cannot say are refused, not rounded to one it can."""
    v, cfg = tokenizer.vocab, tokenizer.config
    tempo_bpm = cfg.default_tempo_bpm if tempo_bpm is None else tempo_bpm
    num, den = time_signature = time_signature or cfg.default_time_signature
    if not cfg.tempo_min_bpm <= tempo_bpm <= cfg.tempo_max_bpm:
        raise ValueError(
            f"tempo {tempo_bpm:g} BPM: the vocabulary's tempi run from {cfg.tempo_min_bpm:g} to "
            f"{cfg.tempo_max_bpm:g} BPM"
        )
    if tuple(time_signature) not in cfg.time_signatures:
        known = ", ".join(f"{n}/{d}" for n, d in cfg.time_signatures)
        raise ValueError(f"time signature {num}/{den} is not in the vocabulary ({known})")
    tempo = int(tokenizer.tempo_bin([tempo_bpm])[0])
    return [v["BOS"], v["Bar"], v[f"TimeSig_{num}/{den}"], v["Pos_0"],
            v.offset("tempo") + tempo]  # fmt: skip


def prompt_from_midi(
    tokenizer: HIDTokenizer, src: MidiSource, bars: int | None = None
) -> list[int]:
    """A file's tokens (its first ``bars`` bars, if given), without EOS, to be continued."""
    if bars is not None and bars < 1:
        raise ValueError(f"{source_name(src)}: a prompt of {bars} bars; give at least 1")
    seq = tokenizer.encode(load_score(src))
    ids = seq.ids[:-1]
    if bars is not None:
        ids = ids[: np.searchsorted(seq.bar[:-1], bars, side="left")]
    return ids.tolist()


@torch.no_grad()
def generate(
    model: MeloFormer,
    tokenizer: HIDTokenizer,
    prompt: list[int],
    config: SamplingConfig = SamplingConfig(),
    instruments: list[int] | None = None,
) -> np.ndarray:
    """Continue ``prompt`` by ``config.bars`` bars (or until ``max_tokens``); returns all ids."""
    return generate_batch(model, tokenizer, [prompt], config, instruments)[0]


@torch.no_grad()
def generate_batch(
    model: MeloFormer,
    tokenizer: HIDTokenizer,
    prompts: list[list[int]],
    config: SamplingConfig = SamplingConfig(),
    instruments: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Continue each prompt as ``generate`` does, side by side in one batch (a decoding step
    reads the weights once for all of them): piece i samples with seed ``config.seed + i``.
    ``progress`` hears after each step how many of the ``config.bars`` x pieces bars are done
    (a finished piece counts all of its own)."""
    if not all(prompts):
        raise ValueError("an empty prompt: every piece starts from one (prompt_from_scratch)")
    model.eval()
    longest = max(config.max_tokens, *map(len, prompts)) + TOKENS_TO_END
    decoder = IncrementalDecoder(model, len(prompts), capacity=longest)
    pieces = [_Piece(tokenizer, instruments, config.seed + i) for i in range(len(prompts))]
    eos = tokenizer.vocab["EOS"]
    logits = None
    for t in itertools.count():
        tokens = [
            prompt[t] if t < len(prompt) else piece.choose(logits[i], config, eos)
            for i, (piece, prompt) in enumerate(zip(pieces, prompts))
        ]
        if progress:
            progress(sum(piece.bars_done(config.bars) for piece in pieces))
        if all(piece.done for piece in pieces):
            return [np.asarray(piece.ids, dtype=np.int64) for piece in pieces]
        logits = decoder.step(*zip(*(piece.feed(token) for piece, token in zip(pieces, tokens))))
        logits = logits.float().cpu()  # one copy a step for every piece's sampling


class _Piece:
    """One sequence being generated: its ids, grammar, random generator and bar target."""

    def __init__(self, tokenizer: HIDTokenizer, instruments: list[int] | None, seed: int):
        self.grammar = Grammar(tokenizer, instruments)
        self.side = IncrementalSideInformation(tokenizer)
        self.gen = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.target_bars: int | None = None
        self.done = False
        self.row: tuple[int, ...] = ()

    def choose(self, logits: torch.Tensor, config: SamplingConfig, eos: int) -> int:
        """The next token (EOS ends the piece); a finished piece chooses nothing more."""
        if self.done:
            return eos
        if self.target_bars is None:  # the prompt is in: count the bars to add from here
            opened = self.grammar.opens_a_bar()
            self.target_bars = self.grammar.state.bars - opened + config.bars
        over_budget = len(self.ids) >= config.max_tokens
        bars_left = 0 if over_budget else self.target_bars - self.grammar.state.bars
        allowed = self.grammar.allowed(bars_left, ending=over_budget)
        if over_budget and eos in allowed:
            allowed = np.array([eos])
        token = _sample(logits, allowed, config, self.gen)
        if token == eos:
            self.ids.append(token)
            self.done = True
        return token

    def bars_done(self, bars: int) -> int:
        """How many of its ``bars`` new bars this piece has completed."""
        if self.done:
            return bars
        if self.target_bars is None:  # still reading its prompt
            return 0
        return max(0, bars - (self.target_bars - self.grammar.state.bars))

    def feed(self, token: int) -> tuple[int, ...]:
        """The decoder's input for ``token``: it and its side information from the tokenizer's
        own rules. A finished piece repeats its last input, whose output nobody reads."""
        if not self.done:
            self.ids.append(token)
            self.grammar.advance(token)
            self.row = (token, *self.side.append(token))
        return self.row


def piano_roll_path(out: Path) -> Path:
    """Where ``write_outputs`` puts the piano roll of the MIDI file ``out``."""
    return out.with_suffix(".png")


def write_outputs(tokenizer: HIDTokenizer, ids: np.ndarray, out: Path, piano_roll: bool = False):
    """Write the MIDI (and optionally a piano-roll PNG beside it)."""
    from meloformer_model.data.midi_io import write_midi

    score = tokenizer.decode_score(ids)
    write_midi(score, out)
    if piano_roll:
        from meloformer_model.evaluation.plots import save_piano_roll

        save_piano_roll(score, piano_roll_path(out))
    return score
