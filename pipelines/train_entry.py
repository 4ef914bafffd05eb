"""Training under torchrun, reporting back to the Dagster asset through Pipes.

Launched by ``trained_model`` as ``torchrun -m pipelines.train_entry DATASET VOCAB OUT CONFIG``;
rank 0 opens the Pipes channel, logs progress and reports the result as metadata.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from dagster_pipes import open_dagster_pipes

from meloformer_model.tokenizer.vocab import Vocabulary
from meloformer_model.training.config import TrainConfig
from meloformer_model.training.trainer import setup_distributed, train


def main() -> None:
    dataset, vocab_path, out, config_json = sys.argv[1:5]
    setup_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = TrainConfig(**json.loads(config_json))
    vocab = Vocabulary.load(vocab_path)
    if rank:
        train(Path(dataset), vocab, Path(out), config, log=lambda _: None)
    else:
        with open_dagster_pipes() as pipes:
            result = train(Path(dataset), vocab, Path(out), config, log=pipes.log.info)
            figures = json.dumps(result.figures())
            pipes.report_asset_materialization(metadata={"result": figures})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
