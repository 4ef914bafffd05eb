"""The configuration the assets run with, and the code versions derived from it.

Configs are code, not run config: a changed threshold or grid changes the code version of the
assets it affects, so the Dagster UI marks them and everything downstream as unsynced.
"""

from meloformer_model.data import stages
from meloformer_model.data.dataset import DatasetConfig, dataset_code_version
from meloformer_model.data.filtering import FilterConfig
from meloformer_model.tokenizer.config import TokenizerConfig

FILTER_CONFIG = FilterConfig()
TOKENIZER_CONFIG = TokenizerConfig()
DATASET_CONFIG = DatasetConfig()

FILTER_VERSION = stages.filter_version(FILTER_CONFIG)
CHORD_VERSION = stages.chord_version(TOKENIZER_CONFIG)
TOKEN_VERSION = stages.token_version(TOKENIZER_CONFIG)
VOCABULARY_VERSION = TOKENIZER_CONFIG.config_hash()
DATASET_VERSION = dataset_code_version(DATASET_CONFIG)
