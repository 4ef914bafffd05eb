"""Piano rolls and loss curves as PNG files (small files linked from reports, not inlined)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from meloformer_model.atomic import atomic_path  # noqa: E402


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically, and close the figure even when that fails (pyplot keeps every
    open figure alive)."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path


# General MIDI's 16 program families, 8 programs each: names a legend can show without a
# 128-name table
GM_FAMILIES = ("piano", "chromatic percussion", "organ", "guitar", "bass", "strings",
               "ensemble", "brass", "reed", "pipe", "synth lead", "synth pad", "synth effects",
               "ethnic", "percussive", "sound effects")  # fmt: skip

Instrument = tuple[bool, int]  # (drums, program): a track's colour and legend entry


def instrument_label(instrument: Instrument) -> str:
    drums, program = instrument
    return "drums" if drums else f"{GM_FAMILIES[program // 8]} ({program})"


def _palette(*scores) -> dict[Instrument, tuple]:
    """One colour per instrument across all the panels of a figure, so the same instrument has
    the same colour in the real and the generated piece."""
    found = sorted({(t.is_drum, t.program) for score in scores for t in score.tracks})
    colors = plt.get_cmap("tab10" if len(found) <= 10 else "tab20")
    return {instrument: colors(i % colors.N) for i, instrument in enumerate(found)}


def _roll(ax: Axes, score, title: str, palette: dict[Instrument, tuple]) -> None:
    tpq = score.ticks_per_quarter
    for track in score.tracks:
        notes = track.notes.numpy()
        bars = list(zip(notes["time"] / tpq, notes["duration"] / tpq))
        for pitch in sorted(set(notes["pitch"].tolist())):
            sel = [b for b, p in zip(bars, notes["pitch"].tolist()) if p == pitch]
            ax.broken_barh(sel, (pitch - 0.4, 0.8), color=palette[track.is_drum, track.program],
                           linewidth=0)  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("pitch")


def _legend(ax: Axes, palette: dict[Instrument, tuple]) -> None:
    handles = [Patch(color=color, label=instrument_label(i)) for i, color in palette.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)  # fmt: skip


def save_piano_roll(score, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    palette = _palette(score)
    _roll(ax, score, title or path.stem, palette)
    _legend(ax, palette)
    return _save(fig, path)


def save_comparison(real, generated, path: Path, title: str, prompt_end: float) -> Path:
    """Real (top) and generated (bottom) piano rolls on shared axes, one colour per instrument
    in both, the shared prompt (up to ``prompt_end`` quarter notes) shaded."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True, sharey=True)
    palette = _palette(real, generated)
    for ax, score, name in zip(axes, (real, generated), ("real (held-out)", "generated")):
        _roll(ax, score, name, palette)
        ax.axvspan(0, prompt_end, color="grey", alpha=0.12, linewidth=0)
        ax.axvline(prompt_end, color="grey", linestyle="--", linewidth=1)
    axes[0].text(prompt_end / 2, 1.01, "prompt", transform=axes[0].get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=8, color="dimgrey")  # fmt: skip
    axes[0].set_xlabel("")  # the shared axis is labelled once, below
    _legend(axes[0], palette)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_loss_curve(history: list[dict], path: Path, baseline: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    return _save(fig, path)
