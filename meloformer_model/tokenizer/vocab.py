"""The HID vocabulary: token names and ids derived from a ``TokenizerConfig``, stored as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from meloformer_model.atomic import write_bytes_atomic
from meloformer_model.tokenizer.chords import CHORD_NAMES
from meloformer_model.tokenizer.config import TokenizerConfig

FAMILIES = (
    "special",
    "bar",
    "time_signature",
    "tempo",
    "chord",
    "position",
    "instrument",
    "pitch",
    "drum",
    "duration",
    "velocity",
)


class TokenType(IntEnum):
    """The coarse token type carried as side information for the attention masks."""

    OTHER = 0
    POSITION = 1
    PITCH = 2
    DURATION = 3
    VELOCITY = 4


FAMILY_TOKEN_TYPE = {
    "position": TokenType.POSITION,
    "pitch": TokenType.PITCH,
    "drum": TokenType.PITCH,
    "duration": TokenType.DURATION,
    "velocity": TokenType.VELOCITY,
}


class VocabularyMismatchError(ValueError):
    """A stored vocabulary does not belong to the tokenizer configuration in use."""


def family_token_names(config: TokenizerConfig) -> dict[str, list[str]]:
    """Token names per family, in id order."""
    return {
        "special": list(config.special_tokens),
        "bar": ["Bar"],
        "time_signature": [f"TimeSig_{n}/{d}" for n, d in config.time_signatures],
        "tempo": [f"Tempo_{bpm:.1f}" for bpm in config.tempo_values()],
        "chord": [f"Chord_{name}" for name in CHORD_NAMES],
        "position": [f"Pos_{p}" for p in range(config.max_bar_units)],
        "instrument": [f"#P{p}" for p in range(128)] + ["#D"],
        "pitch": [f"Pitch_{p}" for p in range(128)],
        "drum": [f"Drum_{p}" for p in range(128)],
        "duration": [f"Dur_{d}" for d in config.duration_values()],
        "velocity": [f"Vel_{v}" for v in range(config.velocity_bins)],
    }


@dataclass
class Vocabulary:
    """Ids, family ranges and per-token corpus counts for one tokenizer configuration."""

    config: TokenizerConfig
    tokens: list[str] = field(init=False)
    family_ranges: dict[str, tuple[int, int]] = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = []
        self.family_ranges = {}
        for family, names in family_token_names(self.config).items():
            self.family_ranges[family] = (len(self.tokens), len(self.tokens) + len(names))
            self.tokens.extend(names)
        self.counts = np.zeros(len(self.tokens), dtype=np.int64)
        self._ids = {name: i for i, name in enumerate(self.tokens)}
        starts = [self.family_ranges[f][0] for f in FAMILIES]
        self._family_starts = np.asarray(starts, dtype=np.int64)
        token_type = np.zeros(len(self.tokens), dtype=np.int8)
        for family, kind in FAMILY_TOKEN_TYPE.items():
            start, end = self.family_ranges[family]
            token_type[start:end] = kind
        self.token_type_table = token_type

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, name: str) -> int:
        return self._ids[name]

    def offset(self, family: str) -> int:
        return self.family_ranges[family][0]

    def family_of(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``FAMILIES`` for each id."""
        return np.searchsorted(self._family_starts, np.asarray(ids), side="right") - 1

    def decode_names(self, ids: np.ndarray | list[int]) -> list[str]:
        return [self.tokens[i] for i in np.asarray(ids).tolist()]

    def add_counts(self, ids: np.ndarray) -> None:
        """Accumulate corpus token frequencies (used for the unigram baseline and coverage)."""
        self.counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(self.tokens))

    def config_hash(self) -> str:
        return self.config.config_hash()

    def to_dict(self) -> dict:
        return {
            "config_hash": self.config_hash(),
            "config": self.config.to_dict(),
            "size": len(self.tokens),
            "families": {name: list(span) for name, span in self.family_ranges.items()},
            "tokens": self.tokens,
            "counts": self.counts.tolist(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (never pickle: a vocabulary must be safe to load anywhere)."""
        data = json.dumps(self.to_dict(), indent=1).encode()
        return write_bytes_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike, expected: TokenizerConfig | None = None) -> Vocabulary:
        """Load and verify: the stored hash must match its config and, if given, ``expected``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            config = TokenizerConfig.from_dict(data["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VocabularyMismatchError(f"{path}: not a valid vocabulary file ({exc})") from exc
        vocab = cls(config)
        if data.get("config_hash") != vocab.config_hash():
            raise VocabularyMismatchError(
                f"{path}: stored config hash {data.get('config_hash')} does not match its config "
                f"({vocab.config_hash()}); the file was edited or written by another version"
            )
        if data.get("tokens") != vocab.tokens:
            raise VocabularyMismatchError(
                f"{path}: token list differs from the one its config builds"
            )
        if expected is not None and expected.config_hash() != vocab.config_hash():
            raise VocabularyMismatchError(
                f"{path}: vocabulary was built for config {vocab.config_hash()}, "
                f"but the tokenizer uses {expected.config_hash()}"
            )
        counts = data.get("counts", vocab.counts.tolist())
        valid = isinstance(counts, list) and len(counts) == len(vocab.tokens)
        if not (valid and all(isinstance(n, int) and n >= 0 for n in counts)):
            raise VocabularyMismatchError(
                f"{path}: counts must be {len(vocab.tokens)} whole numbers >= 0, one per token "
                "(the unigram baseline is computed from them)"
            )
        vocab.counts = np.asarray(counts, dtype=np.int64)
        return vocab
