"""Training runs and evaluation reports, one partition per dataset version.

``trained_model`` refuses a dataset whose blocking checks did not all pass, holds the ``gpu``
pool (one training or evaluation per GPU: ``evaluation_report`` holds it too), and runs
in-process on one device or under ``torchrun`` through Dagster Pipes for several; either way
the loss curve, throughput, utilisation, memory and the checkpoint path come back as metadata.
A run already finished with the same config on the same dataset version is not trained again:
its saved figures are reported, marked as reused. Each config trains in its own folder
(``TrainConfig.run_key``), so a changed config is a new run beside the old one, never a
resumption of it.
"""

import json
import sys
from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG  # Dagster's (pinned)

from assets.config import DATASET_VERSION, TOKENIZER_CONFIG
from assets.corpus import arrow_dataset, latest_vocabulary_path
from assets.partitions import dataset_versions
from meloformer_model.data.dataset_checks import CHECK_NAMES
from meloformer_model.data.manifest import built_with
from meloformer_model.tokenizer.vocab import Vocabulary
from pipelines.resources import CorpusStorage, TrainingSettings

TRAINING_CODE_VERSION = "3"
HISTORY_PAGE = 100  # event records read per query while looking for a version's checks


def dataset_path(storage: CorpusStorage, version: str) -> Path:
    path = storage.stage_dir("arrow_dataset", DATASET_VERSION) / version
    if not path.exists():
        raise dg.Failure(f"dataset version {version} not found at {path}")
    return path


def require_checks_passed(instance: dg.DagsterInstance, version: str) -> None:
    """Refuse a dataset version unless each blocking check's newest evaluation *of that version*
    passed: the checks of a later (or earlier) version say nothing about it, so a backfill over
    old versions is gated by their own results."""
    builds = _materializations_of(instance, version)
    if not builds:
        raise dg.Failure(f"dataset version {version}: no arrow_dataset materialization records it")
    failed = []
    for name in CHECK_NAMES:
        evaluation = _newest_evaluation(instance, dg.AssetCheckKey(arrow_dataset.key, name), builds)
        if evaluation is None:
            failed.append(f"{name} (never evaluated on it)")
        elif not evaluation.passed:
            failed.append(name)
    if failed:
        raise dg.Failure(
            f"dataset version {version}: blocking checks not passed: {', '.join(failed)}"
        )


def _materializations_of(instance: dg.DagsterInstance, version: str) -> set[int]:
    """Storage ids of the ``arrow_dataset`` materializations whose data version is ``version``."""
    found, cursor = set(), None
    while True:
        page = instance.fetch_materializations(arrow_dataset.key, limit=HISTORY_PAGE, cursor=cursor)
        for record in page.records:
            if record.asset_materialization.tags.get(DATA_VERSION_TAG) == version:
                found.add(record.storage_id)
        if not page.has_more:
            return found
        cursor = page.cursor


def _newest_evaluation(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, builds: set[int]
) -> dg.AssetCheckEvaluation | None:
    """The newest evaluation of check ``key`` that targeted one of ``builds``, or None."""
    cursor = None
    while True:
        history = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=HISTORY_PAGE, cursor=cursor
        )
        for record in history:  # newest first
            evaluation = record.evaluation
            target = evaluation.target_materialization_data if evaluation else None
            if target is not None and target.storage_id in builds:
                return evaluation
        if len(history) < HISTORY_PAGE:
            return None
        cursor = history[-1].id


def require_same_tokenizer(data: Path, vocab: Vocabulary) -> None:
    """A dataset version built under another tokenizer config (its folder outlives a config
    change) has ids that mean other tokens in the current vocabulary: refuse to train on it."""
    built = built_with(data)
    if built != vocab.config_hash():
        raise dg.Failure(
            f"dataset {data} was built with tokenizer {built}, the current vocabulary is "
            f"{vocab.config_hash()}: its token ids mean other tokens. Train the dataset version "
            "built with the current tokenizer"
        )


def _run_path(training: TrainingSettings, version: str) -> Path:
    """``<profile>/<dataset version>/<run key>``: one folder per training run, so runs of other
    configs (up to their length and eval/checkpoint settings) never resume each other."""
    return Path(training.profile, version, training.config().run_key())


def training_run_dir(storage: CorpusStorage, training: TrainingSettings, version: str) -> Path:
    return storage.root / "trained_model" / _run_path(training, version)


def _metadata(result: dict, run_dir: Path, profile: str, config: dict, baseline: float) -> dict:
    from meloformer_model.evaluation.plots import save_loss_curve

    history = result["history"]
    curve = save_loss_curve(history, run_dir / "loss_curve.png", baseline)
    evaluated = [h for h in history if "val_loss" in h]
    rows = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['val_loss']:.3f} |" for h in evaluated)
    # left out when not measured, rather than reported as a figure: no evaluation yet, no known
    # peak for this device, no GPU memory counter (CPU)
    measured = {
        "val_loss": evaluated[-1]["val_loss"] if evaluated else None,
        "model_flops_utilisation": result["mfu"],
        "peak_memory_bytes": result["peak_memory_bytes"],
    }
    return {
        "profile": profile,
        "steps": history[-1]["step"],
        "train_loss": history[-1]["loss"],
        "unigram_loss": baseline,
        "tokens_per_second": result["tokens_per_second"],
        **{name: value for name, value in measured.items() if value is not None},
        "wall_seconds": result["wall_seconds"],
        "parameters": result["parameters"],
        "processes": result["processes"],
        "checkpoint": dg.MetadataValue.path(str(result["checkpoint"])),
        "best_checkpoint": dg.MetadataValue.path(str(result["best"])),
        "loss_curve": dg.MetadataValue.path(str(curve)),
        "validation_curve": dg.MetadataValue.md(
            "| step | train | validation |\n|---|---|---|\n" + rows
        ),
        "config": dg.MetadataValue.json(config),
    }


@dg.asset(
    deps=[arrow_dataset],
    partitions_def=dataset_versions,
    pool="gpu",
    code_version=TRAINING_CODE_VERSION,
    group_name="training",
    # on_missing, not eager: the dataset asset is unpartitioned, so each new build counts as an
    # update of every version's partition, and eager would retrain them all
    automation_condition=dg.AutomationCondition.on_missing()
    & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    description="A training run on one dataset version (checkpoints: safetensors + JSON).",
)
def trained_model(
    context: dg.AssetExecutionContext,
    storage: CorpusStorage,
    training: TrainingSettings,
    pipes: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    # torch and the training stack load only when a training runs, not with the definitions
    from meloformer_model.training.checkpoint import read_configs
    from meloformer_model.training.trainer import completed_run, train, unigram_loss

    version = context.partition_key
    require_checks_passed(context.instance, version)
    data = dataset_path(storage, version)
    vocab_path = latest_vocabulary_path(storage)
    vocab = Vocabulary.load(vocab_path, expected=TOKENIZER_CONFIG)
    require_same_tokenizer(data, vocab)
    config = training.config()
    run_dir = training_run_dir(storage, training, version)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = completed_run(run_dir, config, data)
    reused = result is not None
    if reused:
        context.log.info(
            f"{run_dir} already finished its {config.max_steps} steps with this config on dataset "
            f"{version}: reusing that run and its figures, training nothing"
        )
    elif training.processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={training.processes}",
            "-m",
            "pipelines.train_entry",
            str(data),
            str(vocab_path),
            str(run_dir),
            json.dumps(config.to_dict()),
        ]
        invocation = pipes.run(context=context, command=command)
        reported = invocation.get_materialize_result().metadata
        result = json.loads(reported["result"].value)
    else:
        result = train(data, vocab, run_dir, config, log=context.log.info).figures()
    # a reused run reports the config it trained with (its eval and checkpoint settings may
    # differ from the ones asked for now)
    trained = read_configs(Path(result["checkpoint"]))["train"] if reused else config.to_dict()
    metadata = _metadata(result, run_dir, training.profile, trained, unigram_loss(vocab))
    metadata["reused_completed_run"] = reused
    metadata["dataset"] = dg.MetadataValue.path(str(data))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[trained_model],
    partitions_def=dataset_versions,
    pool="gpu",  # its validation pass and generation run on the GPU when there is one
    code_version=TRAINING_CODE_VERSION,
    group_name="training",
    description="Perplexity per token family, generated vs held-out music, piano rolls, samples.",
)
def evaluation_report(
    context: dg.AssetExecutionContext, storage: CorpusStorage, training: TrainingSettings
) -> dg.MaterializeResult:
    from meloformer_model.evaluation.report import evaluate_checkpoint
    from meloformer_model.training.checkpoint import best_checkpoint

    version = context.partition_key
    run_dir = training_run_dir(storage, training, version)
    checkpoint = best_checkpoint(run_dir)
    if checkpoint is None:
        raise dg.Failure(f"no best checkpoint in {run_dir}: materialize trained_model first")
    vocab = Vocabulary.load(latest_vocabulary_path(storage), expected=TOKENIZER_CONFIG)
    out = storage.root / "evaluation_report" / _run_path(training, version)  # one per run
    ev = evaluate_checkpoint(
        checkpoint,
        dataset_path(storage, version),
        vocab,
        out,
        pieces=training.eval_pieces,
        bars=training.eval_bars,
        log=context.log.info,
    )
    s = ev.summary
    return dg.MaterializeResult(
        metadata={
            "summary": dg.MetadataValue.md(ev.short_markdown()),
            "report": dg.MetadataValue.path(str(ev.html)),
            "markdown_report": dg.MetadataValue.path(str(ev.markdown)),
            "validation_perplexity": s["validation"]["perplexity"],
            "similarity_error": s["comparison"]["similarity_error"],
            "pitch_class_overlap": s["comparison"]["pitch_class_overlap"],
            "samples": len(ev.samples),
            "sample_folder": dg.MetadataValue.path(str(out)),
        }
    )
