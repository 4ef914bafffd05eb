"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder holds ``model.safetensors``, ``optimizer.safetensors`` (moments and RNG
state), ``config.json`` (model, training and tokenizer configs: enough to rebuild the model
anywhere) and ``state.json`` (step, data position, losses; the learning rate is a function of
the step). It is written to a temp folder and renamed, so a crash never leaves half a
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meloformer_model.atomic import atomic_folder
from meloformer_model.model import MeloFormer, ModelConfig, backend_for
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.vocab import Vocabulary

BEST = "best.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read back, named with the reason."""


@contextlib.contextmanager
def _reading(folder: Path) -> Iterator[None]:
    """Missing or corrupt files become a ``CheckpointError`` naming the folder (a truncated
    weights file raises safetensors' own error type; a config of another shape, TypeError)."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: not a readable checkpoint ({exc})") from exc


def _load_weights(folder: Path, model: MeloFormer, device) -> None:
    """The checkpoint's weights into ``model``, refused in one line when they do not fit it
    (``load_state_dict`` reports every tensor, over many lines)."""
    weights = load_file(folder / "model.safetensors", device=str(device))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in weights.items()}
    problems = [
        f"{len(names)} {what} (first {min(names)})"
        for what, names in (
            ("missing", expected.keys() - stored.keys()),
            ("unexpected", stored.keys() - expected.keys()),
            (
                "of another shape",
                {n for n in expected.keys() & stored.keys() if expected[n] != stored[n]},
            ),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{folder}: its weights do not fit the model its config.json describes: "
            f"tensors {', '.join(problems)}"
        )
    model.load_state_dict(weights)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def save_checkpoint(
    folder: Path,
    model: MeloFormer,
    optimizer: torch.optim.Optimizer,
    configs: dict,
    state: dict,
) -> Path:
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        save_file(_optimizer_tensors(optimizer), tmp / "optimizer.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in optimizer.state_dict()["param_groups"]]  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(configs, indent=2))
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=2))
    return folder


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[MeloFormer, dict]:
    """Rebuild the model from a checkpoint's own config, with the attention backend of
    ``device`` (a model trained on a GPU runs dense on a CPU); return it with all stored
    configs."""
    folder = Path(folder)
    configs = read_configs(folder)
    with _reading(folder):
        config = ModelConfig.from_dict(configs["model"])
        model = MeloFormer(replace(config, backend=backend_for(device)))
        _load_weights(folder, model, device)
    return model.to(device), configs


CONFIG_SECTIONS = ("model", "train", "tokenizer")


def read_configs(folder: Path) -> dict:
    """The model, training and tokenizer configs a checkpoint was saved with, each checked to
    rebuild its config object (a missing or foreign field is named here, not deep in a load)."""
    with _reading(folder):
        configs = json.loads((Path(folder) / "config.json").read_text())
        missing = [name for name in CONFIG_SECTIONS if not isinstance(configs.get(name), dict)]
        if missing:
            raise CheckpointError(f"{folder}: config.json lacks the {', '.join(missing)} config")
        model = ModelConfig.from_dict(configs["model"])
        tokens = len(Vocabulary(tokenizer_config(configs)))
        if tokens != model.vocab_size:
            raise CheckpointError(
                f"{folder}: config.json's tokenizer has {tokens} tokens, its model "
                f"{model.vocab_size}: the configs are not one run's"
            )
        return configs


def read_state(folder: Path) -> dict:
    """Step, data position, history and optimizer hyperparameters at the checkpoint."""
    with _reading(folder):
        return json.loads((Path(folder) / "state.json").read_text())


def tokenizer_config(configs: dict) -> TokenizerConfig:
    return TokenizerConfig.from_dict(configs["tokenizer"])


def restore_training(
    folder: Path, model: MeloFormer, optimizer: torch.optim.Optimizer, device
) -> dict:
    """Load weights, optimizer moments and RNG state in place; return the saved state."""
    folder = Path(folder)
    state = read_state(folder)
    with _reading(folder):
        _load_weights(folder, model, device)
        tensors = load_file(folder / "optimizer.safetensors")
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value.to(device) if value.ndim else value
        saved = optimizer.state_dict()
        for group, stored in zip(saved["param_groups"], state["param_groups"]):
            group.update(stored)
        optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("step-*") if p.is_dir())


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best one."""
    best = best_checkpoint(root)
    for folder in checkpoints(root)[:-keep_last]:
        if folder != best:
            shutil.rmtree(folder)


def best_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / BEST
    if not pointer.exists():
        return None
    return Path(root) / json.loads(pointer.read_text())["checkpoint"]
