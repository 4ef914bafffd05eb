"""Packed training batches from the memory-mapped Arrow dataset.

Every batch has the same shape (batch × seq_len; a short last batch gets empty rows), so one
compiled shape serves a whole run.
Documents longer than a row are cut into row-sized windows; windows are shuffled with a seeded
generator per epoch and packed into rows by best fit (``pack``) with document ids, which the
model's masks use to keep documents apart. The plan of an epoch is a pure function of
(seed, epoch), so a resumed run skips to the exact batch it stopped at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from meloformer_model.model import batch_summary_width
from meloformer_model.training.packing import pack, windows

SIDE = ("bar", "instrument", "token_type", "onset_group")
IGNORE = -100


def load_splits(dataset_path: Path) -> datasets.DatasetDict:
    """A dataset version's splits, memory-mapped; a folder ``datasets`` cannot read (a split
    missing, truncated Arrow, broken JSON) is named with the reason."""
    try:
        return datasets.load_from_disk(str(dataset_path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{dataset_path}: not a readable Arrow dataset ({exc})") from exc


@dataclass
class Batch:
    ids: torch.Tensor
    targets: torch.Tensor
    doc: torch.Tensor
    bar: torch.Tensor
    instrument: torch.Tensor
    token_type: torch.Tensor
    onset_group: torch.Tensor
    summary_width: int  # batch_summary_width, counted on the host

    def to(self, device) -> Batch:
        """On a GPU through pinned memory, so the copy does not wait for the GPU to finish what
        it is running (a copy from pageable memory does)."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        tensors = [move(t) for t in vars(self).values() if isinstance(t, torch.Tensor)]
        return Batch(*tensors, summary_width=self.summary_width)

    @property
    def side(self) -> tuple[torch.Tensor, ...]:
        return (self.bar, self.instrument, self.token_type, self.onset_group, self.doc)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


class PackedLoader:
    """Batches of packed rows over a ``datasets.Dataset`` split (memory-mapped, not copied).

    ``shuffle=False`` keeps document order (validation). ``rank``/``world`` give each DDP
    process every world-th batch of the same plan.
    """

    def __init__(self, split, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.table = split.data.table if hasattr(split.data, "table") else split.data
        self.columns = {name: self.table.column(name) for name in ("ids", *SIDE)}
        self.lengths = np.asarray(self.table.column("length").to_numpy(), dtype=np.int64)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world = rank, world
        self._windows = windows(self.lengths, seq_len)
        self._planned: tuple[int, list] | None = None

    def plan(self, epoch: int) -> list[list[list[tuple[int, int, int]]]]:
        """The epoch's batches of rows; the last epoch's plan is kept, so counting the batches
        (``len``), then stepping through them, and every validation pass pack once."""
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._pack_epoch(epoch))
        return self._planned[1]

    def _pack_epoch(self, epoch: int) -> list[list[list[tuple[int, int, int]]]]:
        pieces = self._windows
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(pieces))
            pieces = pieces[order]
        rows = pack(pieces, self.seq_len)
        if self.shuffle:  # whole batches, as many for every process: their positions agree
            n = len(rows) // self.batch_size // self.world * self.world
        else:  # validation: every row, the last batch short
            n = -(-len(rows) // self.batch_size)
        batches = [rows[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]
        return batches[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.plan(0))

    def _doc(self, name: str, doc: int) -> np.ndarray:
        return self.columns[name][doc].values.to_numpy(zero_copy_only=False)

    def make(self, rows: list[list[tuple[int, int, int]]]) -> Batch:
        shape = (self.batch_size, self.seq_len)
        arrays = {name: np.zeros(shape, dtype=np.int64) for name in ("ids", *SIDE)}
        targets = np.full(shape, IGNORE, dtype=np.int64)
        docs = np.full(shape, -1, dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for d, (doc, start, end) in enumerate(row):
                n = end - start
                ids = self._doc("ids", doc)
                arrays["ids"][r, at : at + n] = ids[start:end]
                for name in SIDE:
                    arrays[name][r, at : at + n] = self._doc(name, doc)[start:end]
                nxt = ids[start + 1 : end + 1]
                targets[r, at : at + len(nxt)] = nxt
                docs[r, at : at + n] = d
                at += n
        as_tensor = {k: torch.from_numpy(v) for k, v in arrays.items()}
        doc = torch.from_numpy(docs)
        return Batch(as_tensor["ids"], torch.from_numpy(targets), doc,
                     *(as_tensor[name] for name in SIDE),
                     summary_width=batch_summary_width(doc, as_tensor["bar"]))  # fmt: skip

    def epoch(self, epoch: int, skip: int = 0):
        """Yield (index, batch) for one epoch, starting after ``skip`` batches."""
        for index, rows in enumerate(self.plan(epoch)):
            if index >= skip:
                yield index, self.make(rows)
