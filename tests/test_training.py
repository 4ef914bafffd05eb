"""Training on the sample corpus: it learns, resumes exactly, checkpoints without pickle, and
two DDP processes agree."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meloformer_model.model import (
    MeloFormer,
    model_config,
    regular_stream,
    summary_stream,
)
from meloformer_model.model_sizes import MODEL_SIZES
from meloformer_model.training import config as training_config
from meloformer_model.training import trainer
from meloformer_model.training.checkpoint import (
    CheckpointError,
    best_checkpoint,
    load_model,
    read_configs,
    read_state,
    tokenizer_config,
)
from meloformer_model.training.config import PROFILES, TrainConfig
from meloformer_model.training.data import IGNORE, PackedLoader
from meloformer_model.training.packing import pack, windows
from meloformer_model.training.trainer import (
    SUMMARY,
    completed_run,
    device_for,
    lr_at,
    param_groups,
    train,
    unigram_loss,
)

FAST = replace(PROFILES["cpu"], seq_len=128, batch_size=4, max_steps=6, eval_every=3,
               checkpoint_every=3, warmup_steps=2)  # fmt: skip


def _written(folder: Path) -> dict[Path, int]:
    """The run's files and their times, the lock left out (it records who trains there)."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != trainer.LOCK}


def test_settings_no_run_can_use_are_refused_by_name():
    """Every problem in one message, before any data is read (a zero max_steps used to fail
    deep in the trainer with an IndexError)."""
    with pytest.raises(ValueError) as error:
        TrainConfig(size="huge", seq_len=1, max_steps=0, lr=-1.0, beta2=1.0, n_kv_head=0)
    assert str(error.value) == (
        "training config: unknown model size 'huge': ['tiny', 'small', 'base', 'large', "
        "'xlarge']; seq_len 1 must be >= 2; max_steps 0 must be >= 1; n_kv_head 0 must be None "
        "or >= 1; lr -1.0 must be > 0; beta2 1.0 must be in [0, 1)"
    )
    edge = TrainConfig(warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0, beta1=0.0)
    assert (edge.warmup_steps, edge.min_lr_ratio) == (0, 0.0)


def test_devices_this_machine_lacks_are_refused_by_name(monkeypatch):
    assert device_for("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu': not a device name \(cpu, cuda"):
        device_for("gpu")
    with pytest.raises(ValueError, match="device 'mps': training and generation run on cpu or"):
        device_for("mps")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device"):
        device_for("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA device"):
        device_for("cuda:2")
    assert device_for("cuda:1") == torch.device("cuda", 1)


def test_packed_batches_keep_documents_apart(prepared):
    import datasets

    data = datasets.load_from_disk(str(prepared.dataset.path))["train"]
    loader = PackedLoader(data, batch_size=4, seq_len=256, seed=1)
    plan = loader.plan(0)
    again = PackedLoader(data, batch_size=4, seq_len=256, seed=1)
    assert plan == again.plan(0) and plan != again.plan(1)  # seeded, new order each epoch
    assert loader.plan(1) == again.plan(1) and loader.plan(0) == plan  # the kept plan is right
    covered = {doc for batch in plan for row in batch for doc, _, _ in row}
    assert len(covered) >= 0.9 * len(data)
    batch = loader.make(plan[0])
    assert batch.ids.shape == (4, 256)
    assert batch.summary_width == summary_stream(regular_stream(*batch.side)).doc.shape[1]
    for r, row in enumerate(plan[0]):
        at = 0
        for piece, (doc, start, end) in enumerate(row):
            ids = data[doc]["ids"]
            n = end - start
            assert batch.ids[r, at : at + n].tolist() == ids[start:end]
            assert (batch.doc[r, at : at + n] == piece).all()
            want_last = IGNORE if end == len(ids) else ids[end]
            assert batch.targets[r, at : at + n - 1].tolist() == ids[start + 1 : end]
            assert int(batch.targets[r, at + n - 1]) == want_last
            at += n
        assert (batch.doc[r, at:] == -1).all() and (batch.targets[r, at:] == IGNORE).all()


def test_ddp_processes_get_as_many_batches_and_different_rows(prepared):
    """Each process trains on every world-th batch of one plan, and as many batches as the
    others, so the data position rank 0 saves is every process's (a resumed DDP run)."""
    import datasets

    data = datasets.load_from_disk(str(prepared.dataset.path))["train"]
    alone = PackedLoader(data, batch_size=4, seq_len=256, seed=1).plan(0)
    plans = [PackedLoader(data, batch_size=4, seq_len=256, seed=1, rank=r, world=3).plan(0)
             for r in range(3)]  # fmt: skip
    assert len(alone) % 3 != 0, "pick sizes whose batch count does not divide by 3"
    assert [len(p) for p in plans] == [len(alone) // 3] * 3
    assert [b for i in range(len(plans[0])) for b in (p[i] for p in plans)] == alone[
        : 3 * len(plans[0])
    ]


def test_best_fit_packing_places_every_window_once_with_little_padding(prepared):
    """Each window lands in exactly one row, no row overflows, and on the sample corpus under 2 %
    of the row tokens are padding (packing rows in order, closing each when the next window does
    not fit, left 11 % at this length: benchmarks/packing.py)."""
    import datasets

    lengths = np.asarray(datasets.load_from_disk(str(prepared.dataset.path))["train"]["length"])
    pieces = windows(lengths, 512)
    pieces = pieces[np.random.default_rng(0).permutation(len(pieces))]
    rows = pack(pieces, 512)
    assert sorted(p for row in rows for p in row) == sorted(map(tuple, pieces.tolist()))
    used = [sum(end - start for _, start, end in row) for row in rows]
    assert max(used) <= 512
    assert 1 - sum(used) / (512 * len(rows)) < 0.02


def test_every_batch_has_the_same_shape(prepared):
    """A short last batch (validation keeps it) is padded with empty rows: one compiled shape."""
    import datasets

    data = datasets.load_from_disk(str(prepared.dataset.path))["valid"]
    loader = PackedLoader(data, batch_size=4, seq_len=512, shuffle=False)
    plan = loader.plan(0)
    last = plan[-1]
    assert 0 < len(last) < 4, "the sample corpus's validation split should end on a short batch"
    batch = loader.make(last)
    assert batch.ids.shape == batch.targets.shape == batch.doc.shape == (4, 512)
    assert (batch.doc[len(last) :] == -1).all() and (batch.targets[len(last) :] == IGNORE).all()
    assert batch.n_targets == sum(loader.make([row]).n_targets for row in last)


def test_schedule_and_param_groups():
    cfg = replace(PROFILES["cpu"], lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    model = MeloFormer(model_config("tiny", 100))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"]
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "embed.weight",
        "summary_embed",
        "norm.weight",
    }
    assert no_decay["weight_decay"] == 0.0


def test_resume_gives_the_same_loss_curve(prepared, tmp_path):
    straight = train(
        prepared.dataset.path, prepared.vocab, tmp_path / "a", FAST, log=lambda _: None
    )
    train(  # stopped between evaluations: it saves a checkpoint, evaluates nothing more
        prepared.dataset.path, prepared.vocab, tmp_path / "b", FAST, stop_at=4, log=lambda _: None
    )
    resumed = train(prepared.dataset.path, prepared.vocab, tmp_path / "b", FAST, log=lambda _: None)
    assert resumed.best.name == straight.best.name
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h.get("val_loss") for h in resumed.history] == [
        h.get("val_loss") for h in straight.history
    ]
    a = load_file(straight.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # throughput counts every session's steps: both runs trained the same tokens
    tokens = [json.loads((r.checkpoint / "state.json").read_text())["tokens_seen"]
              for r in (straight, resumed)]  # fmt: skip
    import datasets

    loader = PackedLoader(datasets.load_from_disk(str(prepared.dataset.path))["train"],
                          FAST.batch_size, FAST.seq_len, FAST.seed)  # fmt: skip
    plan = [rows for _, rows in zip(range(FAST.max_steps * FAST.grad_accum), loader.plan(0))]
    assert tokens == [sum(int((loader.make(rows).doc >= 0).sum()) for rows in plan)] * 2


def test_checkpoints_are_safetensors_and_json_and_rebuild_the_model(prepared, tmp_path):
    result = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    model, configs = load_model(result.checkpoint)
    assert tokenizer_config(configs) == prepared.vocab.config
    assert model.config.vocab_size == len(prepared.vocab)
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    assert best_checkpoint(tmp_path) in (tmp_path / "step-0000003", tmp_path / "step-0000006")
    assert len(list(tmp_path.glob("step-*"))) <= 3
    # as a GPU run writes it: the flex backend; on a CPU it loads dense, with the same weights
    config = json.loads((result.checkpoint / "config.json").read_text())
    config["model"]["backend"] = "flex"
    (result.checkpoint / "config.json").write_text(json.dumps(config))
    gpu_trained, configs = load_model(result.checkpoint, "cpu")
    assert configs["model"]["backend"] == "flex" and gpu_trained.config.backend == "dense"
    assert gpu_trained.config == model.config
    for (name, a), b in zip(model.state_dict().items(), gpu_trained.state_dict().values()):
        assert torch.equal(a, b), name


def test_unreadable_checkpoints_are_named_with_the_reason(prepared, tmp_path):
    """Truncated weights, a config describing another model, broken JSON: loading and resuming
    stop with one CheckpointError naming the folder, and a resume changes nothing on disk."""
    run_dir = tmp_path / "run"
    train(prepared.dataset.path, prepared.vocab, run_dir, FAST, stop_at=3, log=lambda _: None)
    newest = run_dir / "step-0000003"
    cases = {}
    for name, damage in {
        "truncated": lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:1000]
        ),
        "another_model": lambda f: (f / "config.json").write_text(
            json.dumps({**read_configs(f), "model": {**read_configs(f)["model"], "n_layer": 3}})
        ),
        "broken_json": lambda f: (f / "state.json").write_text("{broken"),
        "foreign_field": lambda f: (f / "config.json").write_text(
            json.dumps({**read_configs(f), "model": {**read_configs(f)["model"], "new_field": 1}})
        ),
        "no_tokenizer": lambda f: (f / "config.json").write_text(
            json.dumps({k: v for k, v in read_configs(f).items() if k != "tokenizer"})
        ),
        "other_tokenizer": lambda f: (f / "config.json").write_text(
            json.dumps(
                {
                    **read_configs(f),
                    "tokenizer": {**read_configs(f)["tokenizer"], "velocity_bins": 16},
                }
            )
        ),
    }.items():
        cases[name] = shutil.copytree(newest, tmp_path / name)
        damage(cases[name])
    third_layer = list(load_model(newest)[0].blocks[0].state_dict())  # its tensors, per layer
    messages = {
        "truncated": "not a readable checkpoint (Error while deserializing header",
        "another_model": "its weights do not fit the model its config.json describes: tensors "
        f"{len(third_layer)} missing (first blocks.2.{min(third_layer)})",
        "foreign_field": "not a readable checkpoint (ModelConfig.__init__() got an unexpected "
        "keyword argument 'new_field')",
        "no_tokenizer": "config.json lacks the tokenizer config",
        "other_tokenizer": f"config.json's tokenizer has {len(prepared.vocab) - 16} tokens, its "
        f"model {len(prepared.vocab)}",
    }
    for name, message in messages.items():
        with pytest.raises(CheckpointError) as error:
            load_model(cases[name])
        assert str(error.value).startswith(f"{cases[name]}: {message}"), error.value
    (newest / "optimizer.safetensors").write_bytes(b"\0" * 16)
    files = _written(run_dir)
    with pytest.raises(CheckpointError, match=f"^{newest}: not a readable checkpoint"):
        train(prepared.dataset.path, prepared.vocab, run_dir, FAST, log=lambda _: None)
    assert _written(run_dir) == files
    with pytest.raises(CheckpointError, match="not a readable checkpoint .Expecting prop"):
        read_state(cases["broken_json"])


def test_an_unreadable_run_summary_is_named(prepared, tmp_path):
    finished = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    summary = tmp_path / trainer.SUMMARY
    for text, reason in (("{broken", "JSONDecodeError"), ("{}", "KeyError: 'train'")):
        summary.write_text(text)
        with pytest.raises(ValueError, match=f"^{summary}: not a readable run summary .{reason}"):
            train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    summary.unlink()  # the run is read from its checkpoints again: nothing trains
    again = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    assert again.checkpoint == finished.checkpoint
    assert again.tokens_per_second == pytest.approx(finished.tokens_per_second)


def test_a_dataset_of_another_tokenizer_is_refused_before_training(prepared, tmp_path):
    """``meloformer train`` (no Dagster gate in front) on a dataset built under another
    tokenizer: its ids would mean other tokens. Refused by name; nothing written."""
    from meloformer_model.data.manifest import MANIFEST

    dataset = shutil.copytree(prepared.dataset.path, tmp_path / "dataset")
    manifest = json.loads((dataset / MANIFEST).read_text())
    manifest["settings"]["vocab_hash"] = "0123456789abcdef"
    (dataset / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="built with tokenizer 0123456789abcdef, the vocabulary"):
        train(dataset, prepared.vocab, tmp_path / "run", FAST, log=lambda _: None)
    assert not _written(tmp_path / "run")


def test_a_dataset_the_run_cannot_step_through_is_refused(
    prepared, dataset_without_valid, tmp_path
):
    """Too few train tokens for one optimizer step, or an empty valid split (a validation loss
    of 0 picked the best checkpoint): named with the numbers, nothing written."""
    import datasets

    lengths = datasets.load_from_disk(str(prepared.dataset.path))["train"]["length"]
    tokens = sum(lengths)
    huge = replace(FAST, batch_size=len(windows(np.array(lengths), FAST.seq_len)) + 1)
    message = (
        f"the train split's {tokens:,} tokens fill 0 batch(es) of {huge.batch_size} x "
        f"{FAST.seq_len} tokens, and one optimizer step takes 1: lower batch_size"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        train(prepared.dataset.path, prepared.vocab, tmp_path / "huge", huge, log=lambda _: None)
    no_valid = dataset_without_valid
    with pytest.raises(ValueError, match=f"{no_valid}: the valid split is empty"):
        train(no_valid, prepared.vocab, tmp_path / "run", FAST, log=lambda _: None)
    for refused in (tmp_path / "huge", tmp_path / "run"):  # the run lock, and nothing else
        assert [p.name for p in refused.iterdir()] == [trainer.LOCK]


def test_a_second_training_into_one_folder_is_refused_by_pid(prepared, tmp_path):
    """While one process trains into a folder (holds its lock), another is refused, naming the
    holder, and changes nothing; once it is released the folder trains as usual."""
    import fcntl

    run_dir = tmp_path / "run"
    train(prepared.dataset.path, prepared.vocab, run_dir, FAST, stop_at=3, log=lambda _: None)
    files = _written(run_dir)
    with open(run_dir / trainer.LOCK, "a+") as other:  # another open file: another holder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("4242")
        other.flush()
        with pytest.raises(ValueError, match=f"^{run_dir}: another process .pid 4242. is train"):
            train(prepared.dataset.path, prepared.vocab, run_dir, FAST, log=lambda _: None)
        assert _written(run_dir) == files
    result = train(prepared.dataset.path, prepared.vocab, run_dir, FAST, log=lambda _: None)
    assert result.history[-1]["step"] == FAST.max_steps


def test_a_filesystem_that_cannot_lock_trains_unlocked_with_a_warning(
    prepared, tmp_path, monkeypatch
):
    """Lustre without its flock option refuses flock (ENOSYS): the run goes on, and says so."""
    import errno
    import fcntl

    def refuse(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    lines = []
    result = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lines.append)
    assert result.history[-1]["step"] == FAST.max_steps
    assert lines[0] == (
        f"{tmp_path}: this filesystem cannot lock files (Function not implemented); training "
        "unlocked: start no second training into this folder"
    )


def test_a_finished_run_is_returned_as_it_was_not_trained_again(prepared, tmp_path):
    first = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    assert first.tokens_per_second > 0 and (tmp_path / SUMMARY).exists()
    files = _written(tmp_path)
    steps, logs = [], []
    again = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=logs.append,
                  metrics=steps.append)  # fmt: skip
    assert steps == []  # no training step ran
    assert _written(tmp_path) == files
    assert again.figures() == first.figures()  # tokens/s, losses, wall time: the first run's
    assert any("reused" in line for line in logs)
    weights = zip(first.model.state_dict().values(), again.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)
    other_version = tmp_path / "another-dataset-version"
    assert completed_run(tmp_path, FAST, other_version) is None
    assert completed_run(tmp_path, replace(FAST, lr=1e-3), prepared.dataset.path) is None
    # eval and checkpoint settings would not have changed the weights: still this finished run
    same_run = replace(FAST, eval_every=2, keep_last=5)
    assert completed_run(tmp_path, same_run, prepared.dataset.path) == first.figures()


def test_a_changed_config_trains_again(prepared, tmp_path):
    train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    longer = replace(FAST, max_steps=8)
    steps = []
    result = train(prepared.dataset.path, prepared.vocab, tmp_path, longer, log=lambda _: None,
                   metrics=steps.append)  # fmt: skip
    assert [r["step"] for r in steps] == [7, 8]
    assert result.tokens_per_second > 0 and result.history[-1]["step"] == 8
    assert completed_run(tmp_path, longer, prepared.dataset.path) == result.figures()
    assert completed_run(tmp_path, FAST, prepared.dataset.path) is None


def test_resuming_another_run_is_refused_and_changes_nothing(prepared, tmp_path):
    """Another config, or the same config on another dataset version, is another run."""
    run_dir = tmp_path / "run"
    train(prepared.dataset.path, prepared.vocab, run_dir, FAST, stop_at=3, log=lambda _: None)
    files = _written(run_dir)
    version = prepared.dataset.path.name
    other_version = shutil.copytree(prepared.dataset.path, tmp_path / "0123456789abcdef")
    refused = {
        "lr 0.003 → 0.001": (replace(FAST, lr=1e-3), prepared.dataset.path),
        "size 'tiny' → 'small'": (replace(FAST, size="small"), prepared.dataset.path),
        "batch_size 4 → 8, seed 0 → 1": (
            replace(FAST, batch_size=8, seed=1, max_steps=9),
            prepared.dataset.path,
        ),
        "already at step 3, past max_steps 2": (replace(FAST, max_steps=2), prepared.dataset.path),
        f"dataset '{version}' → '0123456789abcdef'": (FAST, other_version),
    }
    for message, (config, dataset) in refused.items():
        with pytest.raises(ValueError, match=message) as refusal:
            train(dataset, prepared.vocab, run_dir, config, log=lambda _: None)
        assert str(run_dir) in str(refusal.value)
        assert _written(run_dir) == files


def test_compiled_blocks_are_refused_where_the_dense_backend_trains(prepared, tmp_path):
    """The GPU profiles compile their blocks; on a CPU the dense backend's per-document loop
    would recompile for every batch, so the run stops before any step, and writes nothing."""
    with pytest.raises(ValueError, match="compiled blocks need the flex backend"):
        train(prepared.dataset.path, prepared.vocab, tmp_path / "run",
              replace(FAST, compile_blocks=True), device="cpu", log=lambda _: None)  # fmt: skip
    assert not _written(tmp_path / "run")


def test_the_run_key_names_the_trajectory_not_its_length_or_measurements():
    key = FAST.run_key()
    assert len(key) == 12 and int(key, 16) >= 0
    measured = replace(FAST, max_steps=600, eval_every=7, checkpoint_every=7, keep_last=9,
                       compile_blocks=True,
                       gradient_checkpointing=not FAST.gradient_checkpointing)  # fmt: skip
    assert measured.run_key() == key == replace(FAST).run_key()
    for changed in (replace(FAST, lr=1e-3), replace(FAST, n_kv_head=1), TrainConfig()):
        assert changed.run_key() != key


def test_progress_lines_report_rate_and_time_left(prepared, tmp_path, monkeypatch):
    """A line per evaluation, and one whenever PROGRESS_EVERY_S has passed (here: every step),
    with the step out of max_steps, the losses, learning rate, tokens/s and the time left."""
    monkeypatch.setattr(trainer, "PROGRESS_EVERY_S", 0.0)
    logs = []
    result = train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=logs.append)
    pattern = re.compile(r"step (\d)/6: loss ([\d.]+)( val [\d.]+)?, lr ([\d.e+-]+), "
                         r"([\d,]+) tokens/s, (\d+) min (\d\d) s left")  # fmt: skip
    lines = [pattern.fullmatch(line) for line in logs]
    assert all(lines) and [int(m[1]) for m in lines] == [1, 2, 3, 4, 5, 6]
    for m, record in zip(lines, result.history):
        assert float(m[2]) == pytest.approx(record["loss"], abs=1e-4)
        assert bool(m[3]) == ("val_loss" in record) == (record["step"] in (3, 6))
        assert float(m[4]) == pytest.approx(record["lr"], rel=1e-2)
        assert int(m[5].replace(",", "")) > 0
    assert lines[-1].group(6, 7) == ("0", "00")  # nothing left after the last step


def _failing_at(step: int, make_loss):
    """trainer.forward_loss, with the loss of optimizer step ``step`` (grad_accum 1) replaced."""
    calls = []
    real = trainer.forward_loss

    def forward_loss(model, batch, reduction="sum"):
        loss, logits = real(model, batch, reduction)
        if model.training:  # not evaluation's batches
            calls.append(1)
            if len(calls) == step:
                loss = make_loss(loss)
        return loss, logits

    return forward_loss


def test_a_non_finite_loss_stops_the_run_before_the_weights_move(prepared, tmp_path, monkeypatch):
    """A NaN loss (bf16 overflow, too high a learning rate) stops the run with the step, the
    loss and what to change, before the optimizer step: the checkpoints already written stay
    the run's last good state."""
    monkeypatch.setattr(trainer, "forward_loss", _failing_at(5, lambda loss: loss * float("nan")))
    with pytest.raises(FloatingPointError, match=r"step 5 has loss nan .* weights were not "
                                                 r"updated. Lower lr .*step-0000003"):  # fmt: skip
        train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-0000003"]


def test_out_of_gpu_memory_names_the_settings_to_change(prepared, tmp_path, monkeypatch):
    def out_of_memory(loss):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward_loss", _failing_at(2, out_of_memory))
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"out of GPU memory in step 2 with micro-batches of 4 x 128 tokens "
                             r"\(tiny model, gradient checkpointing off\): lower batch_size and "
                             r"raise grad_accum .* or turn gradient_checkpointing on. The newest "
                             r"checkpoint is none yet"):  # fmt: skip
        train(prepared.dataset.path, prepared.vocab, tmp_path, FAST, log=lambda _: None)


def test_bf16_autocast_trains_on_cpu(prepared, tmp_path):
    """bf16 is a config, not a GPU privilege: on CPU it autocasts the matmuls too, so the losses
    move off the fp32 ones by bf16 rounding while the run still learns."""
    runs = {bf16: train(prepared.dataset.path, prepared.vocab, tmp_path / str(bf16),
                        replace(FAST, bf16=bf16), log=lambda _: None).history
            for bf16 in (False, True)}  # fmt: skip
    fp32, bf16 = ([h["loss"] for h in runs[key]] for key in (False, True))
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16[-1] < bf16[0]


def test_another_packing_is_another_run(monkeypatch):
    """The packing decides every batch: a run packed otherwise may not be continued."""
    key = FAST.run_key()
    monkeypatch.setattr(training_config, "PACKING", "in-order")
    assert FAST.run_key() != key


@pytest.mark.slow
def test_tiny_model_beats_the_unigram_baseline(prepared, tmp_path):
    config = replace(PROFILES["cpu"], seq_len=256, batch_size=8, max_steps=60, eval_every=60,
                     checkpoint_every=60, warmup_steps=10, lr=3e-3)  # fmt: skip
    result = train(prepared.dataset.path, prepared.vocab, tmp_path, config, log=lambda _: None)
    baseline = unigram_loss(prepared.vocab)
    val = result.history[-1]["val_loss"]
    print(f"unigram {baseline:.3f} nats, validation {val:.3f} nats")
    assert val < baseline - 1.0
    assert result.tokens_per_second > 0


def test_ddp_two_processes_agree_on_weights(prepared, tmp_path):
    """At 2048 tokens a row some packed rows carry padding, so the two processes' batches hold
    different numbers of real tokens, and a step's count must add both."""
    import datasets

    seq_len, batch_size, grad_accum, steps = 2048, 1, 2, 3
    data = datasets.load_from_disk(str(prepared.dataset.path))["train"]
    real = []
    for rank in (0, 1):
        loader = PackedLoader(data, batch_size, seq_len, PROFILES["cpu"].seed, rank=rank, world=2)
        plan = loader.plan(0)[: grad_accum * steps]
        real.append([int((loader.make(batch).doc >= 0).sum()) for batch in plan])
    per_step = np.add(*real).reshape(steps, grad_accum).sum(1).tolist()
    assert len(set(np.subtract(*real).tolist())) > 1, "the ranks' batches should differ in tokens"
    script = tmp_path / "ddp.py"
    script.write_text((Path(__file__).parent / "ddp_worker.py").read_text())
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(prepared.dataset.path), str(prepared.vocab_path), str(tmp_path),
         str(seq_len), str(batch_size), str(grad_accum)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["weights"] == digests[1]["weights"]
    assert digests[0]["step"] == digests[1]["step"] == steps
    assert digests[0]["step_tokens"] == digests[1]["step_tokens"] == per_step
    assert digests[0]["loss"] == digests[1]["loss"]  # the step loss over both processes' tokens
    # 2 micro-batches a step, gradients all-reduced once a step (DDP's no_sync for the first)
    assert digests[0]["allreduce_rounds"] == digests[1]["allreduce_rounds"] == 3
    # utilisation: both processes' tokens against both processes' peaks (1e12 each, patched)
    tiny = MODEL_SIZES["tiny"]
    per_token = 6 * digests[0]["parameters"] + 6 * tiny["n_layer"] * tiny["n_embd"] * seq_len
    expected = digests[0]["tokens_per_second"] * per_token / (2 * 1e12)
    assert digests[0]["mfu"] == pytest.approx(expected, rel=1e-9)
    assert np.isfinite(digests[0]["loss"])
