"""Training configs and the hardware profiles, free of torch: the Dagster resources refuse an
unknown profile or model size when they are built (at definitions load or run start, not when
the training step comes after the upstream assets), and a config travels to ``torchrun`` as
JSON.

Hardware profiles are configs: ``cpu`` trains the tiny model in minutes (the main command and
the tests), ``h100``/``h800`` are the upstream recipes at 8192 tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from meloformer_model.model_sizes import MODEL_SIZES
from meloformer_model.training.packing import PACKING

# Fields a run may change and still be the same run: they say how long to train, what to
# measure or keep, or how the same operations are scheduled (compiled blocks fuse them,
# checkpointing recomputes them: the out-of-memory advice), not which weights the steps produce.
TRAJECTORY_NEUTRAL = frozenset(
    {
        "max_steps",
        "eval_every",
        "checkpoint_every",
        "keep_last",
        "compile_blocks",
        "gradient_checkpointing",
    }
)


def _at_least(low: int) -> tuple[Callable[[int], bool], str]:
    return (lambda value: value >= low), f">= {low}"


_SETTING_RULES: dict[str, tuple[Callable, str]] = {
    "seq_len": _at_least(2),  # a target needs a next token
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "max_steps": _at_least(1),
    "warmup_steps": _at_least(0),
    "eval_every": _at_least(1),
    "checkpoint_every": _at_least(1),
    "keep_last": _at_least(1),
    "n_kv_head": ((lambda value: value is None or value >= 1), "None or >= 1"),
    "lr": ((lambda value: value > 0), "> 0"),
    "clip": ((lambda value: value > 0), "> 0"),
    "min_lr_ratio": ((lambda value: 0 <= value <= 1), "in [0, 1]"),
    "weight_decay": ((lambda value: value >= 0), ">= 0"),
    "beta1": ((lambda value: 0 <= value < 1), "in [0, 1)"),
    "beta2": ((lambda value: 0 <= value < 1), "in [0, 1)"),
}


@dataclass(frozen=True)
class TrainConfig:
    size: str = "tiny"
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    max_steps: int = 150
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_last: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    # bf16 autocast, also on CPU: the small model trains 1.5x faster on a CPU with AVX512-BF16
    # (benchmarks/results/train-cpu-bf16.json against train.json); the cpu profile keeps fp32,
    # since a CPU without native bf16 emulates it, slower than fp32
    bf16: bool = False
    n_kv_head: int | None = None
    compile_blocks: bool = False  # GPU (flex backend) only: MeloFormer.compile_blocks

    def __post_init__(self) -> None:
        """Refuse settings no run can use, by name, before any data is read."""
        problems = [
            f"{name} {getattr(self, name)} must be {rule}"
            for name, (ok, rule) in _SETTING_RULES.items()
            if not ok(getattr(self, name))
        ]
        if self.size not in MODEL_SIZES:
            problems.insert(0, f"unknown model size {self.size!r}: {list(MODEL_SIZES)}")
        if problems:
            raise ValueError("training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def run_key(self) -> str:
        """12 hex digits naming the run's trajectory (the config less ``TRAJECTORY_NEUTRAL``,
        and the packing algorithm, which decides the batches): configs with one key may continue
        each other's run, any other config is another run."""
        trajectory = json.dumps({**_trajectory(self.to_dict()), "packing": PACKING}, sort_keys=True)
        return hashlib.sha256(trajectory.encode()).hexdigest()[:12]


def _trajectory(config: dict) -> dict:
    return {name: value for name, value in config.items() if name not in TRAJECTORY_NEUTRAL}


def trajectory_changes(saved: dict, requested: dict) -> dict[str, tuple]:
    """``{field: (saved, requested)}`` for every field that differs and is not neutral (a field
    one side lacks, from an older or newer ``TrainConfig``, counts as None there)."""
    old, new = _trajectory(saved), _trajectory(requested)
    return {
        name: (old.get(name), new.get(name))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    }


# The upstream recipe (design.md §1): 8192-token rows, bf16, 2000 warmup steps. Measured on an
# H200 (benchmarks/results/train-nvidia-h200*.json, large at 4 x 8192): checkpointing 73.9k
# tokens/s; without it 104.5k (peak 36 GiB); with compiled blocks as well 167.3k (peak 25.5 GiB,
# well inside an 80 GB H100/H800). Checkpointing is for longer rows or bigger batches.
_UPSTREAM_GPU = TrainConfig(size="large", seq_len=8192, batch_size=4, grad_accum=8, lr=3e-4,
                            warmup_steps=2000, max_steps=100_000, eval_every=2000,
                            checkpoint_every=2000, bf16=True, compile_blocks=True)  # fmt: skip
PROFILES: dict[str, TrainConfig] = {"cpu": TrainConfig(), "h100": _UPSTREAM_GPU,
                                    "h800": _UPSTREAM_GPU}  # fmt: skip


def profile_config(profile: str, size: str | None = None, **changes) -> TrainConfig:
    """A hardware profile's config, with another model size or other fields (None keeps the
    profile's); unknown profiles and sizes are refused by name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown training profile {profile!r}: {sorted(PROFILES)}")
    changes = {name: value for name, value in {"size": size or None, **changes}.items()
               if value is not None}  # fmt: skip
    return replace(PROFILES[profile], **changes)
