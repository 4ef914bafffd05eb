from __future__ import annotations

from pathlib import Path

import pytest

from meloformer_model.data.midi_io import find_midi_files


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    from meloformer_model.paths import SAMPLE_CORPUS_DIR

    files = find_midi_files([SAMPLE_CORPUS_DIR])
    assert len(files) >= 300, f"sample corpus at {SAMPLE_CORPUS_DIR} has only {len(files)} files"
    return files


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The sample corpus as an Arrow dataset and vocabulary, built once per test session."""
    from meloformer_model.data.pipeline import prepare_corpus
    from meloformer_model.paths import SAMPLE_CORPUS_DIR

    root = tmp_path_factory.mktemp("prepared")
    return prepare_corpus(SAMPLE_CORPUS_DIR, root, workers=2)


@pytest.fixture(scope="session")
def dataset_without_valid(prepared, tmp_path_factory) -> Path:
    """A copy of the prepared dataset whose valid split holds no pieces (as a small corpus
    can leave it): every valid shard stream rewritten empty, with its schema."""
    import shutil

    import pyarrow as pa

    copy = shutil.copytree(prepared.dataset.path, tmp_path_factory.mktemp("no-valid") / "data")
    for stream in (copy / "valid").glob("*.arrow"):
        with pa.memory_map(str(stream)) as source:
            schema = pa.ipc.open_stream(source).schema
        with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema):
            pass
    return copy
