"""ActivationStore: a crash-safe, sharded HDF5 cache of ViT activations with lazy, fast, verified reads.

A store is a directory (the schema is ``vitlens/schema.md``, printed by ``vitlens store --schema``)::

    store.json               metadata, written once (atomically) when the store is created; never changes
    shards/shard_00000.h5    samples [0, shard_size): one dataset per output, [n, *shape]
    shards/shard_00001.h5    ...
    index.json               derived, written by writers only: the shards already verified, by size and mtime
    writes.log               what each writer claimed and published (JSON lines)

Writers (:mod:`vitlens.shards`) publish a shard only complete and verified, under a name that never changes
again. A reader builds its index in memory from ``store.json`` and the shard listing: shards that
``index.json`` vouches for (same size and mtime) are trusted, every other shard is opened and checked once,
so opening and refreshing cost O(new shards) file opens; a reader never writes into the store folder. Every
read stats the shards it touches, so a shard deleted or replaced after the store was opened raises
:class:`NotRecordedError` (or is checked again) instead of reading stale or missing data. Uncompressed
outputs are read through a memory map of the shard (the datasets are contiguous), compressed ones through
h5py. This module imports no torch: readers that only need numpy stay light.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import resource
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import h5py
import numpy as np
import pandas as pd

from vitlens.store_arrays import StoreArray, _OpenShard
from vitlens.store_identity import identity_difference

if TYPE_CHECKING:
    from vitlens.hooked import TokenLayout

SCHEMA_VERSION = 2
METADATA_FILE = "store.json"
INDEX_FILE = "index.json"
LOG_FILE = "writes.log"
SHARD_DIR = "shards"
CODECS = ("gzip", "lzf")
_SHARD_NAME = re.compile(r"^shard_(\d+)\.h5$")
# open shard files kept per store (each holds one descriptor): a quarter of the process's limit
_MAX_OPEN = max(16, min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))


class StoreMismatchError(ValueError):
    """A store was opened or resumed with another model, preprocessing, sample list or output set."""


class StoreMetadataError(ValueError):
    """``store.json`` is unreadable, inconsistent, or was changed after shards were written."""


class CorruptShardError(RuntimeError):
    """A shard file on disk is truncated, unreadable or does not belong to its store."""


class NotRecordedError(LookupError):
    """The requested samples are not in the store (their shards have not been written, or were removed)."""


@dataclass(frozen=True)
class OutputSpec:
    """One per-sample array of a store: a hook at selected tokens, a reducer's or a computation's result.

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
    compression: str | None = None

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "OutputSpec":
        tokens = d.get("tokens")
        return cls(name=name, shape=tuple(d["shape"]), dtype=d["dtype"], hook=d.get("hook"),
                   tokens=None if tokens is None else tuple(tokens), token_axis=d.get("token_axis"),
                   reducer=d.get("reducer"), computation=d.get("computation"), compression=d.get("compression"))

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def as_json(obj: Any) -> Any:
    """`obj` as plain JSON types (tuples become lists, numpy scalars and arrays, tensors become numbers)."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if hasattr(o, "tolist"):  # numpy arrays and torch tensors (no torch import here)
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


class ActivationStore:
    """A sharded HDF5 activation cache of one model over one dataset; see the module docstring.

    Open an existing store with ``ActivationStore(path)`` (pass ``model=`` to check that it was recorded
    with that model; ``~`` is expanded); create one with :func:`vitlens.record`.

    Example::

        store = ActivationStore("cache/tiny")
        resid = store["blocks.1.hook_resid_post"][0:64, model.tokens("patches")]   # [64, n_patches, d]
        for start, chunk in store.iter_chunks("class_rank", 1024):                  # [<=1024, layers, tokens]
            ...
        for batch in store.loader(["blocks.3.hook_resid_post"], 256, seed=0):       # torch tensors, shuffled
            ...
    """

    def __init__(self, path: str | os.PathLike, model=None):
        self.path = Path(path).expanduser()
        self._meta_file = self.path / METADATA_FILE
        if not self._meta_file.exists():
            raise FileNotFoundError(f"no vitlens store at {self.path} ({METADATA_FILE} is missing); "
                                    "create one with vitlens.record(...) or `vitlens record`")
        self._load_metadata()
        self._shards: dict[int, tuple[int, int]] = {}  # verified shards: number -> (size, mtime_ns)
        self._skipped: dict[int, list] = {}            # shard -> [[sample index, error], ...]
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._index_stat: tuple | None = None
        self._trusted: dict[int, dict] = {}
        self.shard_opens = 0  # shard files opened to verify them (what refresh costs)
        self._files = [str(self.shard_path(shard)) for shard in range(self.n_shards)]  # stat'ed on every read
        self._closed = False
        self.refresh()
        if model is not None:
            self.check_model(model)

    # --------------------------------------------------------------------------------- metadata
    def _load_metadata(self) -> None:
        raw = self._meta_file.read_bytes()
        fix = f"restore {self._meta_file} from a copy, or record the store again into a new path"
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoreMetadataError(f"{self._meta_file} is not valid JSON ({error}); {fix}") from None
        if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
            version = meta.get("schema_version") if isinstance(meta, dict) else None
            raise StoreMismatchError(f"{self.path} has store schema {version}, this vitlens reads schema "
                                     f"{SCHEMA_VERSION}; record it again with this vitlens into a new path")
        problem = _metadata_problem(meta)
        if problem:
            raise StoreMetadataError(f"{self._meta_file} {problem}; {fix}")
        self.meta, self.meta_sha256 = meta, hashlib.sha256(raw).hexdigest()
        self._meta_stat = _signature(self._meta_file.stat())
        self.outputs = {name: OutputSpec.from_dict(name, d) for name, d in meta["outputs"].items()}

    def _check_metadata_unchanged(self) -> None:
        stat = _signature(self._meta_file.stat())
        if stat != self._meta_stat and hashlib.sha256(self._meta_file.read_bytes()).hexdigest() != self.meta_sha256:
            raise StoreMetadataError(_edited(self._meta_file, "after this store was opened"))
        self._meta_stat = stat

    # ----------------------------------------------------------------------------------- checks
    def check_compatible(self, request: Mapping[str, Any], source: str = "request",
                         hint: str | None = None) -> None:
        """Raise :class:`StoreMismatchError` naming the first identity field that differs from `request`.

        Only the fields present in `request` are compared (model tag and weights hash, preprocessing,
        token layout, samples, outputs with their token selections, dtype, autocast, shard size).
        """
        hint = hint or f"use a new path, or delete {self.path} to record it again"
        difference = identity_difference(self.meta, as_json(request), source)
        if difference:
            raise StoreMismatchError(f"{difference} (store {self.path}); {hint}")

    def check_model(self, model) -> None:
        """Raise :class:`StoreMismatchError` unless the store was recorded with `model` (tag, weights)."""
        self.check_compatible({"model": {"tag": model.tag, "weights_hash": model.weights_hash()}},
                              source="model", hint="open it with the model it was recorded with")

    def require_done(self, rows: np.ndarray) -> None:
        """Raise :class:`NotRecordedError` unless all `rows` (sample indices) are recorded."""
        rows = np.asarray(rows)
        missing = rows[~self.done[rows]]
        if missing.size:
            skipped = {int(i): error for errors in self._skipped.values() for i, error in errors}
            why = [f"sample {int(i)} was skipped ({skipped[int(i)]})" for i in missing[:3] if int(i) in skipped]
            raise NotRecordedError(
                f"{missing.size} requested sample(s) of {self.path} are not recorded yet (first: "
                f"{missing[:5].tolist()}); {int(self.done.sum())} of {len(self)} are done. "
                + ("; ".join(why) + ". " if why else "")
                + "Resume the recording (the same vitlens.record call or `vitlens record` command) to fill them in")

    def _require(self, shards, rows: np.ndarray) -> None:
        """Check that the `shards` a read touches are still the verified files, then that `rows` are done."""
        if self._closed:
            raise ValueError(f"{self.path} is closed; open it again with vitlens.ActivationStore(path)")
        if not all(self._unchanged(shard) for shard in shards):
            self.refresh()  # deleted or replaced since it was verified: look again
        self.require_done(rows)

    def _unchanged(self, shard: int) -> bool:
        """Whether `shard` is unverified, or still the file this reader verified (one ``os.stat``)."""
        known = self._shards.get(shard)
        if known is None:
            return True
        try:
            stat = os.stat(self._files[shard])
        except FileNotFoundError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == known

    def _row(self, name: str, row: int) -> np.ndarray:
        """A copy of sample `row` (0 <= row < len) of output `name`: ``store[name][row]`` without index parsing."""
        shard = row // self.meta["shard_size"]
        if self._closed or not self._unchanged(shard):
            self._require((shard,), np.array([row]))
        elif not self._done[row]:
            self.require_done(np.array([row]))
        return np.array(self._source(shard, name)[row - shard * self.meta["shard_size"]])

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

    @property
    def skipped(self) -> pd.DataFrame:
        """Samples left out by ``record(..., on_error="skip")``: index, sample_id, label, error."""
        rows = sorted((int(i), error) for errors in self._skipped.values() for i, error in errors)
        samples = self.meta["samples"]
        return pd.DataFrame({"index": [i for i, _ in rows], "sample_id": [samples["sample_id"][i] for i, _ in rows],
                             "label": [samples["label"][i] for i, _ in rows], "error": [e for _, e in rows]})

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Sample indices [start, stop) held by `shard`."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, len(self))

    def shard_path(self, shard: int) -> Path:
        return self.path / SHARD_DIR / f"shard_{shard:05d}.h5"

    def shards_on_disk(self) -> dict[int, Path]:
        """The shard files under their final names, by shard number (temporary files excluded)."""
        return {shard: self.shard_path(shard) for shard in sorted(self._listing())}

    def _listing(self) -> dict[int, tuple[int, int]]:
        """Shard number -> (size, mtime_ns) of the published shard files (one directory scan)."""
        found = {}
        folder = self.path / SHARD_DIR
        if folder.is_dir():
            for entry in os.scandir(folder):
                match = _SHARD_NAME.match(entry.name)
                if match and int(match.group(1)) < self.n_shards:
                    try:
                        found[int(match.group(1))] = _signature(entry.stat())
                    except FileNotFoundError:  # removed while listing
                        pass
        return found

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
        check_count(size, "iter_chunks size must be a positive number of samples")
        array = self[name]
        axis = array.spec.token_axis
        if tokens is not None and axis is None:
            raise ValueError(f"{name} has no token axis to select tokens from")
        for start in range(0, len(self), size):
            key = [slice(start, start + size)]
            if tokens is not None:
                key += [slice(None)] * axis + [tokens]
            yield start, array[tuple(key)]

    def loader(self, outputs, batch_size: int, shuffle: bool = True, seed: int = 0, block_size: int = 64,
               drop_last: bool = False, num_workers: int = 0):
        """A torch ``DataLoader`` of ``{output: tensor [batch, *shape], "index": [batch]}`` over the recorded
        samples, for training probes, gates or sparse autoencoders from a store.

        Shuffling is by blocks of consecutive recorded samples: with shards of at least `block_size`
        samples, a block is `block_size` samples of one shard; with smaller shards, a block is
        ``block_size // shard_size`` whole shards (so blocks never shrink to tiny shards). The blocks are
        permuted each epoch (seeded by `seed` and the epoch), each batch is filled with whole blocks in that
        order and shuffled within itself. A batch is read as one slice per run of consecutive samples, so
        reads stay close to sequential disk speed (a batch of 256 with the default blocks of 64: about 4
        slices). ``shuffle=False`` reads in order.
        """
        from vitlens.loader import store_loader

        return store_loader(self, outputs, batch_size, shuffle=shuffle, seed=seed, block_size=block_size,
                            drop_last=drop_last, num_workers=num_workers)

    def cache_for(self, i: int, model=None):
        """A TransformerLens-style ``ActivationCache`` (batch dim 1) of sample `i`.

        It holds every recorded hook that kept all tokens (reducer outputs and token subsets are left
        out). Pass `model` to enable the cache's model-aware helpers; it is checked against the store.
        """
        import torch

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
        """Bool [n_samples]: which samples are recorded (skipped samples are not)."""
        return self._done

    def _source(self, shard: int, name: str):
        """The array of output `name` in `shard` (a memory-map view or an h5py dataset), opened on demand."""
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = _OpenShard(self.shard_path(shard), self.outputs)
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return handle.arrays[name]

    # ------------------------------------------------------------------------------------ index
    def refresh(self) -> "ActivationStore":
        """Bring the in-memory index up to date with ``store.json`` and the shards on disk.

        Costs one directory scan and opens only shards this reader has not seen and ``index.json`` does
        not vouch for. Raises :class:`StoreMetadataError` if ``store.json`` changed after the shards were
        written, :class:`CorruptShardError` naming damaged shard files.
        """
        self._check_metadata_unchanged()
        listing = self._listing()
        for shard in [s for s, signature in self._shards.items() if listing.get(s) != signature]:
            del self._shards[shard]
            self._skipped.pop(shard, None)
            if shard in self._open:
                self._open.pop(shard).close()
        new = [s for s in sorted(listing) if s not in self._shards]
        if new:
            self._read_index()
        problems = []
        for shard in new:
            trusted = self._trusted.get(shard)
            if trusted is not None and (trusted["size"], trusted["mtime_ns"]) == listing[shard]:
                info = trusted
            else:
                self.shard_opens += 1
                info = shard_info(self.shard_path(shard), self, shard)
            if info.get("meta_sha256", self.meta_sha256) != self.meta_sha256:
                raise StoreMetadataError(_edited(self._meta_file, "after its shards were written"))
            if "problem" in info:
                problems.append(f"{self.shard_path(shard)} {info['problem']}")
            else:
                self._shards[shard], self._skipped[shard] = listing[shard], info.get("skipped", [])
        if problems:
            raise CorruptShardError(
                "corrupt shard file(s): " + "; ".join(problems) + ". Delete these files (and only these) and "
                "resume the recording (the same vitlens.record call or `vitlens record` command) to recompute them")
        done = np.zeros(len(self), dtype=bool)
        for shard in self._shards:
            done[slice(*self.shard_range(shard))] = True
        for errors in self._skipped.values():
            done[[int(i) for i, _ in errors]] = False
        self._done = done
        return self

    def _read_index(self) -> None:
        """Load ``index.json`` (the shards writers verified) if it changed since it was last read."""
        file = self.path / INDEX_FILE
        try:
            stat = _signature(file.stat())
        except FileNotFoundError:
            self._trusted, self._index_stat = {}, None
            return
        if stat == self._index_stat:
            return
        try:
            index = json.loads(file.read_bytes())
            ok = index.get("store_id") == self.meta["store_id"] and index.get("meta_sha256") == self.meta_sha256
            self._trusted = {int(s): info for s, info in index["shards"].items()} if ok else {}
        except (ValueError, KeyError, TypeError, AttributeError):  # a damaged index vouches for nothing
            self._trusted = {}
        self._index_stat = stat

    def index_entries(self) -> dict[str, dict]:
        """What ``index.json`` records for the verified shards (written by writers, see vitlens.shards)."""
        return {str(s): {"size": size, "mtime_ns": mtime, "skipped": self._skipped.get(s, [])}
                for s, (size, mtime) in sorted(self._shards.items())}

    @classmethod
    def rebuild(cls, path: str | os.PathLike) -> "ActivationStore":
        """Check every shard from scratch and rewrite ``index.json`` (a writer's operation)."""
        from vitlens.shards import write_index

        path = Path(path).expanduser()
        (path / INDEX_FILE).unlink(missing_ok=True)
        store = cls(path)
        write_index(store)
        return store

    # ----------------------------------------------------------------------------------- misc
    def describe(self) -> str:
        """A human-readable summary (what ``vitlens store info`` prints)."""
        done = int(self.done.sum())
        skipped = sum(len(e) for e in self._skipped.values())
        lines = [f"store      {self.path}",
                 f"model      {self.tag}  (weights {self.weights_hash[:16]}…)",
                 f"samples    {done} of {len(self)} recorded, {len(self._shards)} of "
                 f"{self.n_shards} shards of {self.shard_size}" + (f", {skipped} skipped" if skipped else ""),
                 f"dtype      {self.meta['dtype']}  autocast {self.meta.get('autocast')}",
                 f"created    {self.meta['created']}  "
                 + " ".join(f"{k} {v}" for k, v in self.meta["versions"].items()),
                 "outputs"]
        for name, spec in self.outputs.items():
            tokens = "all tokens" if spec.tokens is None else f"tokens {list(spec.tokens)}"
            what = (f"reducer {spec.reducer['class']}" if spec.reducer else
                    f"computation {spec.computation['class']}" if spec.computation else tokens)
            packed = f"  {spec.compression}" if spec.compression else ""
            lines.append(f"  {name:40s} {str(list(spec.shape)):16s} {spec.dtype:8s} {what}{packed}")
        return "\n".join(lines)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
        self._closed = True

    def __getstate__(self) -> dict:  # DataLoader workers reopen the store by path
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, tag={self.tag!r}, "
                f"{int(self.done.sum())}/{len(self)} samples, outputs={self.keys()})")


def shard_info(path: Path, store: ActivationStore, shard: int) -> dict:
    """Check a shard file against its store: ``{"meta_sha256", "skipped"}``, plus ``"problem"`` if it is bad."""
    start, stop = store.shard_range(shard)
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            info = {"meta_sha256": attrs.get("meta_sha256", store.meta_sha256),
                    "skipped": json.loads(attrs.get("skipped", "[]"))}
            if attrs.get("store_id") != store.meta["store_id"]:
                return {"problem": "belongs to another store"}
            if (attrs.get("shard"), attrs.get("start"), attrs.get("stop")) != (shard, start, stop):
                return {**info, "problem": f"is shard {attrs.get('shard')} with samples {attrs.get('start')}.."
                                           f"{attrs.get('stop')}, not shard {shard} with {start}..{stop} "
                                           "(copied or renamed from another number)"}
            for name, spec in store.outputs.items():
                if name not in f:
                    return {**info, "problem": f"lacks {name!r}"}
                if f[name].shape != (stop - start, *spec.shape) or f[name].dtype != spec.dtype:
                    return {**info, "problem": f"has {name!r} of shape {f[name].shape} {f[name].dtype}"}
                if spec.compression is None and f[name].id.get_offset() is None:
                    return {**info, "problem": f"has {name!r} unallocated"}
            if os.path.getsize(path) < max((f[n].id.get_offset() or 0) + f[n].id.get_storage_size() for n in f):
                return {**info, "problem": "is truncated"}
    except OSError as error:
        return {"problem": f"cannot be read (truncated or damaged: {error})"}
    return info


def check_count(value, requirement: str) -> None:
    """Raise ``ValueError("<requirement>, got <value>")`` unless `value` is a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{requirement}, got {value!r}")


def _metadata_problem(meta: dict) -> str | None:
    """What is inconsistent in a parsed ``store.json`` (None if nothing)."""
    for key in ("store_id", "n_samples", "shard_size", "outputs", "samples", "model", "layout"):
        if key not in meta:
            return f"lacks the key {key!r}"
    samples = meta["samples"]
    if not isinstance(samples, dict) or not isinstance(samples.get("sample_id"), list):
        return "has no samples.sample_id list"
    n = meta["n_samples"]
    if not isinstance(n, int) or n != len(samples["sample_id"]) or n != len(samples.get("label", ())):
        return (f"says n_samples {n!r} but lists {len(samples['sample_id'])} sample ids and "
                f"{len(samples.get('label', ()))} labels")
    if not isinstance(meta["shard_size"], int) or meta["shard_size"] < 1:
        return f"has shard_size {meta['shard_size']!r}, not a positive integer"
    return None


def _edited(meta_file: Path, when: str) -> str:
    return (f"{meta_file} was changed {when} (its content no longer matches the one the shards were recorded "
            "under); restore the original store.json, e.g. from a copy or backup: the shards themselves are "
            "intact. To record something else, use a new path")


def _signature(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns
