from __future__ import annotations

from pathlib import Path

import pytest

from meloformer_model.data.midi_io import find_midi_files


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    from meloformer_model.data.sample_corpus import SAMPLE_CORPUS_DIR

    files = find_midi_files([SAMPLE_CORPUS_DIR])
    assert len(files) >= 300, f"sample corpus at {SAMPLE_CORPUS_DIR} has only {len(files)} files"
    return files
