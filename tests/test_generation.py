"""Generation under the grammar, and the evaluation report, from a briefly trained checkpoint."""

import html
import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from symusic import Score

from meloformer_model.evaluation import metrics
from meloformer_model.evaluation.report import evaluate_checkpoint
from meloformer_model.generation import (
    Grammar,
    SamplingConfig,
    generate,
    generate_batch,
    prompt_from_midi,
    prompt_from_scratch,
    write_outputs,
)
from meloformer_model.sampling import TOKENS_TO_END
from meloformer_model.tokenizer.hid import HIDTokenizer
from meloformer_model.training.checkpoint import load_model, tokenizer_config
from meloformer_model.training.config import PROFILES
from meloformer_model.training.trainer import train

TOK = HIDTokenizer()


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    config = replace(
        PROFILES["cpu"],
        seq_len=128,
        batch_size=4,
        max_steps=4,
        eval_every=4,
        checkpoint_every=4,
        warmup_steps=1,
    )
    out = tmp_path_factory.mktemp("run")
    return train(prepared.dataset.path, prepared.vocab, out, config, log=lambda _: None).checkpoint


def test_every_real_sequence_is_accepted_by_the_grammar(sample_files):
    for path in sample_files[:30]:
        ids = TOK.encode(path).ids
        grammar = Grammar(TOK)
        bars = int(TOK.side_information(ids).bar.max()) + 1
        for token in ids.tolist():
            state_bars = grammar.state.bars
            allowed = grammar.allowed(bars - state_bars)
            assert token in allowed, (path.name, TOK.vocab.tokens[token], grammar.state)
            grammar.advance(token)


def test_generated_pieces_decode_and_parse_back(checkpoint, tmp_path):
    model, configs = load_model(checkpoint)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    for seed in range(3):
        prompt = prompt_from_scratch(tokenizer, 90.0, (3, 4))
        ids = generate(
            model,
            tokenizer,
            prompt,
            SamplingConfig(bars=3, top_k=40, max_tokens=2000, seed=seed),
            instruments=[0, 40],
        )
        assert ids[: len(prompt)].tolist() == prompt
        assert ids[-1] == tokenizer.vocab["EOS"]
        side = tokenizer.side_information(ids)
        assert int(side.bar.max()) + 1 == 3  # the scratch prompt's bar is the first of the 3
        insts = set(side.instrument[side.instrument < 129].tolist())
        assert insts <= {0, 40}
        path = tmp_path / f"g{seed}.mid"
        tokenizer.decode_score(ids).dump_midi(str(path))
        again = TOK.encode(path)
        assert [t.numerator for t in Score(str(path)).time_signatures] == [3]
        assert len(again) > 5


def test_continuation_keeps_the_prompt(checkpoint, sample_files):
    model, configs = load_model(checkpoint)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    prompt = prompt_from_midi(tokenizer, sample_files[3], bars=2)
    assert int(tokenizer.side_information(np.asarray(prompt)).bar.max()) == 1
    ids = generate(model, tokenizer, prompt, SamplingConfig(bars=2, max_tokens=2000, top_p=0.9))
    assert ids[: len(prompt)].tolist() == prompt
    assert int(tokenizer.side_information(ids).bar.max()) == 3  # 2 bars of prompt, 2 new


def test_past_max_tokens_a_piece_takes_the_shortest_way_to_eos():
    """Logits that always favour another position (so another tempo change in a bar's header,
    another onset among the notes): past ``max_tokens`` the piece still ends within
    ``TOKENS_TO_END`` tokens."""
    from meloformer_model.generation import _Piece

    prompt = prompt_from_scratch(TOK)
    eos = TOK.vocab["EOS"]
    logits = torch.zeros(len(TOK.vocab))
    start, end = TOK.vocab.family_ranges["position"]
    logits[start:end] = 10.0
    for budget in (len(prompt) + 1, len(prompt) + 40):
        piece = _Piece(TOK, None, seed=0)
        for token in prompt:
            piece.feed(token)
        config = SamplingConfig(bars=4, max_tokens=budget)
        while not piece.done:
            piece.feed(piece.choose(logits, config, eos))
        assert len(piece.ids) <= budget + TOKENS_TO_END and piece.ids[-1] == eos
        TOK.decode_score(np.asarray(piece.ids))  # still a valid piece


def test_a_batch_generates_the_pieces_one_by_one_would(checkpoint, sample_files):
    """Prompts of different lengths side by side, ending at different steps: piece i is the
    piece ``generate`` gives alone with seed + i."""
    model, configs = load_model(checkpoint)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    prompts = [
        prompt_from_midi(tokenizer, sample_files[3], bars=2),
        prompt_from_scratch(tokenizer, 100.0, (4, 4)),
        prompt_from_midi(tokenizer, sample_files[7], bars=1),
    ]
    config = SamplingConfig(bars=2, max_tokens=300, top_k=20, seed=5)
    batch = generate_batch(model, tokenizer, prompts, config)
    alone = [
        generate(model, tokenizer, prompt, replace(config, seed=config.seed + i))
        for i, prompt in enumerate(prompts)
    ]
    assert [ids.tolist() for ids in batch] == [ids.tolist() for ids in alone]
    assert len({len(ids) for ids in batch}) > 1  # they ended at different steps


def test_metrics_on_a_known_piece(sample_files):
    score = Score(str(sample_files[0]))
    p = metrics.piece(TOK, score)
    values = metrics.piece_metrics(p)
    assert values["scale_consistency"] > 0.85  # a Bach chorale is diatonic
    assert 2.0 < values["pitch_class_entropy"] < 3.6
    assert values["empty_beat_rate"] < 0.05 and 3.0 <= values["polyphony"] <= len(score.tracks)
    assert metrics.similarity_error([p], [p]) == 0.0
    one_bar = metrics.piece(TOK, score.clip(0, score.ticks_per_quarter * 2))
    assert len(one_bar.layout.starts) == 1
    assert metrics.similarity_error([one_bar], [p]) is None  # no bar pairs: undefined, not NaN
    assert metrics.similarity_error_text(None).startswith("n/a")
    assert metrics.overlapping_area(
        metrics.pitch_class_histogram(p), metrics.pitch_class_histogram(p)
    ) == pytest.approx(1.0)


def test_a_continuation_is_measured_from_the_bar_after_its_prompt(sample_files):
    """``bars_from`` drops the prompt's bars and starts the time at 0: the notes, bars and grid
    of the rest are the piece's own, shifted."""
    p = metrics.piece(TOK, Score(str(sample_files[0])))
    lay = p.layout
    rest = metrics.bars_from(p, 2)
    offset = int(lay.bounds[2])
    assert len(rest.layout.starts) == len(lay.starts) - 2
    assert rest.layout.starts.tolist() == (lay.starts[2:] - offset).tolist()
    later = lay.notes.onset >= offset
    assert rest.layout.notes.onset.tolist() == (lay.notes.onset[later] - offset).tolist()
    assert rest.layout.notes.pitch.tolist() == lay.notes.pitch[later].tolist()
    assert metrics.piece_metrics(metrics.bars_from(p, 0)) == metrics.piece_metrics(p)
    with pytest.raises(ValueError, match=f"bar {len(lay.starts)} of a piece of"):
        metrics.bars_from(p, len(lay.starts))


def test_evaluation_report_files_contain_the_figures(checkpoint, prepared, tmp_path):
    ev = evaluate_checkpoint(
        checkpoint,
        prepared.dataset.path,
        prepared.vocab,
        tmp_path,
        pieces=2,
        bars=2,
        sampling=SamplingConfig(top_k=32, max_tokens=600),
    )
    summary = json.loads((tmp_path / "evaluation.json").read_text())
    ppl = summary["validation"]["perplexity"]
    baseline = f"unigram baseline: perplexity {math.exp(summary['unigram_loss']):.2f}, "
    assert ppl > 1
    for text in (ev.html.read_text(), ev.markdown.read_text(), ev.short_markdown()):
        assert f"{ppl:.2f}" in text and baseline in text
    for name in metrics.METRICS:  # each metric is explained where it is reported
        explained = html.escape(metrics.meaning(name))
        assert explained and explained in ev.html.read_text()
        assert metrics.meaning(name) in ev.markdown.read_text()
    assert set(summary["comparison"]["metrics"]) == set(metrics.METRICS)
    assert len(ev.samples) == 2 and all(p.exists() for p in ev.samples)
    assert all(p.exists() and p.stat().st_size > 5000 for p in ev.figures)
    assert "pitch" in summary["validation"]["families"]
    for report in (ev.markdown, ev.html):  # every image and MIDI file it names lies beside it
        text = report.read_text()
        linked = set(re.findall(r"\]\(([^)]+)\)", text))  # Markdown
        linked |= set(re.findall(r'(?:src|href)="([^"]+)"', text))  # HTML
        assert {p.name for p in ev.figures + ev.samples} <= linked
        assert len([n for n in linked if n.startswith("real_")]) == 2
        assert all((tmp_path / name).exists() for name in linked), report
    # the report's validation pass is the trainer's: the same loss for the same checkpoint
    trained = json.loads((checkpoint / "state.json").read_text())["history"][-1]["val_loss"]
    assert summary["validation"]["loss"] == pytest.approx(trained, rel=1e-5)
    with pytest.raises(ValueError, match="no held-out piece is longer than the 10000 prompt"):
        evaluate_checkpoint(checkpoint, prepared.dataset.path, prepared.vocab, tmp_path / "x",
                            prompt_bars=10_000)  # fmt: skip
    with pytest.raises(ValueError, match="no continuation got past its 2 prompt bars within"):
        evaluate_checkpoint(checkpoint, prepared.dataset.path, prepared.vocab, tmp_path / "y",
                            sampling=SamplingConfig(max_tokens=1))  # fmt: skip


def test_a_report_is_replaced_whole_or_not_at_all(checkpoint, prepared, tmp_path, monkeypatch):
    """Re-evaluating with fewer pieces leaves no stale samples of the larger report; an
    evaluation failing half-way through writing leaves the previous report as it was."""
    from meloformer_model.evaluation import report

    def evaluate(pieces: int):
        return evaluate_checkpoint(checkpoint, prepared.dataset.path, prepared.vocab,
                                   tmp_path / "report", pieces=pieces, bars=1,
                                   sampling=SamplingConfig(max_tokens=600))  # fmt: skip

    evaluate(2)
    one = evaluate(1)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert [n for n in files if n.startswith("generated_")] == [one.samples[0].name]
    assert len([n for n in files if n.startswith(("real_", "pianoroll_"))]) == 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}

    def broken(real, generated, path, *_):
        path.write_bytes(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(report, "save_comparison", broken)
    with pytest.raises(OSError, match="disk full"):
        evaluate(2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left


def test_cli_generate(checkpoint, tmp_path):
    out = tmp_path / "cli.mid"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meloformer_model.cli",
            "generate",
            "--checkpoint",
            str(checkpoint),
            "-o",
            str(out),
            "--bars",
            "2",
            "--max-tokens",
            "200",
            "--piano-roll",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Score(str(out)).note_num() >= 0 and out.with_suffix(".png").exists()
    assert "generate: 100%" in proc.stderr and "2/2 [" in proc.stderr  # the bars' progress bar


def test_cli_generate_and_evaluate_refuse_outputs_over_their_inputs(checkpoint, prepared, tmp_path):
    """Generating over the weights it loads, a MIDI and its piano roll under one name, or an
    evaluation report replacing a folder that is not an earlier report, are refused before any
    work, and nothing changes."""
    weights = checkpoint / "model.safetensors"
    before = {p: p.read_bytes() for p in checkpoint.iterdir()}
    command = [sys.executable, "-m", "meloformer_model.cli"]
    generate = [*command, "generate", "--checkpoint", str(checkpoint), "--bars", "1"]
    proc = subprocess.run([*generate, "-o", str(weights)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == f"meloformer generate: {weights}: the output would overwrite an input\n"
    png = tmp_path / "roll.png"
    proc = subprocess.run(
        [*generate, "-o", str(png), "--piano-roll"], capture_output=True, text=True
    )
    assert proc.stderr.endswith(
        f"{png}: written twice by this command (another output has its name)\n"
    )
    notes = tmp_path / "thesis"
    notes.mkdir()
    (notes / "chapter.txt").write_text("months of work")
    evaluate = [*command, "evaluate", str(checkpoint), "--dataset", str(prepared.dataset.path),
                "--vocab", str(prepared.vocab_path)]  # fmt: skip
    proc = subprocess.run([*evaluate, "--out", str(notes)], capture_output=True, text=True)
    assert proc.returncode == 1 and "is not an earlier report (no evaluation.json)" in proc.stderr
    proc = subprocess.run(
        [*evaluate, "--out", str(checkpoint.parent)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "holds an input of this evaluation" in proc.stderr
    assert (notes / "chapter.txt").read_text() == "months of work"
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert list(tmp_path.iterdir()) == [notes]


def test_cli_generate_refuses_settings_it_would_ignore_or_overflow(checkpoint, tmp_path):
    """Scratch settings beside a prompt (they were silently ignored), --prompt-bars without a
    prompt, an infinite temperature, a seed past 64 bits (a traceback); a prompt the tokenizer
    refuses is named."""
    prompt = tmp_path / "prompt.mid"
    prompt.write_bytes(bytes.fromhex("4d546864000000060000000100604d54726b0000000b00ff5803070002"))
    command = [sys.executable, "-m", "meloformer_model.cli", "generate", "--checkpoint",
               str(checkpoint), "-o", str(tmp_path / "out.mid")]  # fmt: skip
    expected = {
        ("--prompt", str(prompt), "--tempo", "90"): "--tempo and --time-signature start a piece "
        "from scratch; a --prompt keeps its own",
        ("--prompt-bars", "2"): "--prompt-bars takes the first bars of a --prompt; none was given",
        ("--temperature", "inf"): "temperature inf must be >= 0 and finite",
        ("--seed", str(2**64)): f"seed {2**64} must be in [0, 2**63)",
        ("--prompt", str(prompt)): f"{prompt}: ",
    }
    for options, message in expected.items():
        proc = subprocess.run([*command, *options], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith(f"meloformer generate: {message}"), (
            proc.stderr
        )
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.mid"]


def test_cli_generates_several_samples_side_by_side(checkpoint, tmp_path):
    out = tmp_path / "piece.mid"
    args = ["--checkpoint", str(checkpoint), "-o", str(out), "--bars", "1", "--max-tokens", "120"]
    command = [sys.executable, "-m", "meloformer_model.cli", "generate", *args, "--samples", "3"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / f"piece-{i}.mid" for i in (1, 2, 3)]
    assert sorted(tmp_path.iterdir()) == paths
    assert [line.split("-> ")[1] for line in proc.stdout.splitlines()] == [str(p) for p in paths]
    model, configs = load_model(checkpoint)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    config = SamplingConfig(bars=1, max_tokens=120, seed=2)  # the third sample's seed
    third = generate(model, tokenizer, prompt_from_scratch(tokenizer), config)
    write_outputs(tokenizer, third, tmp_path / "alone" / "third.mid")
    assert paths[2].read_bytes() == (tmp_path / "alone" / "third.mid").read_bytes()


def test_cli_refuses_zero_samples(tmp_path, capsys):
    from meloformer_model.cli import main

    out = tmp_path / "none.mid"
    assert main(["generate", "--checkpoint", str(tmp_path), "-o", str(out), "--samples", "0"]) == 1
    assert "--samples 0: ask for at least one piece" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"temperature": -1.0}, "temperature -1.0 must be >= 0"), ({"top_k": -3}, "top_k -3"),
     ({"top_p": 0.0}, "top_p 0.0 must be in (0, 1]"), ({"top_p": 1.5}, "top_p 1.5"),
     ({"max_tokens": 0}, "max_tokens 0"), ({"bars": 0}, "bars 0 must be >= 1")],
)  # fmt: skip
def test_sampling_settings_are_checked(setting, message):
    with pytest.raises(ValueError) as error:
        SamplingConfig(**setting)
    assert message in str(error.value)


def test_prompts_and_instruments_the_vocabulary_cannot_say_are_refused(sample_files):
    v, cfg = TOK.vocab, TOK.config
    tempo = v.offset("tempo") + int(TOK.tempo_bin([cfg.default_tempo_bpm])[0])
    num, den = cfg.default_time_signature
    assert prompt_from_scratch(TOK) == [v["BOS"], v["Bar"], v[f"TimeSig_{num}/{den}"],
                                        v["Pos_0"], tempo]  # fmt: skip
    assert prompt_from_scratch(TOK, 60.0, (3, 4))[2] == v["TimeSig_3/4"]
    with pytest.raises(ValueError, match=r"time signature 13/8 is not in the vocabulary \(1/2"):
        prompt_from_scratch(TOK, time_signature=(13, 8))
    for tempo_bpm in (-5.0, 300.0):
        with pytest.raises(ValueError, match=f"tempo {tempo_bpm:g} BPM: .* from 40 to 250 BPM"):
            prompt_from_scratch(TOK, tempo_bpm)
    with pytest.raises(ValueError, match=f"{sample_files[0].name}: a prompt of 0 bars"):
        prompt_from_midi(TOK, sample_files[0], 0)
    for instruments in ([200], [-1, 0], []):
        with pytest.raises(ValueError, match=r"give GM programs 0-127, or 128 for drums"):
            Grammar(TOK, instruments)
    assert Grammar(TOK, [0, 128]).allowed_instruments == {0, 128}


def test_generation_refuses_an_empty_prompt(checkpoint):
    model, configs = load_model(checkpoint)
    tokenizer = HIDTokenizer(tokenizer_config(configs))
    with pytest.raises(ValueError, match="an empty prompt"):
        generate_batch(model, tokenizer, [prompt_from_scratch(tokenizer), []])


def test_cli_names_bad_generation_settings(checkpoint, tmp_path, capsys):
    """Each bad setting is one line naming it, before any file is written; a malformed time
    signature is argparse's usage error."""
    from meloformer_model.cli import main

    out = tmp_path / "none.mid"
    base = ["generate", "--checkpoint", str(checkpoint), "-o", str(out), "--quiet"]
    cases = [
        (["--top-p", "0"], "top_p 0.0 must be in (0, 1]"),
        (["--time-signature", "13/8"], "time signature 13/8 is not in the vocabulary"),
        (["--tempo", "300"], "tempo 300 BPM"),
        (["--instruments", "200"], "instruments [200]: give GM programs"),
        (["--max-tokens", "4"], "the prompt has 5 tokens, --max-tokens 4 leaves no room"),
    ]
    for args, message in cases:
        assert main([*base, *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("meloformer generate: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--time-signature", "four"])
    assert exit_.value.code == 2
    assert "argument --time-signature: 'four' is not N/D" in capsys.readouterr().err
    assert not out.exists()


def test_cli_evaluate_writes_the_report_and_refuses_what_it_cannot_measure(
    checkpoint, prepared, dataset_without_valid, tmp_path, capsys, monkeypatch
):
    """``meloformer evaluate`` writes what the asset writes and reports each stage on stderr
    (here every validation batch: progress at least every 0 s); a dataset built with another
    tokenizer is refused by name (its ids would mean other tokens), and so is an empty valid
    split (a perplexity of 1 over no tokens), leaving no report."""
    import re
    import shutil

    from meloformer_model.cli import main
    from meloformer_model.data.dataset import MANIFEST
    from meloformer_model.evaluation import report

    monkeypatch.setattr(report, "PROGRESS_EVERY_S", 0.0)

    base = ["evaluate", str(checkpoint), "--vocab", str(prepared.vocab_path)]
    out = tmp_path / "report"
    assert main([*base, "--dataset", str(prepared.dataset.path), "--out", str(out),
                 "--pieces", "1", "--bars", "1"]) == 0  # fmt: skip
    summary = json.loads((out / "evaluation.json").read_text())
    captured = capsys.readouterr()
    stages = captured.err.strip().splitlines()
    batches = int(re.match(r"validation: (\d+) batches of \d+ x \d+ tokens on cpu$", stages[0])[1])
    assert stages[1 : batches + 1] == [
        f"validation: batch {i}/{batches}" for i in range(1, 1 + batches)
    ]
    assert stages[batches + 1 :][:2] == [
        f"validation perplexity {summary['validation']['perplexity']:.3f} over "
        f"{summary['validation']['tokens']:,} tokens",
        "generating 1 continuations of 1 bars",
    ]
    assert stages[-1].startswith(f"writing the report to {out} (") and len(stages) == batches + 4
    printed = captured.out.strip()
    assert printed.startswith(f"validation perplexity {summary['validation']['perplexity']:.3f}")
    assert printed.endswith(f"1 pieces; report {out / 'report.html'}")
    assert summary["pieces"] == summary["generated_bars"] == 1
    other = shutil.copytree(prepared.dataset.path, tmp_path / "other-tokenizer")
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["settings"]["vocab_hash"] = "0123456789abcdef"
    (other / MANIFEST).write_text(json.dumps(manifest))
    assert main([*base, "--dataset", str(other), "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"meloformer evaluate: {checkpoint} was trained with tokenizer ")
    assert f", {other} uses 0123456789abcdef: its token ids mean other tokens" in err
    assert not (tmp_path / "none").exists()
    no_valid = dataset_without_valid
    assert main([*base, "--dataset", str(no_valid), "--out", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err == (
        f"meloformer evaluate: {no_valid}: the valid split is empty: no perplexity to report\n"
    )
