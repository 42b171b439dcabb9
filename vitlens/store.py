"""ActivationStore: a crash-safe, sharded HDF5 cache of ViT activations with lazy reads.

A store is a directory (the schema is documented in ``cache/README.md``)::

    store.json               metadata, written once (atomically) when the store is created
    shards/shard_00000.h5    samples [0, shard_size): one dataset per output, [n, *shape]
    shards/shard_00001.h5    ...
    index.h5                 derived: one HDF5 virtual dataset per output over all shards, plus `done`

Shards are written under a temporary name, fsynced and renamed into place, so a killed run never leaves a
half-written shard; resuming recomputes exactly the shards that are missing. The index holds nothing that
is not in the shards and ``store.json``: :meth:`ActivationStore.rebuild` recreates it, and opening a store
rebuilds it whenever the shards on disk changed.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import h5py
import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from vitlens.hooked import TokenLayout

SCHEMA_VERSION = 1
METADATA_FILE = "store.json"
INDEX_FILE = "index.h5"
SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"^shard_(\d+)\.h5$")


class StoreMismatchError(ValueError):
    """A store was opened or resumed with another model, preprocessing, sample list or output set."""


class CorruptShardError(RuntimeError):
    """A shard file on disk is truncated, unreadable or does not belong to its store."""


class NotRecordedError(LookupError):
    """The requested samples are not in the store yet (their shards have not been written)."""


@dataclass(frozen=True)
class OutputSpec:
    """One per-sample array of a store: a hook at selected tokens, or a reducer's result.

    ``shape`` and ``token_axis`` are per sample (no leading sample axis). ``tokens`` are the token
    indices (in the model's token layout) kept along ``token_axis``; None means all tokens.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    hook: str | None = None
    tokens: tuple[int, ...] | None = None
    token_axis: int | None = None
    reducer: dict | None = None
    computation: dict | None = None

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "OutputSpec":
        tokens = d.get("tokens")
        return cls(name=name, shape=tuple(d["shape"]), dtype=d["dtype"], hook=d.get("hook"),
                   tokens=None if tokens is None else tuple(tokens), token_axis=d.get("token_axis"),
                   reducer=d.get("reducer"), computation=d.get("computation"))

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a store (recorded in its metadata)."""
    import timm

    import vitlens

    return {"vitlens": vitlens.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version, "numpy": np.__version__}


def as_json(obj: Any) -> Any:
    """`obj` as plain JSON types (tuples become lists, numpy scalars become Python numbers)."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(location, a's value, b's value) of the first place where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key, _Absent()), b.get(key, _Absent()),
                                      f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return where, f"{len(a)} entries", f"{len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b or isinstance(a, _Absent) and isinstance(b, _Absent) else (where, a, b)


def _short(value: Any) -> str:
    """A value for an error message: long strings (hashes) and structures are cut short."""
    if isinstance(value, str) and (value.endswith(" entries") or len(value) > 40):
        return value if len(value) <= 40 else value[:12] + "…"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


# What must agree between a store and a request to read, resume or extend it: (label, path in store.json).
_IDENTITY = (
    ("model tag", ("model", "tag")),
    ("weights hash", ("model", "weights_hash")),
    ("preprocessing", ("preprocessing",)),
    ("token layout", ("layout",)),
    ("sample list", ("samples",)),
    ("dtype", ("dtype",)),
    ("autocast", ("autocast",)),
    ("shard size", ("shard_size",)),
    ("output set", ("outputs",)),
)


def _lookup(meta: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(meta, Mapping) or key not in meta:
            return _Absent()
        meta = meta[key]
    return meta


def _without_shapes(outputs: Mapping[str, Mapping]) -> dict:
    return {name: {k: v for k, v in spec.items() if k != "shape"} for name, spec in outputs.items()}


class StoreArray:
    """A lazy ``[n_samples, *shape]`` view of one output of a store.

    Indexing reads only the selected samples and tokens from the shards (through the index's virtual
    dataset), e.g. ``store["blocks.1.hook_resid_post"][i:j, token_idx]``. Token indices refer to the
    stored token axis; ``.tokens`` maps it to the model's layout (None when all tokens were kept).
    Index arrays may be unsorted or repeated; samples that are not recorded raise :class:`NotRecordedError`.
    """

    def __init__(self, store: "ActivationStore", spec: OutputSpec):
        self.store, self.spec = store, spec

    name = property(lambda self: self.spec.name)
    tokens = property(lambda self: self.spec.tokens)
    shape = property(lambda self: self._dataset.shape)
    dtype = property(lambda self: self._dataset.dtype)
    ndim = property(lambda self: self._dataset.ndim)

    @property
    def _dataset(self) -> h5py.Dataset:
        index = self.store._index  # looked up on each use: refresh() reopens the index
        if index is None:
            raise ValueError(f"{self.store.path} is closed; open it again with vitlens.ActivationStore(path)")
        return index[self.name]

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def __repr__(self) -> str:
        return f"StoreArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key) -> np.ndarray:
        key = self._normalise(key)
        self.store.require_done(self._rows(key[0]))
        h5_key, post = [], []  # h5py takes one index array; further arrays are applied in numpy
        out_axis = 0
        for axis, k in enumerate(key):
            if isinstance(k, np.ndarray):
                k = np.where(k < 0, k + self.shape[axis], k)
                if any(isinstance(x, np.ndarray) for x in h5_key):
                    h5_key.append(slice(None))
                    post.append((out_axis, k))
                else:
                    unique, inverse = np.unique(k, return_inverse=True)
                    h5_key.append(unique)
                    post.append((out_axis, inverse))
            else:
                h5_key.append(k)
            out_axis += not isinstance(k, (int, np.integer))
        result = self._dataset[tuple(h5_key)]
        for axis, take in post:
            result = np.take(result, take, axis=axis)
        return result

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
        if isinstance(k, torch.Tensor):
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
            return int(k) if k.ndim == 0 else k.astype(np.int64)
        if isinstance(k, (int, np.integer)):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of range for an axis of size {n}")
            return int(k) % n
        return k

    def _rows(self, k) -> np.ndarray:
        return np.arange(len(self))[k]


class ActivationStore:
    """A sharded HDF5 activation cache of one model over one dataset; see the module docstring.

    Open an existing store with ``ActivationStore(path)`` (pass ``model=`` to check that it was recorded
    with that model); create one with :func:`vitlens.record`.

    Example::

        store = ActivationStore("cache/tiny")
        resid = store["blocks.1.hook_resid_post"][0:64, model.tokens("patches")]   # [64, n_patches, d]
        for start, chunk in store.iter_chunks("class_rank", 1024):                  # [<=1024, layers, tokens]
            ...
    """

    def __init__(self, path: str | os.PathLike, model=None):
        self.path = Path(path)
        meta_file = self.path / METADATA_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"no vitlens store at {self.path} ({METADATA_FILE} is missing); "
                                    "create one with vitlens.record(...) or `vitlens record`")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreMismatchError(f"{self.path} has store schema {self.meta.get('schema_version')}, "
                                     f"this vitlens reads schema {SCHEMA_VERSION}")
        self.outputs = {name: OutputSpec.from_dict(name, d) for name, d in self.meta["outputs"].items()}
        self._index: h5py.File | None = None
        self.refresh()
        if model is not None:
            self.check_model(model)

    # ----------------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, path: str | os.PathLike, meta: Mapping[str, Any]) -> "ActivationStore":
        """Create a store from its metadata, or open the existing one after checking it matches `meta`.

        Creation is exclusive and atomic (a temporary file hard-linked into place), so concurrent
        creators agree on one ``store.json``.
        """
        path = Path(path)
        meta = as_json({"schema_version": SCHEMA_VERSION, "store_id": uuid.uuid4().hex,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "versions": library_versions(), **meta})
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(path / METADATA_FILE)
        header = json.dumps({k: v for k, v in meta.items() if k != "samples"}, indent=1)
        samples = json.dumps(meta["samples"])  # last and on one line: the header stays readable
        _write_durably(tmp, f'{header[:-2]},\n "samples": {samples}\n}}\n'.encode())
        try:
            os.link(tmp, path / METADATA_FILE)
            _fsync_dir(path)
            created = True
        except FileExistsError:  # another creator was first: its store must match this request
            created = False
        finally:
            tmp.unlink()
        store = cls(path)
        if not created:
            store.check_compatible(meta, source="request")
        return store

    # ------------------------------------------------------------------------------------ checks
    def check_compatible(self, request: Mapping[str, Any], source: str = "request",
                         hint: str | None = None) -> None:
        """Raise :class:`StoreMismatchError` naming the first identity field that differs from `request`.

        Only the fields present in `request` are compared (model tag and weights hash, preprocessing,
        token layout, samples, outputs, dtype, autocast, shard size).
        """
        hint = hint or f"use a new path, or delete {self.path} to record it again"
        request = as_json(request)
        for label, key in _IDENTITY:
            wanted = _lookup(request, key)
            if isinstance(wanted, _Absent):
                continue
            stored = _lookup(self.meta, key)
            if key == ("outputs",):
                stored, wanted = _without_shapes(stored), _without_shapes(wanted)
            if stored == wanted:  # fast path: the walk below is slow on long sample lists
                continue
            difference = _first_difference(stored, wanted)
            if difference:
                where, a, b = difference
                detail = f" at {where}" if where and label not in ("model tag", "weights hash") else ""
                raise StoreMismatchError(f"{label} differs{detail}: store {_short(a)}, {source} "
                                         f"{_short(b)} (store {self.path}); {hint}")

    def check_model(self, model) -> None:
        """Raise :class:`StoreMismatchError` unless the store was recorded with `model` (tag, weights)."""
        self.check_compatible({"model": {"tag": model.tag, "weights_hash": model.weights_hash()}},
                              source="model", hint="open it with the model it was recorded with")

    def require_done(self, rows: np.ndarray) -> None:
        """Raise :class:`NotRecordedError` unless all `rows` (sample indices) are recorded."""
        missing = np.asarray(rows)[~self.done[rows]]
        if missing.size:
            raise NotRecordedError(
                f"{missing.size} requested sample(s) of {self.path} are not recorded yet (first: "
                f"{missing[:5].tolist()}); {int(self.done.sum())} of {len(self)} are done. Resume the "
                "recording (the same vitlens.record call or `vitlens record` command) to fill them in")

    # ----------------------------------------------------------------------------------- layout
    @property
    def tag(self) -> str:
        return self.meta["model"]["tag"]

    @property
    def weights_hash(self) -> str:
        return self.meta["model"]["weights_hash"]

    @property
    def layout(self) -> "TokenLayout":
        """The token layout of the recorded model (CLS, registers, patch grid)."""
        from vitlens.hooked import TokenLayout

        return TokenLayout.from_dict(self.meta["layout"])

    @property
    def shard_size(self) -> int:
        return self.meta["shard_size"]

    @property
    def n_shards(self) -> int:
        return -(-len(self) // self.shard_size)

    def __len__(self) -> int:
        return self.meta["n_samples"]

    @property
    def samples(self) -> pd.DataFrame:
        """The samples in store order: one row per sample index, columns ``sample_id`` and ``label``."""
        return pd.DataFrame(self.meta["samples"])

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Sample indices [start, stop) held by `shard`."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, len(self))

    def shard_path(self, shard: int) -> Path:
        return self.path / SHARD_DIR / f"shard_{shard:05d}.h5"

    def shards_on_disk(self) -> dict[int, Path]:
        """The committed shard files, by shard number (temporary files of unfinished shards excluded)."""
        found = {}
        for entry in os.scandir(self.path / SHARD_DIR):
            match = _SHARD_NAME.match(entry.name)
            if match and int(match.group(1)) < self.n_shards:
                found[int(match.group(1))] = Path(entry.path)
        return dict(sorted(found.items()))

    # ------------------------------------------------------------------------------------ reads
    def keys(self) -> list[str]:
        return list(self.outputs)

    def __contains__(self, name: str) -> bool:
        return name in self.outputs

    def __getitem__(self, name: str) -> StoreArray:
        if name not in self.outputs:
            close = difflib.get_close_matches(name, self.outputs, n=5, cutoff=0.5)
            raise KeyError(f"{name!r} is not recorded in {self.path}; "
                           + (f"did you mean {close}?" if close else f"it holds {self.keys()}"))
        return StoreArray(self, self.outputs[name])

    def iter_chunks(self, name: str, size: int, tokens=None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, array [<=size, *shape])`` over all samples of an output, reading lazily.

        `tokens` optionally selects positions of the stored token axis (e.g. ``model.tokens("patches")``).
        """
        array = self[name]
        axis = array.spec.token_axis
        if tokens is not None and axis is None:
            raise ValueError(f"{name} has no token axis to select tokens from")
        for start in range(0, len(self), size):
            key = [slice(start, start + size)]
            if tokens is not None:
                key += [slice(None)] * axis + [tokens]
            yield start, array[tuple(key)]

    def cache_for(self, i: int, model=None):
        """A TransformerLens-style ``ActivationCache`` (batch dim 1) of sample `i`.

        It holds every recorded hook that kept all tokens (reducer outputs and token subsets are left
        out). Pass `model` to enable the cache's model-aware helpers; it is checked against the store.
        """
        from vitlens.hooked import ActivationCache

        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is out of range: {self.path} holds {len(self)} samples "
                             f"(pass 0 <= i < {len(self)}, or a negative index from the end)")
        i %= len(self)
        if model is not None:
            self.check_model(model)
        cache = {spec.hook: torch.from_numpy(self[name][i:i + 1])
                 for name, spec in self.outputs.items() if spec.hook is not None and spec.tokens is None}
        return ActivationCache(cache, model)

    @property
    def done(self) -> np.ndarray:
        """Bool [n_samples]: which samples are recorded."""
        return self._done

    # ------------------------------------------------------------------------------------ index
    def refresh(self) -> "ActivationStore":
        """Bring the index up to date with the shards on disk (rebuilding it if they changed)."""
        listing = self._shard_listing()
        index_path = self.path / INDEX_FILE
        index = _open_if_current(index_path, self.meta["store_id"], listing)
        if index is None:
            index = self._build_index(listing)
        if self._index is not None:
            self._index.close()
        self._index = index
        self._done = index["done"][:]
        return self

    @classmethod
    def rebuild(cls, path: str | os.PathLike) -> "ActivationStore":
        """Recreate ``index.h5`` from ``store.json`` and the shards alone (checking every shard)."""
        (Path(path) / INDEX_FILE).unlink(missing_ok=True)
        return cls(path)

    def _shard_listing(self) -> list[list]:
        listing = []
        for shard, file in self.shards_on_disk().items():
            stat = file.stat()
            listing.append([shard, stat.st_size, stat.st_mtime_ns])
        return listing

    def _build_index(self, listing: list[list]) -> h5py.File:
        """Check every shard, then write the index to a temporary file and rename it into place.

        A store in a read-only directory gets the same index in memory instead.
        """
        self._check_shards([shard for shard, *_ in listing])
        index_path = self.path / INDEX_FILE
        tmp = _tmp_path(index_path)
        try:
            with h5py.File(tmp, "w") as f:
                self._fill_index(f, listing)
            os.replace(tmp, index_path)
        except OSError:  # read-only store: keep the index in memory
            tmp.unlink(missing_ok=True)
            f = h5py.File(f"{index_path}.in-memory", "w", driver="core", backing_store=False)
            self._fill_index(f, listing)
            return f
        return h5py.File(index_path, "r")

    def _fill_index(self, f: h5py.File, listing: list[list]) -> None:
        done = np.zeros(len(self), dtype=bool)
        for name, spec in self.outputs.items():
            layout = h5py.VirtualLayout(shape=(len(self), *spec.shape), dtype=spec.dtype)
            for shard, *_ in listing:
                start, stop = self.shard_range(shard)
                source = f"{SHARD_DIR}/{self.shard_path(shard).name}"  # relative to index.h5: stores move
                layout[start:stop] = h5py.VirtualSource(source, name, shape=(stop - start, *spec.shape))
            f.create_virtual_dataset(name, layout, fillvalue=0)
        for shard, *_ in listing:
            done[slice(*self.shard_range(shard))] = True
        f.create_dataset("done", data=done)
        f.attrs.update(schema_version=SCHEMA_VERSION, store_id=self.meta["store_id"],
                       shards=json.dumps(listing))

    def _check_shards(self, shards: list[int]) -> None:
        problems = [f"{self.shard_path(s)} {problem}" for s in shards
                    if (problem := self._shard_problem(s))]
        if problems:
            raise CorruptShardError(
                "corrupt shard file(s): " + "; ".join(problems) + ". Delete them and resume the recording "
                "(the same vitlens.record call or `vitlens record` command) to recompute them")

    def _shard_problem(self, shard: int) -> str | None:
        start, stop = self.shard_range(shard)
        try:
            with h5py.File(self.shard_path(shard), "r") as f:
                if f.attrs.get("store_id") != self.meta["store_id"]:
                    return "belongs to another store"
                if (f.attrs.get("start"), f.attrs.get("stop")) != (start, stop):
                    return f"holds samples {f.attrs.get('start')}..{f.attrs.get('stop')}, not {start}..{stop}"
                for name, spec in self.outputs.items():
                    if name not in f:
                        return f"lacks {name!r}"
                    if f[name].shape != (stop - start, *spec.shape) or f[name].dtype != spec.dtype:
                        return f"has {name!r} of shape {f[name].shape} {f[name].dtype}"
        except OSError as error:
            return f"cannot be read (truncated or damaged: {error})"
        return None

    # ----------------------------------------------------------------------------------- misc
    def describe(self) -> str:
        """A human-readable summary (what ``vitlens store info`` prints)."""
        done = int(self.done.sum())
        lines = [f"store      {self.path}",
                 f"model      {self.tag}  (weights {self.weights_hash[:16]}…)",
                 f"samples    {done} of {len(self)} recorded, {len(self.shards_on_disk())} of "
                 f"{self.n_shards} shards of {self.shard_size}",
                 f"dtype      {self.meta['dtype']}  autocast {self.meta.get('autocast')}",
                 f"created    {self.meta['created']}  "
                 + " ".join(f"{k} {v}" for k, v in self.meta["versions"].items()),
                 "outputs"]
        for name, spec in self.outputs.items():
            tokens = "all tokens" if spec.tokens is None else f"tokens {list(spec.tokens)}"
            what = f"reducer {spec.reducer['class']}" if spec.reducer else tokens
            lines.append(f"  {name:40s} {str(list(spec.shape)):16s} {spec.dtype:8s} {what}")
        return "\n".join(lines)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, tag={self.tag!r}, "
                f"{int(self.done.sum())}/{len(self)} samples, outputs={self.keys()})")


class ShardWriter:
    """Writes one shard of a store under a temporary name; only :meth:`commit` makes it visible.

    h5py lays out the file (attributes and contiguous datasets, allocated but not written: a few KB), then
    the rows go straight to their byte offsets with ``os.pwrite``: one copy into the page cache, as ``dd``
    does, and a full disk surfaces as a plain ``OSError`` that leaves no HDF5 state behind. :meth:`commit`
    fsyncs the file and renames it into place, so a crash at any moment leaves the complete shard or none;
    :meth:`abort` removes the temporary file.
    """

    def __init__(self, store: ActivationStore, shard: int):
        self.shard, self.path = shard, store.shard_path(shard)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.start, self.stop = store.shard_range(shard)
        self._specs, self._offsets, self._n_written = store.outputs, {}, 0
        layout = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        layout.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # fixed data offsets, no fill: a sparse file
        layout.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        with h5py.File(self.tmp_path, "w") as f:
            f.attrs.update(store_id=store.meta["store_id"], shard=shard, start=self.start, stop=self.stop)
            for name, spec in self._specs.items():
                dataset = f.create_dataset(name, shape=(self.stop - self.start, *spec.shape), dtype=spec.dtype,
                                           dcpl=layout)
                self._offsets[name] = dataset.id.get_offset()
        self._fd: int | None = os.open(self.tmp_path, os.O_WRONLY)

    @property
    def complete(self) -> bool:
        return self._n_written == self.stop - self.start

    def write(self, offset: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write rows [offset, offset + n) of every output (offset relative to the shard's first sample)."""
        n = len(next(iter(arrays.values())))
        for name, array in arrays.items():
            spec = self._specs[name]
            data = np.ascontiguousarray(array, dtype=spec.dtype)
            if data.shape != (n, *spec.shape):
                raise ValueError(f"{name}: got rows of shape {data.shape[1:]}, the store holds {spec.shape}")
            _pwrite_all(self._fd, memoryview(data).cast("B"), self._offsets[name] + offset * spec.sample_bytes)
        self._n_written += n

    def commit(self) -> Path:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp_path.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until all of `data` is written (a write may be partial)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _open_if_current(index_path: Path, store_id: str, listing: list[list]) -> h5py.File | None:
    """The index file opened for reading if it describes exactly the shards in `listing`, else None."""
    try:
        index = h5py.File(index_path, "r")
    except OSError:
        return None
    if index.attrs.get("store_id") == store_id and json.loads(index.attrs.get("shards", "null")) == listing:
        return index
    index.close()
    return None


def _tmp_path(path: Path) -> Path:
    """A temporary name next to `path`, unique across processes and hosts (stores may be on shared filesystems)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
