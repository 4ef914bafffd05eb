"""The training loop: AdamW with warmup + cosine, accumulation, clipping, per-token losses,
exact resume, optional DDP (``torchrun``) and bf16 autocast. A finished run keeps its figures in
``summary.json`` beside its checkpoints; training it again returns them instead of training.
A folder holds one run: resuming it with a config that would change its trajectory is refused.

The configs and hardware profiles are in ``training/config.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from meloformer_model.atomic import write_bytes_atomic
from meloformer_model.data.manifest import built_with
from meloformer_model.model import (
    MeloFormer,
    backend_for,
    build_masks,
    expected_parameters,
    model_config,
    regular_stream,
)
from meloformer_model.tokenizer.vocab import Vocabulary
from meloformer_model.training.checkpoint import (
    BEST,
    best_checkpoint,
    checkpoints,
    load_model,
    prune,
    read_configs,
    read_state,
    restore_training,
    save_checkpoint,
)
from meloformer_model.training.config import TrainConfig, trajectory_changes
from meloformer_model.training.data import IGNORE, Batch, PackedLoader, load_splits
from meloformer_model.training.packing import PACKING

SUMMARY = "summary.json"
PROGRESS_EVERY_S = 60.0  # a progress line at least this often, besides one per evaluation
# Dense peaks from the datasheets (SXM parts): bf16, and plain fp32 (torch does not use TF32 for
# fp32 matmuls by default)
GPU_PEAK = {
    torch.bfloat16: {"H100": 989e12, "H800": 989e12, "H200": 989e12, "A100": 312e12},
    torch.float32: {"H100": 67e12, "H800": 67e12, "H200": 67e12, "A100": 19.5e12},
}


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine down to ``min_lr_ratio`` of the peak at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(
        1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    )
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: MeloFormer, weight_decay: float) -> list[dict]:
    """Decay matrices; never norms, biases or embeddings (the head is tied to the embedding)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim == 2 and not name.startswith("embed")
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip


def adamw(model: MeloFormer, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused: one kernel per step for all parameters instead of a
    few per tensor (on CPU the small model's step takes 6 ms instead of 26)."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), fused=True)  # fmt: skip


def forward_loss(model, batch: Batch, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed or per token, logits) for a batch; masks built once for all layers."""
    config = model.module.config if hasattr(model, "module") else model.config
    masks = build_masks(config, regular_stream(*batch.side), batch.summary_width)
    logits = model(batch.ids, masks)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                           ignore_index=IGNORE, reduction=reduction)  # fmt: skip
    return loss, logits


@torch.no_grad()
def evaluate(model, loader: PackedLoader, device, autocast) -> dict:
    """Per-token validation loss (summed over tokens, not averaged per batch)."""
    model.eval()
    total, count = 0.0, 0
    for _, batch in loader.epoch(0):
        batch = batch.to(device)
        with autocast():
            loss, _ = forward_loss(model, batch)
        total += float(loss)
        count += batch.n_targets
    model.train()
    if dist.is_initialized():
        both = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, count = float(both[0]), int(both[1])
    return {"loss": total / max(count, 1), "tokens": count}


@dataclass
class TrainResult:
    """tokens_per_second and mfu cover every session of the run; peak memory and wall time
    cover this call's."""

    model: MeloFormer
    checkpoint: Path
    best: Path
    history: list[dict]
    tokens_per_second: float
    mfu: float | None  # None: no known peak for this GPU
    peak_memory_bytes: int | None  # None: no GPU memory counter (CPU)
    wall_seconds: float
    parameters: int
    processes: int

    def figures(self) -> dict:
        """Everything but the model, JSON-ready: what the asset reports and the summary keeps."""
        figures = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {**figures, "checkpoint": str(self.checkpoint), "best": str(self.best)}


def completed_run(out_dir: Path, config: TrainConfig, dataset_path: Path) -> dict | None:
    """The figures of the run that finished in ``out_dir`` (as ``TrainResult.figures``) if it
    trained ``config``'s trajectory to its ``max_steps`` on this dataset version and its final
    checkpoint is still the newest; None when training has to run (resuming a finished run would
    train nothing and measure nothing). Other eval, checkpoint or pruning settings still reuse it:
    they would not have changed the weights."""
    out_dir = Path(out_dir)
    path = out_dir / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        trained, dataset = summary.pop("train"), summary.pop("dataset")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a readable run summary ({type(exc).__name__}: {exc}); the run's "
            "checkpoints are beside it: remove the file to read the run from them again"
        ) from exc
    saved = checkpoints(out_dir)
    if (
        dataset != Path(dataset_path).name
        or trained["max_steps"] != config.max_steps
        or trajectory_changes(trained, config.to_dict())
        or not saved
        or saved[-1].name != summary["checkpoint"]
    ):
        return None
    return {
        **summary,
        "checkpoint": str(out_dir / summary["checkpoint"]),
        "best": str(out_dir / summary["best"]),
    }


def _save_summary(
    out_dir: Path, result: TrainResult, config: TrainConfig, dataset_path: Path
) -> None:
    """Checkpoint names, not paths: the summary stays valid when the data root moves."""
    figures = {**result.figures(), "checkpoint": result.checkpoint.name, "best": result.best.name}
    summary = {"dataset": Path(dataset_path).name, "train": config.to_dict(), **figures}
    write_bytes_atomic(out_dir / SUMMARY, json.dumps(summary, indent=2).encode())


def device_for(requested: str | None = None) -> torch.device:
    """``requested`` (default: the GPU when there is one), refused by name when this machine
    has no such device: torch would fail later, deep in the first copy to it."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device {requested!r}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise ValueError(f"device {requested!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {requested!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {requested!r}: training and generation run on cpu or cuda")
    return device


LOCK = ".lock"  # in the run folder: the pid of the process training into it


@contextlib.contextmanager
def _run_lock(out_dir: Path, rank: int, log: Callable[[str], None]) -> Iterator[None]:
    """One training writes a run folder at a time (rank 0 holds the lock for a DDP run): a
    second one would resume from the same checkpoint and overwrite the first's. The lock goes
    with the process, so a killed run leaves none behind. A filesystem that cannot lock
    (Lustre mounted without flock, some network mounts) trains unlocked, with a warning."""
    if rank:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"{out_dir}: another process (pid {holder}) is training into this folder: wait "
                "for it to finish, or train into another folder"
            ) from None
        except OSError as exc:
            log(f"{out_dir}: this filesystem cannot lock files ({exc.strerror}); training "
                "unlocked: start no second training into this folder")  # fmt: skip
            locked = False
        if locked:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def train(
    dataset_path: Path,
    vocab: Vocabulary,
    out_dir: Path,
    config: TrainConfig,
    device: str | None = None,
    stop_at: int | None = None,
    log: Callable[[str], None] = print,
    metrics: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train (or resume, if ``out_dir`` holds checkpoints) until ``max_steps`` or ``stop_at``;
    a run already finished there with this config and dataset is returned as it was.

    Resuming needs the checkpoint's config up to ``TRAJECTORY_NEUTRAL`` fields, else ValueError
    (train another config into another folder). A raised ``max_steps`` continues the run with the
    cosine schedule recomputed for the new length, so its steps from there on follow a schedule
    the earlier steps did not; a ``max_steps`` below the checkpoint's step is refused. Another
    process training into ``out_dir`` is refused by its pid."""
    out_dir = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with _run_lock(out_dir, rank, log):
        return _train(dataset_path, vocab, out_dir, config, device, stop_at, log, metrics)


def _train(
    dataset_path: Path,
    vocab: Vocabulary,
    out_dir: Path,
    config: TrainConfig,
    device: str | None,
    stop_at: int | None,
    log: Callable[[str], None],
    metrics: Callable[[dict], None] | None,
) -> TrainResult:
    dev = device_for(device)
    done = completed_run(out_dir, config, dataset_path)
    if done is not None:
        log(f"{out_dir}: finished its {config.max_steps} steps on this config and dataset; reused")
        model, _ = load_model(Path(done["checkpoint"]), dev)
        paths = {"checkpoint": Path(done["checkpoint"]), "best": Path(done["best"])}
        return TrainResult(model=model, **{**done, **paths})
    run = {
        "dataset": Path(dataset_path).name,
        "vocab_hash": vocab.config_hash(),
        "packing": PACKING,
    }
    built = built_with(dataset_path)
    if built and built != run["vocab_hash"]:
        raise ValueError(
            f"{dataset_path} was built with tokenizer {built}, the vocabulary given is "
            f"{run['vocab_hash']}: its token ids mean other tokens"
        )
    existing = checkpoints(out_dir)
    if existing:
        _require_same_run(out_dir, existing[-1], config, run)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(config.seed)
    data = load_splits(dataset_path)
    train_loader = PackedLoader(data["train"], config.batch_size, config.seq_len, config.seed,
                                rank=rank, world=world)  # fmt: skip
    valid_loader = PackedLoader(data["valid"], config.batch_size, config.seq_len, shuffle=False,
                                rank=rank, world=world)  # fmt: skip
    _require_batches(dataset_path, config, train_loader, valid_loader, world)
    overrides = {"n_kv_head": config.n_kv_head} if config.n_kv_head else {}
    model_cfg = model_config(config.size, len(vocab), backend=backend_for(dev),
                             gradient_checkpointing=config.gradient_checkpointing,
                             **overrides)  # fmt: skip
    model = MeloFormer(model_cfg).to(dev)
    if config.compile_blocks:
        model.compile_blocks()
    optimizer = adamw(model, config)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    configs = {"model": model_cfg.to_dict(), "train": config.to_dict(),
               "tokenizer": vocab.config.to_dict(), **run}  # fmt: skip
    # tokens (every process's) and seconds of the training steps (not eval or saving), over
    # every session of the run, so a resumed run reports the whole run's tokens/s
    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "best_loss": None,
             "tokens_seen": 0, "step_seconds": 0.0}  # fmt: skip
    if existing:
        state = {**state, **restore_training(existing[-1], model, optimizer, dev)}
        log(f"resumed from {existing[-1].name} at step {state['step']}")
    first_step = state["step"]

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16)

    stream = _batches(train_loader, state["epoch"], state["batch"])
    history = state["history"]
    started = time.perf_counter()
    end = min(config.max_steps, stop_at or config.max_steps)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    last_saved = None
    progress = _Progress(end, config.max_steps)
    while state["step"] < end:
        step_started = time.perf_counter()
        micro = []
        for _ in range(config.grad_accum):
            epoch, index, batch = next(stream)
            micro.append(batch)
        state["epoch"], state["batch"] = epoch, index + 1
        targets = sum(b.n_targets for b in micro)
        step_tokens = sum(int((batch.doc >= 0).sum()) for batch in micro)
        if world > 1:  # every process's: the loss is a mean over all targets
            counts = torch.tensor([targets, step_tokens], device=dev)
            dist.all_reduce(counts)
            targets, step_tokens = (int(count) for count in counts)
        state["tokens_seen"] += step_tokens
        lr = lr_at(state["step"], config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the loss adds up on the device, tokens are counted and the summary width taken on
        # the host batch, which reaches the GPU through pinned memory: between micro-batches
        # nothing waits for the GPU, so the host queues the next one while it runs this one
        total = torch.zeros((), device=dev)
        try:
            for i, batch in enumerate(micro):
                batch = batch.to(dev)
                # DDP all-reduces the gradients once a step, after the last micro-batch
                last = i == len(micro) - 1
                with contextlib.nullcontext() if world == 1 or last else wrapped.no_sync():
                    with autocast():
                        loss, _ = forward_loss(wrapped, batch)
                    (loss * world / targets).backward()
                total += loss.detach()
        except torch.cuda.OutOfMemoryError as error:
            raise torch.cuda.OutOfMemoryError(
                _out_of_memory(out_dir, state["step"] + 1, config)
            ) from error
        if world > 1:  # every process's loss, so all report (and judge) the same step loss
            dist.all_reduce(total)
        total = float(total)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):  # before the weights move
            raise FloatingPointError(
                f"{out_dir}: step {state['step'] + 1} has loss {total} and gradient norm "
                f"{grad_norm}; the weights were not updated. Lower lr (now {lr:.2e}) or clip, "
                f"or train with bf16 off; the newest checkpoint is {_newest(out_dir)}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - step_started
        state["step_seconds"] += seconds
        state["step"] += 1
        record = {"step": state["step"], "loss": total / targets, "lr": lr,
                  "grad_norm": grad_norm, "tokens": step_tokens,
                  "seconds": seconds}  # fmt: skip
        # a stop before max_steps saves a checkpoint to resume from but evaluates nothing extra:
        # the history and the best checkpoint stay those of an uninterrupted run
        if state["step"] % config.eval_every == 0 or state["step"] == config.max_steps:
            record["val_loss"] = evaluate(wrapped, valid_loader, dev, autocast)["loss"]
        progress.add(record)
        if "val_loss" in record or progress.due():
            log(progress.line(record))
        history.append(record)
        if metrics:
            metrics(record)
        if rank == 0 and (state["step"] % config.checkpoint_every == 0 or state["step"] == end):
            last_saved = _save(out_dir, model, optimizer, configs, state, record, config.keep_last)
        elif world > 1 and (state["step"] % config.checkpoint_every == 0 or state["step"] == end):
            last_saved = out_dir / f"step-{state['step']:07d}"
    wall = time.perf_counter() - started
    if world > 1:
        dist.barrier()  # rank 0's checkpoint is on disk before any rank reports it
    seconds = state["step_seconds"]
    tokens_per_second = state["tokens_seen"] / seconds if seconds else 0.0
    params = expected_parameters(model_cfg)
    # PaLM-style count: 6 N per token plus causal attention 6 L C T (no recomputation counted)
    per_token = 6 * params + 6 * model_cfg.n_layer * model_cfg.n_embd * config.seq_len
    flops = per_token * tokens_per_second
    # the tokens are every process's, so is the peak
    peak = peak_flops(dev, torch.bfloat16 if config.bf16 else torch.float32) * world
    result = TrainResult(
        model=model,
        checkpoint=last_saved or checkpoints(out_dir)[-1],
        best=best_checkpoint(out_dir) or checkpoints(out_dir)[-1],
        history=history,
        tokens_per_second=tokens_per_second,
        mfu=flops / peak if peak else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        wall_seconds=wall,
        parameters=params,
        processes=world,
    )  # fmt: skip
    if rank == 0 and state["step"] == config.max_steps and state["step"] > first_step:
        _save_summary(out_dir, result, config, dataset_path)  # not by a call that trained none
    return result


def _newest(out_dir: Path) -> str:
    saved = checkpoints(out_dir)
    return str(saved[-1]) if saved else "none yet"


def _out_of_memory(out_dir: Path, step: int, config: TrainConfig) -> str:
    advice = "lower batch_size and raise grad_accum to keep the tokens per step"
    if not config.gradient_checkpointing:
        advice += ", or turn gradient_checkpointing on"
    return (
        f"{out_dir}: out of GPU memory in step {step} with micro-batches of {config.batch_size} "
        f"x {config.seq_len} tokens ({config.size} model, gradient checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}): {advice}. The newest checkpoint "
        f"is {_newest(out_dir)}"
    )


class _Progress:
    """Progress lines for a long run: the step, losses, learning rate, this session's tokens/s
    since the last line, and the time left at this session's mean step time."""

    def __init__(self, end: int, max_steps: int):
        self.end, self.max_steps = end, max_steps
        self.steps = self.seconds = 0.0
        self.window_tokens = self.window_seconds = 0.0
        self.last = time.monotonic()

    def add(self, record: dict) -> None:
        self.steps += 1
        self.seconds += record["seconds"]
        self.window_tokens += record["tokens"]
        self.window_seconds += record["seconds"]

    def due(self) -> bool:
        return time.monotonic() - self.last >= PROGRESS_EVERY_S

    def line(self, record: dict) -> str:
        step = record["step"]
        rate = self.window_tokens / self.window_seconds if self.window_seconds else 0.0
        left = (self.end - step) * self.seconds / self.steps
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        self.window_tokens = self.window_seconds = 0.0
        self.last = time.monotonic()
        return (f"step {step}/{self.max_steps}: loss {record['loss']:.4f}{val}, lr "
                f"{record['lr']:.2e}, {rate:,.0f} tokens/s, {_duration(left)} left")  # fmt: skip


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _require_same_run(out_dir: Path, checkpoint: Path, config: TrainConfig, run: dict) -> None:
    """Refuse to resume another config's run, or a run on another dataset version or
    vocabulary (``run``): its optimizer state carries the old learning rate, its weights another
    model's shapes, another data order or other token ids, and the result would be neither run.
    A run already past ``max_steps`` cannot be cut back to it either."""
    saved = read_configs(checkpoint)
    changes = trajectory_changes(saved["train"], config.to_dict())
    changes |= {name: (saved.get(name), new) for name, new in run.items() if saved.get(name) != new}
    if changes:
        listed = ", ".join(f"{name} {old!r} → {new!r}" for name, (old, new) in changes.items())
        raise ValueError(
            f"{out_dir} holds another run ({listed}); resuming it would mix two runs: train "
            f"this one into another folder"
        )
    step = read_state(checkpoint)["step"]
    if step > config.max_steps:
        raise ValueError(
            f"{out_dir} holds a run already at step {step}, past max_steps {config.max_steps}: "
            f"ask for at least {step} steps, or train into another folder"
        )


def _require_batches(
    dataset_path: Path,
    config: TrainConfig,
    train_loader: PackedLoader,
    valid_loader: PackedLoader,
    world: int,
) -> None:
    """Refuse, by the numbers, a dataset the run cannot step through: a train split short of
    one optimizer step's batches, or an empty valid split (its loss would read 0 and pick the
    best checkpoint)."""
    batches = len(train_loader)
    if batches < config.grad_accum:
        tokens = int(train_loader.lengths.sum())
        per = f" per process ({world})" if world > 1 else ""
        raise ValueError(
            f"{dataset_path}: the train split's {tokens:,} tokens fill {batches} batch(es) of "
            f"{config.batch_size} x {config.seq_len} tokens{per}, and one optimizer step takes "
            f"{config.grad_accum}: lower batch_size, seq_len or grad_accum, or add pieces"
        )
    if not len(valid_loader.lengths):
        raise ValueError(
            f"{dataset_path}: the valid split is empty, and the validation loss picks the best "
            "checkpoint: rebuild the dataset with more pieces or a larger valid_fraction"
        )


def _batches(loader: PackedLoader, epoch: int, skip: int):
    while True:
        for index, batch in loader.epoch(epoch, skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def _save(out_dir, model, optimizer, configs, state, record, keep_last) -> Path:
    val = record.get("val_loss")
    improved = val is not None and (state["best_loss"] is None or val < state["best_loss"])
    if improved:
        state["best_loss"] = val
    name = f"step-{state['step']:07d}"
    folder = save_checkpoint(out_dir / name, model, optimizer, configs, state)
    if improved:
        pointer = {"checkpoint": name, "val_loss": val}
        write_bytes_atomic(out_dir / BEST, json.dumps(pointer).encode())
    prune(out_dir, keep_last)
    return folder


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device for the utilisation figure: the datasheet's dense peak of known
    GPUs in the run's dtype; on CPU, matmul throughput in that dtype measured here and now (the
    CPU has no datasheet figure we can trust, and bf16 runs at another rate than fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((value for key, value in GPU_PEAK[dtype].items() if key in name), 0.0)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def unigram_loss(vocab: Vocabulary) -> float:
    """Cross-entropy of the corpus unigram distribution: the baseline a model must beat."""
    counts = vocab.counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def setup_distributed() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
