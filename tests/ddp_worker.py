"""Run by test_training under torchrun: train a few DDP steps, write a digest of the weights."""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from meloformer_model.tokenizer.vocab import Vocabulary
from meloformer_model.training.trainer import PROFILES, setup_distributed, train

setup_distributed()
config = replace(PROFILES["cpu"], seq_len=128, batch_size=2, max_steps=3, eval_every=3,
                 checkpoint_every=3, warmup_steps=1)  # fmt: skip
out = Path(sys.argv[3])
result = train(Path(sys.argv[1]), Vocabulary.load(sys.argv[2]), out / "run", config,
               log=lambda _: None)  # fmt: skip
dist.barrier()
rank = dist.get_rank()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters()))
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "weights": digest.hexdigest(),
            "step": result.history[-1]["step"],
            "loss": result.history[-1]["loss"],
        }
    )
)
dist.destroy_process_group()
