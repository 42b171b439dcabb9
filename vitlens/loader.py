"""The shuffled loader of an ActivationStore: block-shuffled batches of stored outputs as a torch ``DataLoader``.

Training probes, DiffMask gates or sparse autoencoders from a store wants shuffled batches at close to
sequential disk speed. Samples are cut into blocks of consecutive recorded rows (``block_size`` samples of
one shard, or ``block_size // shard_size`` whole shards when shards are smaller); each epoch permutes the
blocks (seeded by the seed and the epoch), fills batches with whole blocks in that order and shuffles each
batch within itself. A batch is read as one slice per run of consecutive samples, written straight to its
places in the batch. Workers reopen the store by path. Imported only by :meth:`ActivationStore.loader`, so
the reader path stays free of torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vitlens.store import ActivationStore, NotRecordedError, check_count


def store_loader(store: ActivationStore, outputs, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 block_size: int = 64, drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A ``DataLoader`` of ``{output: tensor [batch, *shape], "index": [batch]}`` over the recorded samples
    of `store` (see :meth:`ActivationStore.loader`)."""
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    for name in names:
        store[name]  # KeyError naming close matches
    for label, value in (("batch_size", batch_size), ("block_size", block_size)):
        check_count(value, f"loader {label} must be a positive number of samples")
    rows = np.flatnonzero(store.done)
    if rows.size == 0:
        raise NotRecordedError(f"{store.path} has no recorded samples yet; record it before loading from it")
    size = store.shard_size
    block = rows // (block_size // size * size) if block_size >= size else rows // size * size + rows % size // block_size
    blocks = np.split(rows, np.flatnonzero((np.diff(rows) != 1) | (np.diff(block) != 0)) + 1)
    sampler = _BlockBatches(blocks, batch_size, shuffle, seed, drop_last)
    return DataLoader(_BatchReader(store.path, names), batch_size=None, sampler=sampler,
                      num_workers=num_workers)


class _BlockBatches:
    """The loader's sampler: batches of row indices [batch], from blocks permuted anew each epoch."""

    def __init__(self, blocks: list[np.ndarray], batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.blocks, self.batch_size, self.shuffle, self.seed, self.drop_last = blocks, batch_size, shuffle, seed, drop_last
        self.n_rows, self.epoch = sum(len(b) for b in blocks), 0

    def __len__(self) -> int:
        return self.n_rows // self.batch_size if self.drop_last else -(-self.n_rows // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.blocks)) if self.shuffle else range(len(self.blocks))
        rows = np.concatenate([self.blocks[i] for i in order])
        for b in range(len(self)):
            batch = rows[b * self.batch_size:(b + 1) * self.batch_size]
            yield rng.permutation(batch) if self.shuffle else batch


class _BatchReader:
    """The loader's dataset: reads the rows of one batch of every output (reopened by path in workers)."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names, self.store = path, names, None

    def __getstate__(self) -> dict:
        return {"path": self.path, "names": self.names, "store": None}

    def __getitem__(self, rows: np.ndarray) -> dict:
        if self.store is None:
            self.store = ActivationStore(self.path)
        order = np.argsort(rows, kind="stable")
        bounds = [0, *(np.flatnonzero(np.diff(rows[order]) != 1) + 1).tolist(), len(rows)]  # runs: read as slices
        in_order = bool((order[1:] > order[:-1]).all())

        def read(name: str) -> np.ndarray:
            array = self.store[name]
            out = np.empty((len(rows), *array.shape[1:]), array.dtype)
            for a, b in zip(bounds, bounds[1:]):  # each run straight to its places in the batch
                start = int(rows[order[a]])
                out[slice(a, b) if in_order else order[a:b]] = array[start:start + b - a]
            return torch.from_numpy(out)

        return {"index": torch.from_numpy(rows), **{name: read(name) for name in self.names}}
