"""The ``meloformer`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from meloformer_model.atomic import atomic_path, write_bytes_atomic
from meloformer_model.data.corpus import inspect_files, write_filter_results
from meloformer_model.data.filtering import FilterConfig
from meloformer_model.data.midi_io import MidiReadError, find_midi_files, load_score, write_midi
from meloformer_model.data.parallel import available_cores, release_freed_memory
from meloformer_model.data.tokenize_corpus import (
    TOKEN_COLUMNS,
    WorkItem,
    results_table,
    tokenize_files,
)
from meloformer_model.sampling import EVAL_BARS, EVAL_PIECES, SamplingConfig
from meloformer_model.tokenizer.config import TokenizerConfig
from meloformer_model.tokenizer.hid import HIDTokenizer, TokenizeError
from meloformer_model.tokenizer.vocab import FAMILIES, Vocabulary


class CliError(Exception):
    """Reported as one line on stderr with exit code 1."""


def _print_reasons(summary: dict) -> None:
    print(
        f"{summary['files']} files: {summary['accepted']} accepted, {summary['rejected']} rejected"
    )
    for reason, count in summary["reasons"].items():
        print(f"  {reason:28s} {count}")


def _midi_paths(sources: list[str]) -> list[Path]:
    """The MIDI files under ``sources``; a source that is not there is a typo to report, not
    a file to reject."""
    missing = [src for src in sources if not Path(src).exists()]
    if missing:
        raise CliError(f"no such file or folder: {', '.join(missing)}")
    paths = find_midi_files(sources)
    if not paths:
        raise CliError(f"no MIDI files found in {', '.join(sources)}")
    return paths


def cmd_filter(args: argparse.Namespace) -> None:
    paths = _midi_paths(args.sources)
    config = FilterConfig()
    frame = inspect_files(paths, config, args.workers, progress=not args.quiet)
    summary = write_filter_results(frame, Path(args.out), config)
    _print_reasons(summary)
    print(f"wrote {Path(args.out) / 'accepted.parquet'} and {Path(args.out) / 'rejected.parquet'}")


def _check_outputs(outputs: list[Path], inputs: list[str | Path]) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or that
    cannot be files (a folder, or a parent that is a file)."""
    sources = {Path(p).resolve() for p in inputs if p}
    seen: set[Path] = set()
    for out in outputs:
        target = out.resolve()
        inside = any(target.is_relative_to(s) for s in sources if s.is_dir()) and target.exists()
        if target in sources or inside or any(s.is_relative_to(target) for s in sources):
            raise CliError(f"{out}: the output would overwrite an input")
        if target in seen:
            raise CliError(f"{out}: written twice by this command (another output has its name)")
        seen.add(target)
        if target.is_dir():
            raise CliError(f"{out}: is a folder, not a file to write")
        parent = next((p for p in target.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise CliError(f"{out}: {parent} is a file, not a folder")


def _load_tokens(path: str) -> tuple[HIDTokenizer, np.ndarray]:
    try:
        data = json.loads(Path(path).read_text())
        if not all(type(i) is int for i in data["ids"]):
            raise ValueError("ids must be whole numbers")
        ids = np.asarray(data["ids"], dtype=np.int64)
        config = TokenizerConfig.from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CliError(
            f"{path}: not a token file written by 'meloformer tokenize' ({exc})"
        ) from exc
    tokenizer = HIDTokenizer(config)
    if data.get("config_hash") != config.config_hash():
        raise CliError(f"{path}: config hash does not match the stored tokenizer config")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(tokenizer.vocab)):
        raise CliError(f"{path}: token ids outside the vocabulary of {len(tokenizer.vocab)} tokens")
    return tokenizer, ids.astype(np.int32)


def _naming(path: str | Path, exc: Exception) -> CliError:
    """The error, with the input it is about in front unless it already names it."""
    return CliError(str(exc) if str(path) in str(exc) else f"{path}: {exc}")


def _encode(path: str) -> tuple[HIDTokenizer, object]:
    tokenizer = HIDTokenizer()
    try:
        return tokenizer, tokenizer.encode(path)
    except (MidiReadError, TokenizeError) as exc:
        raise _naming(path, exc) from exc


def cmd_tokenize(args: argparse.Namespace) -> None:
    _check_outputs([Path(args.output)], [args.file])
    tokenizer, seq = _encode(args.file)
    payload = {
        "source": str(args.file),
        "config_hash": tokenizer.config.config_hash(),
        "config": tokenizer.config.to_dict(),
        "tokens": tokenizer.vocab.decode_names(seq.ids),
        **{name: values.tolist() for name, values in seq.arrays().items()},
    }
    write_bytes_atomic(args.output, json.dumps(payload).encode())
    print(f"{len(seq)} tokens -> {args.output}")


def cmd_decode(args: argparse.Namespace) -> None:
    _check_outputs([Path(args.output)], [args.file])
    tokenizer, ids = _load_tokens(args.file)
    score = tokenizer.decode_score(ids)
    write_midi(score, args.output)
    print(f"{score.note_num()} notes in {len(score.tracks)} tracks -> {args.output}")


def cmd_inspect(args: argparse.Namespace) -> None:
    try:
        score = load_score(args.file)
    except MidiReadError as exc:
        raise CliError(str(exc)) from exc
    tokenizer, seq = _encode(args.file)
    names = tokenizer.vocab.decode_names(seq.ids)
    print(
        f"{args.file}: {score.note_num()} notes, {len(score.tracks)} tracks, "
        f"tpq {score.ticks_per_quarter}, {int(seq.bar.max()) + 1} bars, {len(seq)} tokens"
    )
    for track in score.tracks:
        kind = "drums" if track.is_drum else f"program {track.program}"
        print(f"  track {track.name!r}: {kind}, {len(track.notes)} notes")
    bars: dict[int, list[str]] = {}
    for name, bar in zip(names[1:-1], seq.bar[1:-1].tolist()):
        bars.setdefault(bar, []).append(name)
    for bar, tokens in bars.items():
        chord = next((t[6:] for t in tokens if t.startswith("Chord_")), "N")
        notes = sum(t.startswith(("Pitch_", "Drum_")) for t in tokens)
        print(f"bar {bar:4d}  chord {chord:8s} notes {notes:3d} | {' '.join(tokens)}")


# Files tokenized (and held in memory) at a time by `prepare`: the tokens' memory does not grow
# with the corpus (the filter's table does, a row per file), and each chunk is one row group of
# tokens.parquet.
PREPARE_CHUNK = 1024


def cmd_prepare(args: argparse.Namespace) -> None:
    """Filter, tokenize and count a corpus: the library end to end, chunk by chunk."""
    out = Path(args.out)
    started = time.perf_counter()
    paths = _midi_paths(args.sources)
    filter_config = FilterConfig()
    frame = inspect_files(paths, filter_config, args.workers, progress=not args.quiet)
    summary = write_filter_results(frame, out / "filter", filter_config)
    _print_reasons(summary)
    accepted = frame.filter(pl.col("accepted")).select("path", "content_hash")
    config = TokenizerConfig()
    vocab = Vocabulary(config)
    lengths: list[int] = []
    failures = 0
    bar = tqdm(total=accepted.height, desc="tokenize", unit="file", disable=args.quiet)
    with atomic_path(out / "tokens.parquet") as tmp:
        writer = None
        for chunk in accepted.iter_slices(PREPARE_CHUNK):
            paths = chunk["path"].to_list()
            items = [WorkItem(Path(p), p) for p in paths]
            results = tokenize_files(items, config, args.workers, progress=False)
            for result in results:
                if result.error:
                    failures += 1
                    print(f"tokenize failed: {result.error}", file=sys.stderr)
                else:
                    vocab.add_counts(result.arrays["ids"])
                    lengths.append(len(result.arrays["ids"]))
            keys = {"path": paths, "content_hash": chunk["content_hash"].to_list()}
            table = results_table(results, TOKEN_COLUMNS, keys)
            table = table.filter(pc.is_null(pc.field("error")))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            bar.update(len(paths))
            release_freed_memory()
        if writer is None:
            raise CliError("no file passed the filter: nothing to tokenize")
        writer.close()
    bar.close()
    vocab.save(out / "vocab.json")
    lengths = np.asarray(lengths, dtype=np.int64)
    family_counts = Counter()
    for family, (start, end) in vocab.family_ranges.items():
        family_counts[family] = int(vocab.counts[start:end].sum())
    print(
        f"tokenized {len(lengths)} files, {int(lengths.sum())} tokens "
        f"(median {int(np.median(lengths))}, max {int(lengths.max())}), "
        f"{failures} failures, {time.perf_counter() - started:.1f} s"
    )
    print("tokens per family: " + ", ".join(f"{f} {family_counts[f]}" for f in FAMILIES))
    print(f"wrote {out / 'tokens.parquet'}, {out / 'vocab.json'} ({len(vocab)} tokens)")


def cmd_generate(args: argparse.Namespace) -> None:
    from meloformer_model.generation import (
        Grammar,
        generate_batch,
        piano_roll_path,
        prompt_from_midi,
        prompt_from_scratch,
        write_outputs,
    )
    from meloformer_model.training.checkpoint import (
        CheckpointError,
        load_model,
        tokenizer_config,
    )
    from meloformer_model.training.trainer import device_for

    if args.samples < 1:
        raise CliError(f"--samples {args.samples}: ask for at least one piece")
    if args.prompt and (args.tempo is not None or args.time_signature is not None):
        raise CliError("--tempo and --time-signature start a piece from scratch; a --prompt "
                       "keeps its own (drop one or the other)")  # fmt: skip
    if args.prompt_bars is not None and not args.prompt:
        raise CliError("--prompt-bars takes the first bars of a --prompt; none was given")
    out = Path(args.output)
    paths = [out if args.samples == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
             for i in range(1, args.samples + 1)]  # fmt: skip
    rolls = [piano_roll_path(path) for path in paths] if args.piano_roll else []
    _check_outputs(paths + rolls, [args.checkpoint, args.prompt])
    try:
        sampling = SamplingConfig(**{f.name: getattr(args, f.name) for f in fields(SamplingConfig)})
        device = device_for(args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        model, configs = load_model(Path(args.checkpoint), device)
    except CheckpointError as exc:
        raise CliError(str(exc)) from exc
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    try:
        if args.prompt:
            prompt = prompt_from_midi(tokenizer, args.prompt, args.prompt_bars)
        else:
            prompt = prompt_from_scratch(tokenizer, args.tempo, args.time_signature)
    except (MidiReadError, TokenizeError, ValueError) as exc:
        raise (_naming(args.prompt, exc) if args.prompt else CliError(str(exc))) from exc
    try:
        Grammar(tokenizer, args.instruments)  # refuses unknown programs before sampling starts
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if len(prompt) >= sampling.max_tokens:
        raise CliError(
            f"the prompt has {len(prompt)} tokens, --max-tokens {sampling.max_tokens} leaves no "
            "room to generate: raise --max-tokens or shorten the prompt (--prompt-bars)"
        )
    total = args.bars * args.samples
    with tqdm(total=total, desc="generate", unit="bar", disable=args.quiet) as bar:
        pieces = generate_batch(
            model,
            tokenizer,
            [prompt] * args.samples,
            sampling,
            args.instruments,
            progress=lambda done: bar.update(done - bar.n),
        )
    for path, ids in zip(paths, pieces):
        score = write_outputs(tokenizer, ids, path, args.piano_roll)
        notes, tracks = score.note_num(), len(score.tracks)
        roll = f" and {piano_roll_path(path)}" if args.piano_roll else ""
        print(f"{len(ids)} tokens, {notes} notes in {tracks} tracks -> {path}{roll}")


def _dataset_and_vocabulary(args: argparse.Namespace) -> tuple[Path, Vocabulary]:
    dataset = Path(args.dataset)
    if not (dataset / "dataset_dict.json").is_file():
        raise CliError(f"{dataset}: not an Arrow dataset version folder (no dataset_dict.json)")
    try:
        return dataset, Vocabulary.load(args.vocab)
    except ValueError as exc:  # VocabularyMismatchError, naming the file and the reason
        raise CliError(str(exc)) from exc


def _check_report_folder(out: Path, inputs: list) -> None:
    """``--out`` is replaced whole: refuse anything there but an earlier report, and a folder
    holding an input."""
    target = out.resolve()
    if any(Path(p).resolve().is_relative_to(target) for p in inputs):
        raise CliError(f"{out}: holds an input of this evaluation; the report replaces it whole")
    if target.exists() and not (target / "evaluation.json").is_file():
        raise CliError(
            f"{out}: exists and is not an earlier report (no evaluation.json); the report "
            "replaces its folder whole, so give a new or a report folder"
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    """The evaluation report of a checkpoint outside Dagster (what ``evaluation_report``
    writes): for runs trained with ``meloformer train``."""
    from meloformer_model.evaluation.metrics import similarity_error_text as se_text
    from meloformer_model.evaluation.report import evaluate_checkpoint

    dataset, vocab = _dataset_and_vocabulary(args)
    _check_report_folder(Path(args.out), [args.checkpoint, dataset, args.vocab])
    try:
        ev = evaluate_checkpoint(
            Path(args.checkpoint),
            dataset,
            vocab,
            Path(args.out),
            pieces=args.pieces,
            bars=args.bars,
            device=args.device,
            log=lambda line: print(line, file=sys.stderr),  # stdout: the summary line alone
        )
    except ValueError as exc:  # CheckpointError, tokenizer mismatch, device
        raise CliError(str(exc)) from exc
    v, c = ev.summary["validation"], ev.summary["comparison"]
    print(f"validation perplexity {v['perplexity']:.3f} ({v['loss']:.4f} nats/token over "
          f"{v['tokens']:,} tokens), similarity error {se_text(c['similarity_error'])}, "
          f"{len(ev.samples)} pieces; report {ev.html}")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> None:
    """Train (or resume) a run outside Dagster; under ``torchrun`` every process runs this."""
    import torch
    import torch.distributed as dist

    from meloformer_model.training.config import profile_config
    from meloformer_model.training.trainer import setup_distributed, train

    bf16 = None if args.bf16 is None else bool(args.bf16)
    try:
        config = profile_config(args.profile, args.size, max_steps=args.max_steps, bf16=bf16)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    dataset, vocab = _dataset_and_vocabulary(args)
    setup_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        result = train(dataset, vocab, Path(args.out), config, device=args.device,
                       log=print if rank == 0 else lambda _: None)  # fmt: skip
    except (ValueError, FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
        raise CliError(str(exc)) from exc
    if rank == 0:
        val = [h["val_loss"] for h in result.history if "val_loss" in h]
        val_loss = f"{val[-1]:.4f}" if val else "not evaluated"
        mfu = "unknown (no peak for this GPU)" if result.mfu is None else f"{result.mfu:.1%}"
        print(f"{result.history[-1]['step']} steps, validation loss {val_loss}, "
              f"{result.tokens_per_second:,.0f} tokens/s, MFU {mfu}; checkpoint "
              f"{result.checkpoint}, best {result.best}")  # fmt: skip


SAMPLING_HELP = {
    "bars": "bars to generate",
    "temperature": "softmax temperature; 0 takes the likeliest token",
    "top_k": "sample among the k likeliest tokens; 0: all",
    "top_p": "sample among the likeliest tokens holding this probability",
    "max_tokens": "tokens per piece, the prompt's included",
    "seed": "random seed of the first piece",
}
DEVICE_HELP = "cpu, cuda, cuda:1 (default: cuda when there is one)"


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _time_signature(text: str) -> tuple[int, int]:
    try:
        num, den = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N/D, such as 3/4") from None
    return num, den


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meloformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def corpus_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("sources", nargs="+", help="MIDI files or folders (searched recursively)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--workers", type=_positive_int, default=available_cores(),
                       help="processes (default: the available cores, %(default)s)")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("filter", help="quality-filter and dedup a corpus into parquet tables")
    corpus_options(p)
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("prepare", help="filter + tokenize + vocabulary (the library end to end)")
    corpus_options(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tokenize", help="MIDI file to HID tokens (JSON)")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("decode", help="HID token JSON back to MIDI")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("generate", help="sample a piece from a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (step-NNNNNNN)")
    p.add_argument("-o", "--output", required=True, help="MIDI file to write")
    p.add_argument("--samples", type=int, default=1, help="pieces sampled side by side (seeds "
                   "SEED, SEED+1, ...), written as OUT-1.mid ... OUT-N.mid")  # fmt: skip
    p.add_argument("--prompt", help="MIDI file to continue (default: start from scratch)")
    p.add_argument("--prompt-bars", type=int, help="use only the first N bars of the prompt")
    p.add_argument("--instruments", type=int, nargs="+", help="GM programs allowed (128 = drums)")
    p.add_argument("--tempo", type=float, help="BPM (default: the tokenizer's)")
    p.add_argument("--time-signature", type=_time_signature, help="N/D (default: the tokenizer's)")
    defaults = SamplingConfig()
    for name, text in SAMPLING_HELP.items():  # one option per SamplingConfig field
        default = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=f"{text} (default %(default)s)")  # fmt: skip
    p.add_argument("--piano-roll", action="store_true", help="also write a piano-roll PNG")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train or resume a run on an Arrow dataset (torchrun: DDP)")
    p.add_argument("dataset", help="an Arrow dataset version folder (arrow_dataset/.../VERSION)")
    p.add_argument("--vocab", required=True, help="its vocab.json")
    p.add_argument("--out", required=True, help="the run's folder (checkpoints, summary.json)")
    p.add_argument("--profile", default="cpu", help="hardware profile: cpu, h100, h800")
    p.add_argument("--size", help="model size (default: the profile's)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the profile's)")
    p.add_argument(
        "--bf16", type=int, choices=(0, 1), help="bf16 autocast (default: the profile's)"
    )
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="a checkpoint's evaluation report: perplexity per token family, generated against "
        "held-out music, piano rolls, samples",
    )
    p.add_argument("checkpoint", help="checkpoint folder (step-NNNNNNN)")
    p.add_argument("--dataset", required=True, help="the Arrow dataset version to evaluate on")
    p.add_argument("--vocab", required=True, help="its vocab.json")
    p.add_argument("--out", required=True, help="the report's folder (replaced whole)")
    p.add_argument(
        "--pieces",
        type=_positive_int,
        default=EVAL_PIECES,
        help="held-out pieces to continue (default %(default)s)",
    )
    p.add_argument("--bars", type=_positive_int, default=EVAL_BARS,
                   help="bars generated per piece (default %(default)s)")  # fmt: skip
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="bars, chords and tokens of a MIDI file, readable")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"meloformer {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except OSError as exc:  # an output that cannot be written: one line, not a traceback
        print(f"meloformer {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
