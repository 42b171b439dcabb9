"""The reading side of an ActivationStore: lazy array views of its outputs and its open shard files.

:class:`StoreArray` turns numpy-style keys (ints, slices, integer or boolean arrays, outer indexing as h5py)
into reads of only the shards and rows they select; :class:`_OpenShard` holds one shard file open, its
contiguous outputs as views of a single memory map (uncompressed datasets are contiguous), compressed ones
through h5py. The freshness checks (a deleted or replaced shard is never read) live in the store, which these
classes call for every read. No torch import.
"""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import h5py
import numpy as np

if TYPE_CHECKING:
    from vitlens.store import ActivationStore, OutputSpec


def _outer(array, key: tuple) -> np.ndarray:
    """``array[key]`` with outer indexing (as h5py): each index array selects along its own axis.

    `key` holds one int, slice or non-negative int64 array per axis; `array` is a numpy array, a memory
    map or an h5py dataset. Arrays are read as their bounding range, then taken in numpy.
    """
    basic = tuple(slice(int(k.min()), int(k.max()) + 1) if isinstance(k, np.ndarray) and k.size
                  else slice(0, 0) if isinstance(k, np.ndarray) else k for k in key)
    out, axis = array[basic], 0
    for k, b in zip(key, basic):
        if isinstance(k, np.ndarray):
            out = np.take(out, k - b.start, axis=axis)
        axis += not isinstance(k, (int, np.integer))
    return np.array(out)  # a copy: never a view into a memory map


class StoreArray:
    """A lazy ``[n_samples, *shape]`` view of one output of a store.

    Indexing reads only the selected samples and tokens from the shards, e.g.
    ``store["blocks.1.hook_resid_post"][i:j, token_idx]``. Token indices refer to the stored token axis;
    ``.tokens`` maps it to the model's layout (None when all tokens were kept). Index arrays may be
    unsorted, repeated or negative; each array selects along its own axis (outer indexing, as h5py).
    Samples that are not recorded raise :class:`NotRecordedError`.
    """

    def __init__(self, store: "ActivationStore", spec: OutputSpec):
        self.store, self.spec = store, spec
        self.shape = (len(store), *spec.shape)
        self.dtype = np.dtype(spec.dtype)
        self.ndim = len(self.shape)

    name = property(lambda self: self.spec.name)
    tokens = property(lambda self: self.spec.tokens)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def __repr__(self) -> str:
        return f"StoreArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key) -> np.ndarray:
        if type(key) is int and 0 <= key < self.shape[0] or isinstance(key, np.integer) and 0 <= key < self.shape[0]:
            return self.store._row(self.name, int(key))  # the per-sample fast path: one stat, one copy
        first, *rest = self._normalise(key)
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            if step == 1:
                return self._read_range(start, max(start, stop), tuple(rest))
            first = np.arange(start, stop, step)
        if isinstance(first, (int, np.integer)):
            return self._read_rows(np.array([first]), tuple(rest), single=int(first))
        return self._read_rows(first, tuple(rest))

    def _read_range(self, start: int, stop: int, rest: tuple) -> np.ndarray:
        size = self.store.shard_size
        shards = range(start // size, -(-stop // size)) if stop > start else range(0)
        self.store._require(shards, np.arange(start, stop))
        parts = [_outer(self.store._source(s, self.name), (slice(max(start, s * size) - s * size,
                                                                 min(stop, (s + 1) * size) - s * size), *rest))
                 for s in shards]
        return np.concatenate(parts) if parts else _outer(np.empty((0, *self.shape[1:]), self.dtype),
                                                          (slice(0, 0), *rest))

    def _read_rows(self, rows: np.ndarray, rest: tuple, single: int | None = None) -> np.ndarray:
        size = self.store.shard_size
        if single is not None:
            shard = single // size
            self.store._require((shard,), rows)
            return _outer(self.store._source(shard, self.name), (single - shard * size, *rest))
        shard_of = rows // size
        order = np.argsort(shard_of, kind="stable")
        shards, first = np.unique(shard_of[order], return_index=True)
        self.store._require(shards.tolist(), rows)
        bounds = [*first.tolist(), len(rows)]
        parts = [_outer(self.store._source(int(s), self.name), (rows[order[a:b]] - int(s) * size, *rest))
                 for s, a, b in zip(shards, bounds, bounds[1:])]
        if not parts:
            return _outer(np.empty((0, *self.shape[1:]), self.dtype), (np.empty(0, np.int64), *rest))
        return np.concatenate(parts)[np.argsort(order, kind="stable")]

    def _normalise(self, key) -> tuple:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices: {self.name} is {self.ndim}-dimensional, {len(key)} were given")
        key = key + (slice(None),) * (self.ndim - len(key))
        return tuple(self._normalise_one(k, n) for k, n in zip(key, self.shape))

    @staticmethod
    def _normalise_one(k, n: int):
        if hasattr(k, "numpy") and hasattr(k, "cpu"):  # a torch tensor (torch itself is not imported here)
            k = k.cpu().numpy()
        if isinstance(k, (list, range)):
            k = np.asarray(k)
        if isinstance(k, np.ndarray):
            if k.dtype == bool:
                if k.shape != (n,):
                    raise IndexError(f"boolean index of shape {k.shape} does not match an axis of size {n}")
                return np.flatnonzero(k)
            if k.size and k.dtype.kind not in "iu":
                raise IndexError(f"index arrays must be integer or boolean, got {k.dtype}")
            if k.size and not -n <= k.min() <= k.max() < n:
                raise IndexError(f"index array {k.min()}..{k.max()} is out of range for an axis of size {n}")
            k = k.astype(np.int64)
            return int(k) % n if k.ndim == 0 else np.where(k < 0, k + n, k)
        if isinstance(k, (int, np.integer)):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of range for an axis of size {n}")
            return int(k) % n
        if isinstance(k, slice):
            return k
        raise IndexError(f"unsupported index {k!r}: use ints, slices, integer or boolean arrays")


class _OpenShard:
    """A shard file open for reading: contiguous outputs as views of one memory map, others through h5py."""

    def __init__(self, path: Path, outputs: Mapping[str, OutputSpec]):
        self.h5 = h5py.File(path, "r")
        self.arrays: dict[str, Any] = {}
        self.map: mmap.mmap | None = None
        for name, spec in outputs.items():
            dataset = self.h5[name]
            offset = dataset.id.get_offset()
            if dataset.chunks is None and offset is not None:
                if self.map is None:
                    with open(path, "rb") as f:
                        self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.arrays[name] = np.frombuffer(self.map, dtype=dataset.dtype, count=dataset.size,
                                                  offset=offset).reshape(dataset.shape)
            else:
                self.arrays[name] = dataset
        if all(isinstance(a, np.ndarray) for a in self.arrays.values()):
            self.h5.close()

    def close(self) -> None:
        self.arrays.clear()  # the numpy views go first, so that the map can close
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a caller still holds a view: the map closes when it is collected
                pass
        self.h5.close()
