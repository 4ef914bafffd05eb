"""How generation samples, and what the evaluation report generates: the settings, their checks
and defaults. Kept free of torch, so the command line and the Dagster resources show the defaults
without loading the model code."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The longest way to EOS once a piece is past max_tokens: a note's 4 tokens, then EOS
TOKENS_TO_END = 5


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 picks the likeliest allowed token; ``top_k`` 0 and ``top_p`` 1 keep
    every allowed token; ``max_tokens`` counts the prompt's tokens too: past it, a piece takes
    the shortest way to EOS the grammar allows (at most ``TOKENS_TO_END`` more tokens).
    ``bars``: bars generated; a scratch prompt's open bar is the first of them."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 4096
    bars: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.temperature < math.inf:
            problems.append(f"temperature {self.temperature} must be >= 0 and finite "
                            "(0: the likeliest)")  # fmt: skip
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k} must be >= 0 (0: no limit)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p} must be in (0, 1] (1: no limit)")
        if self.max_tokens < 1:
            problems.append(f"max_tokens {self.max_tokens} must be >= 1")
        if self.bars < 1:
            problems.append(f"bars {self.bars} must be >= 1")
        if not 0 <= self.seed < 2**63:
            problems.append(f"seed {self.seed} must be in [0, 2**63)")
        if problems:
            raise ValueError("; ".join(problems))


# The evaluation report: held-out pieces, each continued from its first bars for a few more.
EVAL_PIECES = 4
EVAL_PROMPT_BARS = 2
EVAL_BARS = 6
EVAL_SAMPLING = SamplingConfig(top_k=32, max_tokens=1500)
