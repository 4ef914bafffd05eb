"""Run by test_training under torchrun: train a few DDP steps, write a digest of the weights."""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from meloformer_model.tokenizer.vocab import Vocabulary
from meloformer_model.training import trainer
from meloformer_model.training.config import PROFILES
from meloformer_model.training.trainer import setup_distributed, train


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP counting its gradient all-reduce rounds (the hook sees each bucket; bucket 0 once)."""

    rounds = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def hook(state, bucket):
            if bucket.index() == 0:
                CountingDDP.rounds += 1
            return default_hooks.allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)


torch.nn.parallel.DistributedDataParallel = CountingDDP
trainer.peak_flops = lambda device, dtype: 1e12  # a known per-process peak for the MFU check
setup_distributed()
config = replace(PROFILES["cpu"], seq_len=int(sys.argv[4]), batch_size=int(sys.argv[5]),
                 grad_accum=int(sys.argv[6]), max_steps=3, eval_every=3, checkpoint_every=3,
                 warmup_steps=1)  # fmt: skip
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
            "step_tokens": [record["tokens"] for record in result.history],
            "allreduce_rounds": CountingDDP.rounds,
            "mfu": result.mfu,
            "tokens_per_second": result.tokens_per_second,
            "parameters": result.parameters,
        }
    )
)
dist.destroy_process_group()
