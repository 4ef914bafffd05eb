"""Where the project's bundled files live (kept free of heavy imports)."""

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS_DIR = PROJECT_DIR / "sample_corpus"
