"""The HID tokenizer's configuration: the single source of truth for grids and token families."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

TOKENIZER_FORMAT_VERSION = 2

DEFAULT_TIME_SIGNATURES: tuple[tuple[int, int], ...] = (
    (1, 2),
    (2, 2),
    (3, 2),
    (4, 2),
    (1, 4),
    (2, 4),
    (3, 4),
    (4, 4),
    (5, 4),
    (6, 4),
    (7, 4),
    (2, 8),
    (3, 8),
    (5, 8),
    (6, 8),
    (7, 8),
    (9, 8),
    (11, 8),
    (12, 8),
)

# General MIDI program ranges in the upstream track priority: drums first (handled apart), then
# bass, piano, guitar, organ, pads, strings, chromatic percussion, winds, synth lead, synth FX,
# and everything else.
INSTRUMENT_PRIORITY: tuple[tuple[str, tuple[range, ...]], ...] = (
    ("bass", (range(32, 40),)),
    ("piano", (range(0, 8),)),
    ("guitar", (range(24, 32),)),
    ("organ", (range(16, 24),)),
    ("pads", (range(88, 96),)),
    ("strings", (range(40, 56),)),
    ("chromatic_percussion", (range(8, 16),)),
    ("winds", (range(56, 80),)),
    ("synth_lead", (range(80, 88),)),
    ("synth_fx", (range(96, 104),)),
    ("others", (range(104, 128),)),
)

POSITIONS_PER_QUARTER = 12  # the grid: sixteenths (3 units) and eighth/sixteenth triplets (4/2)
DRUM_INSTRUMENT = 128
GLOBAL_INSTRUMENT = 129


def instrument_rank_table() -> np.ndarray:
    """Sort key per instrument id (0-127 programs, 128 drums): priority group, then program."""
    ranks = np.zeros(DRUM_INSTRUMENT + 1, dtype=np.int64)
    for group, (_, program_ranges) in enumerate(INSTRUMENT_PRIORITY, start=1):
        for programs in program_ranges:
            for program in programs:
                ranks[program] = group * 128 + program
    ranks[DRUM_INSTRUMENT] = 0
    return ranks


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything that decides the vocabulary and the token grid.

    ``positions_per_quarter`` = 12 represents sixteenths (3) and eighth/sixteenth triplets (4/2).
    Tempo bins are log-spaced (tempo perception is multiplicative), ``tempo_steps_per_octave`` to
    a doubling, through ``default_tempo_bpm``, within the tempo range: 32 bins over 40–250 BPM at
    the defaults, with 60, 120 (the MIDI default, the most common tempo) and 240 exact and 80,
    90, 160 and 180 within 0.3 %.
    ``duration_tiers`` lists (upper bound in quarter notes, step in grid units): fine steps for
    short notes, coarser ones for long notes, capped at the last bound.
    """

    positions_per_quarter: int = POSITIONS_PER_QUARTER
    time_signatures: tuple[tuple[int, int], ...] = DEFAULT_TIME_SIGNATURES
    tempo_steps_per_octave: int = 12
    tempo_min_bpm: float = 40.0
    tempo_max_bpm: float = 250.0
    velocity_bins: int = 32
    duration_tiers: tuple[tuple[int, int], ...] = ((4, 1), (8, 6), (16, 12), (32, 24))
    default_time_signature: tuple[int, int] = (4, 4)
    default_tempo_bpm: float = 120.0
    special_tokens: tuple[str, ...] = field(default=("PAD", "BOS", "EOS", "SEP", "MASK"))

    def __post_init__(self) -> None:
        if self.positions_per_quarter < 1:
            raise ValueError("positions_per_quarter must be >= 1")
        for num, den in self.time_signatures:
            if num < 1 or den < 1 or den & (den - 1):
                raise ValueError(f"time signature {num}/{den} is not valid")
            if (num * 4 * self.positions_per_quarter) % den:
                raise ValueError(
                    f"time signature {num}/{den} is not a whole number of grid units per bar "
                    f"at {self.positions_per_quarter} positions per quarter"
                )
        if self.default_time_signature not in self.time_signatures:
            raise ValueError("default_time_signature must be one of time_signatures")
        if not 0 < self.tempo_min_bpm <= self.default_tempo_bpm <= self.tempo_max_bpm:
            raise ValueError("the tempo range must satisfy 0 < min <= default_tempo_bpm <= max")
        if self.tempo_steps_per_octave < 1 or len(self.tempo_values()) < 2:
            raise ValueError("the tempo range must hold at least 2 tempo steps")
        if not 1 <= self.velocity_bins <= 128:
            raise ValueError("velocity_bins must be within 1..128")
        if self.special_tokens[:3] != ("PAD", "BOS", "EOS"):
            raise ValueError("special_tokens must start with PAD, BOS, EOS")
        self.duration_values()  # validates the tiers

    def bar_units(self, numerator: int, denominator: int) -> int:
        """Length of one bar of this time signature in grid units."""
        return numerator * 4 * self.positions_per_quarter // denominator

    @property
    def max_bar_units(self) -> int:
        return max(self.bar_units(n, d) for n, d in self.time_signatures)

    def duration_values(self) -> np.ndarray:
        """The representable note durations in grid units, ascending."""
        values: list[int] = []
        last = 0
        for bound_quarters, step in self.duration_tiers:
            bound = bound_quarters * self.positions_per_quarter
            if step < 1 or bound <= last or (bound - last) % step:
                raise ValueError(f"duration tier ({bound_quarters}, {step}) does not fit the grid")
            values.extend(range(last + step, bound + 1, step))
            last = bound
        return np.asarray(values, dtype=np.int64)

    def tempo_values(self) -> np.ndarray:
        """The bin centres in BPM, ascending (see the class docstring)."""
        steps = self.tempo_steps_per_octave
        first = math.ceil(steps * math.log2(self.tempo_min_bpm / self.default_tempo_bpm) - 1e-9)
        last = math.floor(steps * math.log2(self.tempo_max_bpm / self.default_tempo_bpm) + 1e-9)
        return self.default_tempo_bpm * np.exp2(np.arange(first, last + 1) / steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        converted = dict(data)
        for key in ("time_signatures", "duration_tiers"):
            if key in converted:
                converted[key] = tuple(tuple(item) for item in converted[key])
        for key in ("default_time_signature", "special_tokens"):
            if key in converted:
                converted[key] = tuple(converted[key])
        return cls(**converted)

    def config_hash(self) -> str:
        """Identifies the vocabulary a token id sequence belongs to."""
        payload = json.dumps(
            {"format": TOKENIZER_FORMAT_VERSION, **self.to_dict()}, sort_keys=True
        ).encode()
        return hashlib.sha256(payload).hexdigest()[:16]
