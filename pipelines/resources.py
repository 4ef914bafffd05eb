"""Where the corpus is read from and where artifacts are written."""

import os
from pathlib import Path

import dagster as dg
import pydantic
from pydantic import Field

from meloformer_model.data.parallel import available_cores
from meloformer_model.data.shards import DEFAULT_SHARD_SIZE
from meloformer_model.paths import PROJECT_DIR, SAMPLE_CORPUS_DIR
from meloformer_model.sampling import EVAL_BARS, EVAL_PIECES
from meloformer_model.training.config import TrainConfig, profile_config

DEFAULT_DAGSTER_HOME = PROJECT_DIR / "dagster_home"
INSTANCE_CONFIG = PROJECT_DIR / "pipelines" / "dagster.yaml"  # copied into DAGSTER_HOME
CORPUS_ENV = "MELOFORMER_CORPUS_DIR"
DATA_ROOT_ENV = "MELOFORMER_DATA_ROOT"
PROFILE_ENV = "MELOFORMER_TRAIN_PROFILE"
PROCESSES_ENV = "MELOFORMER_TRAIN_PROCESSES"
STEPS_ENV = "MELOFORMER_TRAIN_STEPS"
SIZE_ENV = "MELOFORMER_TRAIN_SIZE"


class CorpusStorage(dg.ConfigurableResource):
    """The source MIDI folder, the artifact root, and how the corpus is cut into shards."""

    corpus_dir: str = Field(description="the folder of MIDI files (searched recursively)")
    data_root: str = Field(description="where every asset's versioned artifacts are written")
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, ge=1, description="files per shard")
    workers: int = Field(default=0, ge=0, description="processes; 0: every available core")

    @property
    def corpus_path(self) -> Path:
        return Path(self.corpus_dir).expanduser().resolve()

    @property
    def root(self) -> Path:
        return Path(self.data_root).expanduser().resolve()

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.parquet"

    def stage_dir(self, asset: str, version: str) -> Path:
        """Versioned folder for an asset's artifacts: a config change never overwrites."""
        return self.root / asset / version

    @property
    def n_workers(self) -> int:
        return self.workers or available_cores()


def storage_from_env() -> CorpusStorage:
    """Defaults: the bundled sample corpus and a data folder inside the project's Dagster home."""
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME)
    return CorpusStorage(
        corpus_dir=os.environ.get(CORPUS_ENV) or str(SAMPLE_CORPUS_DIR),
        data_root=os.environ.get(DATA_ROOT_ENV) or str(home / "data"),
    )


class TrainingSettings(dg.ConfigurableResource):
    """Which hardware profile trains which model size (default: the profile's), on how many
    processes, and how much evaluation to do."""

    profile: str = Field(default="cpu", description="hardware profile: cpu, h100, h800")
    size: str = Field(default="", description="model size; empty: the profile's")
    processes: int = Field(default=1, ge=1, description="training processes (torchrun: DDP)")
    max_steps: int = Field(default=0, ge=0, description="optimizer steps; 0: the profile's")
    eval_pieces: int = Field(
        default=EVAL_PIECES, ge=1, description="held-out pieces the evaluation continues"
    )
    eval_bars: int = Field(default=EVAL_BARS, ge=1, description="bars generated per piece")

    @pydantic.field_validator("profile")
    @classmethod
    def _known_profile(cls, profile: str) -> str:
        """Refused when the resource is built (definitions load, run start), not when training
        starts after the upstream assets ran."""
        profile_config(profile)
        return profile

    @pydantic.field_validator("size")
    @classmethod
    def _known_size(cls, size: str) -> str:
        if size:
            TrainConfig(size=size)
        return size

    def config(self) -> TrainConfig:
        return profile_config(self.profile, self.size, max_steps=self.max_steps or None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: not a whole number") from None


def training_from_env() -> TrainingSettings:
    """The training settings the environment gives; a value the resource refuses is named by
    its variable in one line (pydantic's report takes four)."""
    variables = {"profile": PROFILE_ENV, "size": SIZE_ENV, "processes": PROCESSES_ENV,
                 "max_steps": STEPS_ENV}  # fmt: skip
    try:
        return TrainingSettings(
            profile=os.environ.get(PROFILE_ENV, "cpu"),
            size=os.environ.get(SIZE_ENV, ""),
            processes=_env_int(PROCESSES_ENV, 1),
            max_steps=_env_int(STEPS_ENV, 0),
        )
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = variables[str(error["loc"][0])]
            raised = error.get("ctx", {}).get("error")  # a validator's own message, unprefixed
            reason = str(raised) if raised else error["msg"].lower()
            problems.append(f"{name}={os.environ.get(name, '')!r}: {reason}")
        raise ValueError("; ".join(problems)) from None
