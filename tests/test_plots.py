"""Report figures: one colour per instrument across the real and generated panels, a legend
naming them, and the shared prompt marked where it ends."""

from matplotlib.colors import to_rgba
from symusic import Note, Score, Track

from meloformer_model.evaluation import plots


def _score(instruments: list[tuple[bool, int, int]]) -> Score:
    """One track per (drums, program, pitch), each playing its pitch twice."""
    score = Score(480)
    for drums, program, pitch in instruments:
        track = Track(program=program, is_drum=drums)
        track.notes.extend([Note(0, 960, pitch, 80), Note(1920 * 3, 480, pitch, 80)])
        score.tracks.append(track)
    return score


def test_the_comparison_colours_instruments_alike_and_marks_the_prompt(tmp_path, monkeypatch):
    real = _score([(False, 0, 60), (False, 40, 72), (True, 0, 36)])
    generated = _score([(False, 40, 72), (False, 33, 40)])  # strings again, bass for piano
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    path = plots.save_comparison(real, generated, tmp_path / "roll.png", "bwv1.6", 8.0)
    assert path.stat().st_size > 5000
    top, bottom = figures[0].axes
    colour = {}  # (panel, pitch) -> the colour of its note bars
    for panel, ax in (("real", top), ("generated", bottom)):
        for bars in ax.collections:
            pitch = round(bars.get_paths()[0].vertices[:, 1].min() + 0.4)
            colour[panel, pitch] = tuple(to_rgba(bars.get_facecolor()[0]))
    legend = top.get_legend()
    named = {text.get_text(): tuple(to_rgba(handle.get_facecolor()))
             for text, handle in zip(legend.get_texts(), legend.legend_handles)}  # fmt: skip
    assert sorted(named) == ["bass (33)", "drums", "piano (0)", "strings (40)"]
    assert len(set(named.values())) == 4
    assert colour["real", 72] == colour["generated", 72] == named["strings (40)"]
    assert colour["real", 60] == named["piano (0)"] and colour["real", 36] == named["drums"]
    assert colour["generated", 40] == named["bass (33)"]
    for ax in (top, bottom):
        assert any(list(line.get_xdata()) == [8.0, 8.0] for line in ax.lines)  # the prompt's end
    assert top.get_xlim() == bottom.get_xlim() and top.get_ylim() == bottom.get_ylim()
    assert figures[0].texts[0].get_text() == "bwv1.6"
