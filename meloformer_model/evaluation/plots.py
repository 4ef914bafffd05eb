"""Piano rolls and loss curves as PNG files (small files linked from reports, not inlined)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

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


def _roll(ax: Axes, score, title: str) -> None:
    tpq = score.ticks_per_quarter
    colors = plt.get_cmap("tab10")
    for i, track in enumerate(score.tracks):
        notes = track.notes.numpy()
        bars = list(zip(notes["time"] / tpq, notes["duration"] / tpq))
        for pitch in sorted(set(notes["pitch"].tolist())):
            sel = [b for b, p in zip(bars, notes["pitch"].tolist()) if p == pitch]
            ax.broken_barh(sel, (pitch - 0.4, 0.8), color=colors(i % 10), linewidth=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("pitch")


def save_piano_roll(score, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    _roll(ax, score, title or path.stem)
    return _save(fig, path)


def save_comparison(real, generated, path: Path) -> Path:
    """Real (top) and generated (bottom) piano rolls on one image."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=False)
    _roll(axes[0], real, "real (held-out)")
    _roll(axes[1], generated, "generated")
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
