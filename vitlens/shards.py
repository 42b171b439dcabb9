"""The writer side of an ActivationStore: safe with any number of concurrent writers.

Any number of processes (plain runs, torchrun ranks, jobs on machines that share the filesystem) can record
into one store at once. A writer **claims** a shard before computing it: ``shards/shard_00005.claim`` is
created exclusively (a hard link of a complete temporary file, so it is never seen half-written) and
holds the writer's id (host, pid, a random suffix). A heartbeat thread touches the writer's claims; a claim
expires when its writer is gone (same host: the process no longer exists) or its heartbeat is older than
:data:`CLAIM_TIMEOUT` (other hosts), and another writer then takes it over (a rename, so only one can).
Rows are written into a temporary file whose name is unique to the writer
(``.shard_00005.h5.<writer>.tmp``), which is fsynced, checked (attributes, shapes, size) and published
by a hard link that fails rather than replace an existing shard. Temporary files whose writer holds no
live claim, and the short-lived files of dead processes (a claim being written, a claim set aside during a
take-over), are removed by the next writer. Every claim, take-over and publication is appended to ``writes.log`` (JSON
lines), and writers keep ``index.json`` (the shards they verified) current for readers.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from vitlens.store import (INDEX_FILE, LOG_FILE, METADATA_FILE, SCHEMA_VERSION, SHARD_DIR, ActivationStore,
                           CorruptShardError, as_json, shard_info)

CLAIM_TIMEOUT = 120.0  # seconds without a heartbeat after which a claim of a writer on another host expires
HEARTBEAT = 10.0
_TEMPORARY = re.compile(r"^\.shard_(\d+)\.h5\.(.+)\.tmp$")
_CLAIM = re.compile(r"^shard_(\d+)\.claim$")
# short-lived files of one process: a claim or index being written (.tmp), a claim set aside during a take-over
_LEFTOVER = re.compile(r"^\..+\.([A-Za-z0-9_-]+)-(\d+)-[0-9a-f]{8,32}\.(tmp|expired)$")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a store (recorded in its metadata)."""
    import timm
    import torch

    import vitlens

    return {"vitlens": vitlens.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version, "numpy": np.__version__}


def new_writer_id() -> str:
    """``host-pid-random``: unique across processes and hosts."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _host() -> str:
    """This host's name as writer ids and temporary names hold it (letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def create_store(path: Path, meta: Mapping[str, Any], request: Mapping[str, Any]) -> ActivationStore:
    """Create a store from its metadata, or open the one another writer created first and check that it
    matches `request` (what the caller asked for; derived settings such as a default shard size may differ).

    Creation is exclusive and atomic (a temporary file hard-linked into place).
    """
    meta = as_json({"schema_version": SCHEMA_VERSION, "store_id": uuid.uuid4().hex,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "versions": library_versions(), **meta})
    (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    header = json.dumps({k: v for k, v in meta.items() if k != "samples"}, indent=1)
    samples = json.dumps(meta["samples"])  # last and on one line: the header stays readable
    created = _link_new(path / METADATA_FILE, f'{header[:-2]},\n "samples": {samples}\n}}\n'.encode())
    store = ActivationStore(path)
    if not created:
        store.check_compatible(request, source="request")
    return store


def write_index(store: ActivationStore) -> None:
    """Write ``index.json``: the shards `store` has verified, so that readers need not open them again."""
    data = {"schema_version": SCHEMA_VERSION, "store_id": store.meta["store_id"],
            "meta_sha256": store.meta_sha256, "shards": store.index_entries()}
    target = store.path / INDEX_FILE
    tmp = _tmp_path(target)
    try:
        _write_durably(tmp, json.dumps(data).encode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def log_event(store: ActivationStore, event: str, **fields) -> None:
    """Append one JSON line to ``writes.log`` (a single O_APPEND write: lines of writers never interleave)."""
    line = json.dumps({"time": time.time(), "event": event, **fields}) + "\n"
    fd = os.open(store.path / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Claims:
    """The shards one writer has claimed in a store, kept alive by a heartbeat thread (see the module doc)."""

    def __init__(self, store: ActivationStore, writer: str, timeout: float = CLAIM_TIMEOUT,
                 heartbeat: float = HEARTBEAT):
        self.store, self.writer, self.timeout = store, writer, timeout
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.held: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), name="vitlens-heartbeat", daemon=True)
        self._thread.start()

    def path(self, shard: int) -> Path:
        return self.store.path / SHARD_DIR / f"shard_{shard:05d}.claim"

    def claim(self, shard: int) -> bool:
        """Claim `shard` (taking over an expired claim); False if it is published or claimed by a live writer."""
        if self.store.shard_path(shard).exists():
            return False
        mine = json.dumps({"writer": self.writer, "host": self.host, "pid": self.pid}).encode()
        for _ in range(2):
            if _link_new(self.path(shard), mine):
                break
            owner = self.owner(shard)
            if owner is None or self.alive(*owner) or not self._take_over(shard, owner[0]):
                return False
        else:
            return False
        if self.store.shard_path(shard).exists():  # published between the check and the claim
            self.path(shard).unlink(missing_ok=True)
            return False
        with self._lock:
            self.held.add(shard)
        log_event(self.store, "claim", shard=shard, writer=self.writer)
        return True

    def release(self, shard: int) -> None:
        with self._lock:
            self.held.discard(shard)
        owner = self.owner(shard)
        if owner is not None and owner[0].get("writer") == self.writer:
            self.path(shard).unlink(missing_ok=True)

    def owner(self, shard: int) -> tuple[dict, float] | None:
        """(claim content, seconds since its last heartbeat), or None if the shard is not claimed."""
        try:
            with open(self.path(shard), "rb") as f:
                age = time.time() - os.fstat(f.fileno()).st_mtime
                return json.loads(f.read() or b"{}"), age
        except FileNotFoundError:
            return None
        except ValueError:
            return {}, 0.0

    def alive(self, owner: dict, age: float) -> bool:
        """Whether a claim's writer is still working: its process exists (same host), its heartbeat is recent."""
        if owner.get("writer") == self.writer:
            return True
        if age > self.timeout:
            return False
        return owner.get("host") != self.host or _process_exists(owner.get("pid"))

    def live_elsewhere(self, shards) -> list[int]:
        """Those of `shards` that are unpublished and claimed by another live writer."""
        return [s for s in shards if s not in self.held and not self.store.shard_path(s).exists()
                and (o := self.owner(s)) is not None and self.alive(*o)]

    def _take_over(self, shard: int, expired: dict) -> bool:
        """Remove an expired claim, unless another writer replaced it meanwhile (then put that one back)."""
        aside = self.path(shard).with_name(f".{self.path(shard).name}.{self.writer}.expired")
        try:
            os.rename(self.path(shard), aside)
        except FileNotFoundError:
            return True  # released or taken over by someone else: try to claim it again
        try:
            taken = json.loads(aside.read_bytes() or b"{}")
            if taken.get("writer") != expired.get("writer"):  # a fresh claim: restore it
                try:
                    os.link(aside, self.path(shard))
                except FileExistsError:
                    pass
                return False
        finally:
            aside.unlink(missing_ok=True)
        log_event(self.store, "takeover", shard=shard, writer=self.writer, previous=expired.get("writer"))
        return True

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                held = list(self.held)
            for shard in held:
                try:
                    os.utime(self.path(shard))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held."""
        self._stop.set()
        self._thread.join()
        for shard in list(self.held):
            self.release(shard)


def remove_dead_temporaries(store: ActivationStore, claims: Claims) -> list[Path]:
    """Delete what killed writers left: temporary shard files whose writer holds no live claim on their
    shard, expired claims on shards that are published, and the short-lived files (``.tmp``, ``.expired``,
    in the store folder and under shards/) of processes that are gone (same host) or older than the claim
    timeout (other hosts)."""
    removed = []
    for entry in [*os.scandir(store.path), *os.scandir(store.path / SHARD_DIR)]:
        if match := _TEMPORARY.match(entry.name):
            owner = claims.owner(int(match.group(1)))
            dead = owner is None or owner[0].get("writer") != match.group(2) or not claims.alive(*owner)
        elif match := _CLAIM.match(entry.name):
            shard = int(match.group(1))
            owner = claims.owner(shard)
            dead = owner is not None and store.shard_path(shard).exists() and not claims.alive(*owner)
        elif match := _LEFTOVER.match(entry.name):
            try:
                age = time.time() - entry.stat().st_mtime
            except FileNotFoundError:  # its process finished with it meanwhile
                continue
            dead = age > claims.timeout or match.group(1) == _host() and not _process_exists(int(match.group(2)))
        else:
            continue
        if dead:
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


class ShardWriter:
    """Writes one shard of a store under a temporary name unique to its writer; :meth:`commit` publishes it.

    h5py lays out the file (attributes and datasets, allocated but not written: a few KB). Rows of
    uncompressed outputs go straight to their byte offsets with ``os.pwrite`` (one copy into the page cache,
    as ``dd`` does; a full disk surfaces as a plain ``OSError``); rows of compressed outputs (``gzip``,
    ``lzf``: chunked, about 1 MiB per chunk) are kept in memory and written through h5py at commit.
    :meth:`commit` fsyncs, checks the file and hard-links it to its final name, which fails rather than
    replace a shard another writer published; :meth:`abort` removes the temporary file.
    """

    def __init__(self, store: ActivationStore, shard: int, writer: str):
        self.store, self.shard, self.writer, self.path = store, shard, writer, store.shard_path(shard)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{writer}.tmp")
        self.start, self.stop = store.shard_range(shard)
        n = self.stop - self.start
        self._specs, self._offsets, self._n_written, self.skipped = store.outputs, {}, 0, []
        self._buffers = {name: np.empty((n, *spec.shape), spec.dtype)
                         for name, spec in self._specs.items() if spec.compression}
        self._fd: int | None = None
        layout = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        layout.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # fixed data offsets, no fill: a sparse file
        layout.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        with _disk_errors(self.tmp_path), h5py.File(self.tmp_path, "w") as f:
            f.attrs.update(store_id=store.meta["store_id"], shard=shard, start=self.start, stop=self.stop,
                           meta_sha256=store.meta_sha256, writer=writer)
            for name, spec in self._specs.items():
                if spec.compression:
                    chunk_rows = max(1, min(n, (1 << 20) // max(1, spec.sample_bytes)))
                    f.create_dataset(name, shape=(n, *spec.shape), dtype=spec.dtype, compression=spec.compression,
                                     chunks=(chunk_rows, *spec.shape))
                else:
                    dataset = f.create_dataset(name, shape=(n, *spec.shape), dtype=spec.dtype, dcpl=layout)
                    self._offsets[name] = dataset.id.get_offset()
        self._fd = os.open(self.tmp_path, os.O_WRONLY)

    @property
    def complete(self) -> bool:
        return self._n_written == self.stop - self.start

    def write(self, offset: int, arrays: Mapping[str, np.ndarray], skipped=()) -> None:
        """Write rows [offset, offset + n) of every output (offset relative to the shard's first sample);
        `skipped` lists ``(sample index, error)`` of rows whose item could not be loaded."""
        n = len(next(iter(arrays.values())))
        for name, array in arrays.items():
            spec = self._specs[name]
            data = np.ascontiguousarray(array, dtype=spec.dtype)
            if data.shape != (n, *spec.shape):
                raise ValueError(f"{name}: got rows of shape {data.shape[1:]}, the store holds {spec.shape}")
            if name in self._buffers:
                self._buffers[name][offset:offset + n] = data
            else:
                _pwrite_all(self._fd, memoryview(data).cast("B"), self._offsets[name] + offset * spec.sample_bytes)
        self.skipped.extend([int(i), str(error)] for i, error in skipped)
        self._n_written += n

    def commit(self) -> Path | None:
        """Publish the shard; returns its path, or None when another writer had already published it."""
        try:
            os.close(self._fd)
            self._fd = None
            if self._buffers or self.skipped:
                with _disk_errors(self.tmp_path), h5py.File(self.tmp_path, "r+") as f:
                    for name, data in self._buffers.items():
                        f[name][...] = data
                    f.attrs["skipped"] = json.dumps(self.skipped)
            fd = os.open(self.tmp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            problem = shard_info(self.tmp_path, self.store, self.shard).get("problem")
            if problem:
                raise CorruptShardError(f"{self.tmp_path} {problem} after writing; nothing was published. "
                                        "Check the disk, then run the same record call again")
            try:
                os.link(self.tmp_path, self.path)
                published = True
            except FileExistsError:
                published = False
            self.tmp_path.unlink()
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        log_event(self.store, "publish" if published else "duplicate", shard=self.shard, writer=self.writer)
        return self.path if published else None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp_path.unlink(missing_ok=True)


@contextmanager
def _disk_errors(path: Path):
    """h5py reports a full disk while flushing as a RuntimeError: raise it as ``OSError(ENOSPC)``, and
    remove the half-laid-out file."""
    try:
        yield
    except (RuntimeError, OSError) as error:
        path.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and ("errno = 28" in str(error) or "No space left" in str(error)):
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path}") from error
        raise


def _process_exists(pid) -> bool:
    """Whether process `pid` exists on this host and is not a zombie (killed, not yet reaped)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _link_new(target: Path, data: bytes) -> bool:
    """Create `target` holding `data`, exclusively and atomically; False if it already exists."""
    tmp = _tmp_path(target)
    _write_durably(tmp, data)
    try:
        os.link(tmp, target)
        _fsync_dir(target.parent)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until all of `data` is written (a write may be partial)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _tmp_path(path: Path) -> Path:
    """A temporary name next to `path`, unique across processes and hosts (stores may be on shared filesystems),
    naming its process (``host-pid-random``) so that the next writer can tell whether it is a dead one's."""
    return path.with_name(f".{path.name}.{new_writer_id()}.tmp")


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
