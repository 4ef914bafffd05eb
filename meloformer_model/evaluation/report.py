"""The evaluation report: validation perplexity (per token and per token family), generated
pieces against held-out real ones on the musical metrics, piano rolls, sample MIDI files, and an
HTML + Markdown report that links its images instead of inlining them."""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meloformer_model.atomic import atomic_folder
from meloformer_model.data.manifest import built_with
from meloformer_model.data.midi_io import write_midi
from meloformer_model.evaluation import metrics
from meloformer_model.evaluation.metrics import similarity_error_text as se_text
from meloformer_model.evaluation.plots import save_comparison, save_loss_curve
from meloformer_model.generation import generate_batch
from meloformer_model.sampling import (
    EVAL_BARS,
    EVAL_PIECES,
    EVAL_PROMPT_BARS,
    EVAL_SAMPLING,
    SamplingConfig,
)
from meloformer_model.tokenizer.hid import HIDTokenizer
from meloformer_model.tokenizer.vocab import FAMILIES, Vocabulary
from meloformer_model.training.checkpoint import load_model, read_state, tokenizer_config
from meloformer_model.training.data import IGNORE, PackedLoader, load_splits
from meloformer_model.training.trainer import (
    PROGRESS_EVERY_S,
    device_for,
    forward_loss,
    unigram_loss,
)


@torch.no_grad()
def family_perplexity(
    model,
    loader: PackedLoader,
    vocab: Vocabulary,
    bf16: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Per-token perplexity overall and per family of the *target* token, on the model's
    device (``bf16``: under bf16 autocast, as the model trained). ``progress`` hears the
    batches done after each batch."""
    model.eval()
    device = model.embed.weight.device
    loss_sum = np.zeros(len(FAMILIES))
    count = np.zeros(len(FAMILIES))
    for index, batch in loader.epoch(0):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses, _ = forward_loss(model, batch, reduction="none")
        targets = batch.targets.flatten()
        keep = targets != IGNORE
        losses = losses[keep]
        families = vocab.family_of(targets[keep].cpu().numpy())
        np.add.at(loss_sum, families, losses.cpu().numpy())
        np.add.at(count, families, 1)
        if progress:
            progress(index + 1)
    total = loss_sum.sum() / max(count.sum(), 1)
    per_family = {
        f: {"tokens": int(count[i]), "perplexity": math.exp(loss_sum[i] / count[i])}
        for i, f in enumerate(FAMILIES)
        if count[i]
    }
    return {
        "loss": total,
        "perplexity": math.exp(total),
        "tokens": int(count.sum()),
        "families": per_family,
    }


@dataclass
class Evaluation:
    summary: dict
    html: Path
    markdown: Path
    figures: list[Path]
    samples: list[Path]

    def short_markdown(self) -> str:
        s = self.summary
        lines = [
            f"**validation perplexity** {s['validation']['perplexity']:.2f} "
            f"({s['validation']['loss']:.3f} nats/token; {_baseline(s)})",
            f"**similarity error** {se_text(s['comparison']['similarity_error'])}, "
            f"**pitch-class overlap** {s['comparison']['pitch_class_overlap']:.3f}",
            f"{len(self.samples)} sample MIDI files; full report: {self.html}",
        ]
        return "\n\n".join(lines)


def evaluate_checkpoint(
    checkpoint: Path,
    dataset_path: Path,
    vocab: Vocabulary,
    out_dir: Path,
    pieces: int = EVAL_PIECES,
    prompt_bars: int = EVAL_PROMPT_BARS,
    bars: int = EVAL_BARS,
    sampling: SamplingConfig = EVAL_SAMPLING,
    device: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    """Everything the report shows, written under ``out_dir``; the model runs on ``device``
    (default: the GPU when there is one: a large model's validation pass is GPU work). The
    folder is written whole beside ``out_dir`` and then takes its place: a failed evaluation
    leaves the previous report as it was, and a smaller one leaves no stale samples behind.
    ``log`` hears each stage, and the validation pass at least every ``PROGRESS_EVERY_S``."""
    started = time.monotonic()
    model, configs = load_model(checkpoint, device_for(device))
    history = read_state(checkpoint)["history"]  # read before the long passes: it may be broken
    _require_one_tokenizer(checkpoint, configs, dataset_path, vocab)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    data = load_splits(dataset_path)
    if not len(data["valid"]):
        raise ValueError(f"{dataset_path}: the valid split is empty: no perplexity to report")
    train = configs["train"]
    loader = PackedLoader(data["valid"], train["batch_size"], train["seq_len"], shuffle=False)
    batches = len(loader)  # packs the split: once
    log(f"validation: {batches} batches of {train['batch_size']} x {train['seq_len']} tokens on "
        f"{model.embed.weight.device}")  # fmt: skip
    progress = _throttled(log, batches)
    validation = family_perplexity(model, loader, vocab, train["bf16"], progress)
    log(f"validation perplexity {validation['perplexity']:.3f} over {validation['tokens']:,} "
        "tokens")  # fmt: skip
    held_out = data["test"] if len(data["test"]) else data["valid"]
    rows = _continuable(held_out, prompt_bars, pieces)
    if not rows:
        raise ValueError(
            f"{dataset_path}: no held-out piece is longer than the {prompt_bars} prompt bars: "
            "nothing to continue and compare"
        )
    prompts, reals = [], []
    for row in rows:
        ids, bar = np.asarray(row["ids"]), np.asarray(row["bar"])
        cut = int(np.searchsorted(bar, prompt_bars, side="left"))
        end = int(np.searchsorted(bar, prompt_bars + bars, side="left"))
        prompts.append(ids[:cut].tolist())
        reals.append(np.append(ids[:end], tokenizer.vocab["EOS"]))
    config = SamplingConfig(**{**sampling.__dict__, "bars": bars})  # piece i: seed + i
    log(f"generating {len(rows)} continuations of {bars} bars")
    continuations = generate_batch(model, tokenizer, prompts, config)
    real_scores = [tokenizer.decode_score(ids) for ids in reals]
    gen_scores = [tokenizer.decode_score(ids) for ids in continuations]
    # the bars after the prompt (the prompt is in both), of the pieces whose continuation got
    # past it within max_tokens
    real_pieces = [metrics.piece(tokenizer, s) for s in real_scores]
    pairs = [
        (generated, real)
        for generated, real in zip((metrics.piece(tokenizer, s) for s in gen_scores), real_pieces)
        if len(generated.layout.starts) > prompt_bars
    ]
    if not pairs:
        raise ValueError(
            f"no continuation got past its {prompt_bars} prompt bars within max_tokens "
            f"{sampling.max_tokens}: raise it, or lower the prompt bars"
        )
    comparison = metrics.compare_sets(
        *([metrics.bars_from(p, prompt_bars) for p in side] for side in zip(*pairs))
    )
    baseline = unigram_loss(vocab)
    summary = {
        "checkpoint": str(checkpoint),
        "dataset": str(dataset_path),
        "validation": validation,
        "unigram_loss": baseline,
        "comparison": comparison,
        "pieces": len(rows),
        "compared_pieces": len(pairs),
        "prompt_bars": prompt_bars,
        "generated_bars": bars,
    }
    log(f"writing the report to {out_dir} ({time.monotonic() - started:.0f} s so far)")
    with atomic_folder(out_dir) as folder:
        figures = [save_loss_curve(history, folder / "loss_curve.png", baseline)]
        samples, originals = [], []
        for i, (row, real, generated) in enumerate(zip(rows, real_scores, gen_scores)):
            stem = Path(row["path"]).stem
            samples.append(write_midi(generated, folder / f"generated_{i}_{stem}.mid"))
            originals.append(write_midi(real, folder / f"real_{i}_{stem}.mid"))
            prompt_end = real_pieces[i].layout.bounds[prompt_bars] / real_pieces[i].beat_units
            title = f"{stem}: {prompt_bars} bars of prompt, {bars} generated"
            figures.append(
                save_comparison(real, generated, folder / f"pianoroll_{i}.png", title, prompt_end)
            )
        midi = list(zip(samples, originals))
        (folder / "evaluation.json").write_text(json.dumps(summary, indent=2))
        (folder / "report.md").write_text(_markdown(summary, figures, midi))
        (folder / "report.html").write_text(_html(summary, figures, midi))
    return Evaluation(
        summary,
        out_dir / "report.html",
        out_dir / "report.md",
        [out_dir / p.name for p in figures],
        [out_dir / p.name for p in samples],
    )


def _continuable(held_out, prompt_bars: int, pieces: int) -> list[dict]:
    """The first ``pieces`` held-out rows with a bar after the prompt (a piece no longer than
    its prompt leaves nothing to compare, and its prompt would hold its EOS)."""
    rows = []
    for row in held_out:
        if row["bar"][-1] >= prompt_bars:
            rows.append(row)
            if len(rows) == pieces:
                break
    return rows


def _throttled(log: Callable[[str], None], total: int) -> Callable[[int], None]:
    """A progress callback that logs at most every ``PROGRESS_EVERY_S``, and at the end."""
    last = time.monotonic()

    def progress(done: int) -> None:
        nonlocal last
        if done == total or time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            log(f"validation: batch {done}/{total}")

    return progress


def _require_one_tokenizer(
    checkpoint: Path, configs: dict, dataset_path: Path, vocab: Vocabulary
) -> None:
    """The checkpoint, the dataset and the vocabulary must share one tokenizer: under another,
    every id names another token and the figures would be nonsense, not an error."""
    trained = configs.get("vocab_hash")  # absent in checkpoints from before run keys
    built = built_with(dataset_path)
    for what, found in (("the vocabulary given", vocab.config_hash()), (str(dataset_path), built)):
        if trained and found and found != trained:
            raise ValueError(
                f"{checkpoint} was trained with tokenizer {trained}, {what} uses {found}: its "
                "token ids mean other tokens"
            )


def _baseline(summary: dict) -> str:
    """The unigram baseline in the units the sentence before it uses: beside a perplexity, its
    loss alone read as a perplexity the model barely beat."""
    loss = summary["unigram_loss"]
    return f"unigram baseline: perplexity {math.exp(loss):.2f}, {loss:.3f} nats/token"


def _metric_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(metric, what it measures, real, generated)."""
    return [
        (name, metrics.meaning(name), f"{v['real']:.3f}", f"{v['generated']:.3f}")
        for name, v in summary["comparison"]["metrics"].items()
    ]


def _markdown(summary: dict, figures: list[Path], midi: list[tuple[Path, Path]]) -> str:
    """The report in Markdown, its images and MIDI files linked by name (they lie beside it)."""
    v = summary["validation"]
    lines = [
        "# MeloFormer evaluation",
        "",
        f"Checkpoint `{summary['checkpoint']}`, dataset `{summary['dataset']}`.",
        "",
        f"Validation: **perplexity {v['perplexity']:.2f}** ({v['loss']:.3f} nats/token over "
        f"{v['tokens']} tokens; {_baseline(summary)}).",
        "",
        "| token family | tokens | perplexity |",
        "|---|---|---|",
    ]
    lines += [f"| {f} | {x['tokens']} | {x['perplexity']:.2f} |" for f, x in v["families"].items()]
    lines += [
        "",
        f"{summary['pieces']} pieces: {summary['prompt_bars']} bars of a held-out piece "
        f"as prompt, {summary['generated_bars']} bars generated; the metrics compare the bars "
        f"after the prompt, of the {summary['compared_pieces']} pieces whose continuation got "
        "past it.",
        "",
        "| metric | what it measures | real | generated |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in _metric_rows(summary)]
    c = summary["comparison"]
    lines += [
        "",
        f"Pitch-class histogram overlap: {c['pitch_class_overlap']:.3f}; "
        f"similarity error (SE): {se_text(c['similarity_error'])}.",
        "",
        "## Samples",
        "",
        "| piece | generated | real |",
        "|---|---|---|",
    ]
    lines += [f"| {i} | [{g.name}]({g.name}) | [{r.name}]({r.name}) |"
              for i, (g, r) in enumerate(midi)]  # fmt: skip
    lines += ["", *(f"![{p.stem}]({p.name})" for p in figures), ""]
    return "\n".join(lines)


def _html(summary: dict, figures: list[Path], midi: list[tuple[Path, Path]]) -> str:
    v = summary["validation"]
    families = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{x['tokens']}</td><td>{x['perplexity']:.2f}</td></tr>"
        for f, x in v["families"].items()
    )
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in _metric_rows(summary)
    )
    loss_curve, *rolls = figures
    pieces = "".join(
        f'<h3>{i}: {html.escape(r.stem.split("_", 2)[2])}</h3><p><a href="{g.name}">generated</a>'
        f' · <a href="{r.name}">real</a> (MIDI)</p><img src="{roll.name}" alt="{roll.stem}">'
        for i, ((g, r), roll) in enumerate(zip(midi, rolls))
    )
    c = summary["comparison"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>MeloFormer evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
img{{max-width:100%}}.big{{font-size:1.4em}}</style>
</head><body><h1>MeloFormer evaluation</h1>
<p>Checkpoint <code>{html.escape(summary["checkpoint"])}</code>, dataset
<code>{html.escape(summary["dataset"])}</code></p>
<p class="big">Validation perplexity <b>{v["perplexity"]:.2f}</b> ({v["loss"]:.3f} nats/token;
{_baseline(summary)})</p>
<table><tr><th>token family</th><th>tokens</th><th>perplexity</th></tr>{families}</table>
<h2>Generated vs held-out real music (the bars after the prompt)</h2>
<p>Pitch-class overlap <b>{c["pitch_class_overlap"]:.3f}</b>, similarity error
<b>{se_text(c["similarity_error"])}</b></p>
<table><tr><th>metric</th><th>what it measures</th><th>real</th><th>generated</th></tr>{rows}
</table>
<h2>Training</h2><img src="{loss_curve.name}" alt="{loss_curve.stem}">
<h2>Samples: the prompt shaded, then real (top) and generated (bottom)</h2>{pieces}
</body></html>"""
