"""Store reads against h5py on the same shard files, at 50 and 1,000 shards; the shuffled loader against a
sequential read.

A store of ``[n, 17, 32]`` float32 rows is written straight through the store's ShardWriter (no model), then:

1. ``store[name][i]`` for every i in a random order vs h5py with every shard file already open
   (``files[i // shard_size][name][i % shard_size]``)                        (goal: h5py time / ours >= 0.5);
2. ``store.iter_chunks(name, 256)`` vs h5py slices of the shards, concatenated   (goal >= 0.67);
3. ``store.loader(name, 256, shuffle=True)`` vs the same loader with ``shuffle=False``   (goal >= 0.67).

    python bench/store_reads.py [--samples 8000]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import torch

from common import print_ratio, time_interleaved
from vitlens.shards import ShardWriter, create_store
from vitlens.store import ActivationStore

NAME, SHAPE = "blocks.0.hook_resid_post", (17, 32)


def make_store(path: Path, n: int, shard_size: int) -> None:
    meta = {"model": {"tag": "bench", "weights_hash": uuid.uuid4().hex}, "preprocessing": {}, "layout": {},
            "samples": {"sample_id": [f"s{i}" for i in range(n)], "label": [0] * n}, "n_samples": n,
            "outputs": {NAME: {"hook": NAME, "tokens": None, "token_axis": 0, "dtype": "float32", "reducer": None,
                               "shape": list(SHAPE)}},
            "dtype": "float32", "autocast": None, "shard_size": shard_size, "batch_size": shard_size}
    store = create_store(path, meta, meta)
    rng = np.random.default_rng(0)
    with mock.patch("os.fsync"):  # the bench measures reads
        for shard in range(store.n_shards):
            start, stop = store.shard_range(shard)
            writer = ShardWriter(store, shard, "bench")
            writer.write(0, {NAME: rng.standard_normal((stop - start, *SHAPE), dtype=np.float32)})
            writer.commit()
    ActivationStore.rebuild(path).close()


def bench(path: Path, n: int, n_shards: int) -> None:
    store = ActivationStore(path)
    shard_size = store.shard_size
    files = [h5py.File(store.shard_path(s), "r") for s in range(n_shards)]
    datasets = [f[NAME] for f in files]
    order = np.random.default_rng(1).permutation(n)[:2000]
    array = store[NAME]

    def h5_rows():
        for i in order:
            datasets[i // shard_size][i % shard_size]

    def our_rows():
        for i in order:
            array[int(i)]

    def h5_chunks():
        for start in range(0, n, 256):
            parts, i = [], start
            while i < min(n, start + 256):
                s, stop = i // shard_size, min(n, start + 256, (i // shard_size + 1) * shard_size)
                parts.append(datasets[s][i - s * shard_size:stop - s * shard_size])
                i = stop
            np.concatenate(parts)

    def our_chunks():
        for _ in store.iter_chunks(NAME, 256):
            pass

    shuffled, sequential = store.loader(NAME, 256, shuffle=True), store.loader(NAME, 256, shuffle=False)
    seconds = time_interleaved({"h5py rows": h5_rows, "store rows": our_rows, "h5py chunks": h5_chunks,
                                "store chunks": our_chunks, "shuffled": lambda: list(shuffled),
                                "sequential": lambda: list(sequential)}, torch.device("cpu"), repeats=5)
    print(f"{n_shards} shards of {shard_size} ({n} samples of {SHAPE} float32)")
    print(f"  store[name][i]   {seconds['store rows'] / len(order) * 1e6:8.1f} us   h5py "
          f"{seconds['h5py rows'] / len(order) * 1e6:8.1f} us")
    print_ratio("h5py / store[name][i]", seconds["h5py rows"] / seconds["store rows"], 0.5)
    print(f"  iter_chunks      {seconds['store chunks'] * 1e3:8.1f} ms   h5py {seconds['h5py chunks'] * 1e3:8.1f} ms")
    print_ratio("h5py slices / iter_chunks", seconds["h5py chunks"] / seconds["store chunks"], 0.67)
    print(f"  loader           {seconds['shuffled'] * 1e3:8.1f} ms shuffled, {seconds['sequential'] * 1e3:8.1f} ms "
          "sequential")
    print_ratio("sequential / shuffled loader", seconds["sequential"] / seconds["shuffled"], 0.67)
    for f in files:
        f.close()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="vitlens-reads-"))
    try:
        for n_shards in (50, 1000):
            path = root / f"{n_shards}"
            make_store(path, args.samples, args.samples // n_shards)
            bench(path, args.samples, n_shards)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
