"""ActivationStore: lazy reads against run_with_cache, the index, corrupt shards and mismatched models."""
import os
import shutil
import subprocess
import sys
from unittest import mock

import h5py
import numpy as np
import pytest
import torch
from helpers.tiny import HOOKS, SyntheticImages, assert_same_store, record_tiny, tiny_model

import vitlens
from vitlens import ActivationStore
from vitlens.cli import main
from vitlens.store import CorruptShardError, NotRecordedError, StoreMetadataError, StoreMismatchError

N, BATCH, SHARD = 40, 4, 8
RECORDED = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_logits"]


@pytest.fixture(scope="module")
def dataset():
    return SyntheticImages(N)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, dataset):
    """A complete float32 store (HOOKS + class ranks); tests copy it before changing anything."""
    path = tmp_path_factory.mktemp("store") / "tiny"
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD).close()
    return path


@pytest.fixture
def store_copy(recorded, tmp_path):
    path = tmp_path / "tiny"
    shutil.copytree(recorded, path)
    return path


def cached_batches(model, dataset):
    """run_with_cache of the recorded hooks on the recorder's own batches: (rows, cache) pairs."""
    for start in range(0, N, BATCH):
        rows = slice(start, start + BATCH)
        images = dataset.images[rows]
        with torch.inference_mode():
            yield rows, model.run_with_cache(images, names_filter=RECORDED)[1]


def test_reads_equal_run_with_cache_float32(recorded, model, dataset):
    store = ActivationStore(recorded, model=model)
    for rows, cache in cached_batches(model, dataset):
        for hook in ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"]:
            np.testing.assert_array_equal(store[hook][rows], cache[hook].numpy(), err_msg=hook)
        cls_queries = cache["blocks.0.attn.hook_pattern"][:, :, :1]
        np.testing.assert_array_equal(store["blocks.0.attn.hook_pattern"][rows], cls_queries.numpy())
    assert store["blocks.0.attn.hook_pattern"].tokens == (0,)


def test_reads_float16_within_rounding(tmp_path, model, dataset):
    store = vitlens.record(model, dataset, tmp_path / "fp16", hooks="blocks.*.hook_resid_post", batch_size=BATCH,
                           shard_size=SHARD, progress=False)
    for rows, cache in cached_batches(model, dataset):
        for layer in range(2):
            stored, exact = store[f"blocks.{layer}.hook_resid_post"][rows], cache["resid_post", layer].numpy()
            assert stored.dtype == np.float16
            np.testing.assert_allclose(stored.astype(np.float32), exact, rtol=2 ** -11, atol=2 ** -24)


def test_lazy_indexing(recorded, model):
    store = ActivationStore(recorded)
    array = store["blocks.1.hook_resid_post"]
    full = array[:]
    assert array.shape == full.shape == (N, 17, 32) and len(array) == N
    patches = model.tokens("patches")
    np.testing.assert_array_equal(array[4:9, patches], full[4:9, patches.numpy()])
    np.testing.assert_array_equal(array[[7, 2, 2, 30]], full[[7, 2, 2, 30]])  # unsorted, repeated
    np.testing.assert_array_equal(array[[7, 2], [0, 3], 5], full[[7, 2]][:, [0, 3], 5])
    np.testing.assert_array_equal(array[-1, ..., 0], full[-1, :, 0])
    np.testing.assert_array_equal(array[np.arange(N) % 3 == 0, 0], full[::3, 0])
    with pytest.raises(IndexError):
        array[N]


def test_samples_done_chunks(recorded, dataset):
    store = ActivationStore(recorded)
    assert len(store) == N and store.done.all()
    assert store.samples.equals(dataset.samples)
    chunks = list(store.iter_chunks("class_rank", 16))
    assert [start for start, _ in chunks] == [0, 16, 32]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), store["class_rank"][:])
    cls_only = np.concatenate([c for _, c in store.iter_chunks("blocks.1.hook_resid_post", 16, tokens=[0])])
    np.testing.assert_array_equal(cls_only, store["blocks.1.hook_resid_post"][:, [0]])
    assert store.meta["layout"]["grid"] == [4, 4] and store.meta["model"]["tag"] == "tiny-test"
    assert set(store.meta["versions"]) >= {"vitlens", "torch", "timm", "h5py"}


def test_cache_for_is_an_activation_cache(recorded, model, dataset):
    store = ActivationStore(recorded)
    cache = store.cache_for(5, model)
    assert isinstance(cache, vitlens.ActivationCache)
    assert set(cache.keys()) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"}
    rows, run_cache = next((rows, c) for rows, c in cached_batches(model, dataset) if rows.start <= 5 < rows.stop)
    assert torch.equal(cache["resid_post", 1], run_cache["resid_post", 1][5 - rows.start][None])


def test_partial_store_raises_for_missing_samples(tmp_path, dataset):
    store = record_tiny(tmp_path / "half", dataset, batch_size=BATCH, shard_size=SHARD, rank=0, world_size=2)
    assert store.done.tolist() == [s // SHARD % 2 == 0 for s in range(N)]
    assert store["hook_logits"][0:8].shape == (8, 10)
    for key in (8, slice(6, 10), [0, 9]):
        with pytest.raises(NotRecordedError, match="not recorded yet.*Resume"):
            store["hook_logits"][key]
    with pytest.raises(NotRecordedError):
        list(store.iter_chunks("hook_logits", 8))


def test_index_rebuilds_from_shards_and_metadata(store_copy, recorded, capsys):
    (store_copy / "index.json").unlink()
    assert main(["store", "rebuild", str(store_copy)]) == 0
    assert "40 of 40 samples in 5 shards" in capsys.readouterr().out
    assert_same_store(store_copy, recorded)
    (store_copy / "index.json").write_bytes(b"garbage")  # a damaged index is rebuilt on open
    assert_same_store(store_copy, recorded)
    assert main(["store", "info", str(store_copy)]) == 0
    assert "blocks.0.attn.hook_pattern" in capsys.readouterr().out


def test_store_can_move(store_copy, recorded, tmp_path):
    moved = tmp_path / "elsewhere" / "store"
    shutil.move(store_copy, moved)
    assert_same_store(moved, recorded)


def test_truncated_shard_is_named_and_resume_repairs_it(store_copy, recorded, dataset):
    shard = store_copy / "shards" / "shard_00001.h5"
    others = {p.name: p.read_bytes() for p in (store_copy / "shards").iterdir() if p != shard}
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CorruptShardError, match="shard_00001.h5.*truncated.*Delete"):
        ActivationStore(store_copy)
    with pytest.raises(CorruptShardError, match="shard_00001.h5"):
        record_tiny(store_copy, dataset, batch_size=BATCH, shard_size=SHARD)
    assert main(["store", "rebuild", str(store_copy)]) == 1
    assert others == {p.name: p.read_bytes() for p in (store_copy / "shards").iterdir() if p != shard}
    shard.unlink()
    record_tiny(store_copy, dataset, batch_size=BATCH, shard_size=SHARD)
    assert_same_store(store_copy, recorded)


def test_shard_of_another_store_is_rejected(store_copy, tmp_path, dataset):
    other = record_tiny(tmp_path / "other", dataset, batch_size=BATCH, shard_size=SHARD).shard_path(2)
    shutil.copy(other, store_copy / "shards" / other.name)
    with pytest.raises(CorruptShardError, match="shard_00002.h5 belongs to another store"):
        ActivationStore(store_copy)


def snapshot(path):
    """store.json and the shards (index.h5 is derived: any open may rebuild it)."""
    files = [path / "store.json", *sorted((path / "shards").iterdir())]
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.mark.parametrize("change, message", [
    (dict(model=tiny_model(seed=1)), r"weights hash differs: store [0-9a-f]{12}.*, request [0-9a-f]{12}"),
    (dict(model=tiny_model(tag="other-tag")), "model tag differs: store 'tiny-test', request 'other-tag'"),
    (dict(dataset=SyntheticImages(N, seed=1)), r"sample list differs at label\[\d+\]: store \d+, request \d+"),
    (dict(dataset=SyntheticImages(N + 8)), "sample list differs at sample_id: store 40 entries, request 48 entries"),
    (dict(hooks="blocks.*.hook_resid_pre"),
     r"output set differs at blocks.0.hook_resid_post: store \{.*, request absent"),
    (dict(dtype="float16"), "dtype differs: store 'float32', request 'float16'"),
    (dict(shard_size=16), "shard size differs: store 8, request 16"),
])
def test_resuming_with_something_else_is_refused(store_copy, dataset, change, message):
    for shard in (store_copy / "shards").glob("shard_0000[24].h5"):  # leave work to do: still nothing is written
        shard.unlink()
    before = snapshot(store_copy)
    options = dict(model=tiny_model(), dataset=dataset, hooks=HOOKS, dtype="float32", shard_size=SHARD)
    options.update(change)
    model, data = options.pop("model"), options.pop("dataset")
    with pytest.raises(StoreMismatchError, match=message + ".*use a new path"):
        vitlens.record(model, data, store_copy, batch_size=BATCH, progress=False, **options)
    assert snapshot(store_copy) == before


def test_resuming_without_the_autocast_of_the_store_is_refused(tmp_path, dataset):
    record_tiny(tmp_path / "bf16", dataset, batch_size=BATCH, shard_size=SHARD, autocast=torch.bfloat16).close()
    with pytest.raises(StoreMismatchError, match="autocast differs: store 'bfloat16', request None"):
        record_tiny(tmp_path / "bf16", dataset, batch_size=BATCH, shard_size=SHARD)


def test_preprocessing_mismatch(store_copy, dataset):
    other = SyntheticImages(N)
    other.data_config = {**tiny_model().data_config, "crop_pct": 0.5}
    with pytest.raises(StoreMismatchError, match="preprocessing differs at crop_pct: store 0.875, request 0.5"):
        record_tiny(store_copy, other, batch_size=BATCH, shard_size=SHARD)


def test_opening_with_another_model_is_refused(recorded):
    with pytest.raises(StoreMismatchError, match="weights hash differs.*open it with the model it was recorded"):
        ActivationStore(recorded, model=tiny_model(seed=1))
    with pytest.raises(KeyError, match="did you mean"):
        ActivationStore(recorded)["blocks.1.hook_resid_pots"]
    with pytest.raises(FileNotFoundError, match="no vitlens store"):
        ActivationStore(recorded.parent / "missing")


def test_bad_indices_raise_index_error(recorded):
    array = ActivationStore(recorded)["blocks.1.hook_resid_post"]  # [40, 17, 32]
    for key, message in [((0, 0, 0, 0), "too many indices.*3-dimensional, 4"),
                         ((0, ..., 0, 0, 0), "too many indices"),
                         ((slice(None), np.ones(5, bool)), r"boolean index of shape \(5,\).*size 17"),
                         ((np.ones(N + 1, bool),), "boolean index"),
                         ((np.array([0.0, 1.7]),), "integer or boolean, got float64"),
                         ((0, [0.5]), "integer or boolean"),
                         ((0, [3, -18]), r"index array -18..3 is out of range for an axis of size 17"),
                         ((0, np.array(17)), "out of range")]:
        with pytest.raises(IndexError, match=message):
            array[key]


def test_cache_for_normalises_the_sample_index(recorded):
    store = ActivationStore(recorded)
    assert torch.equal(store.cache_for(-1)["hook_logits"], store.cache_for(N - 1)["hook_logits"])
    for i in (N, -N - 1):
        with pytest.raises(IndexError, match=f"sample {i} is out of range.*holds {N} samples"):
            store.cache_for(i)


def test_arrays_stay_valid_across_refresh(tmp_path, dataset):
    store = record_tiny(tmp_path / "store", dataset, batch_size=BATCH, shard_size=SHARD, rank=0, world_size=2)
    array = store["hook_logits"]
    record_tiny(tmp_path / "store", dataset, batch_size=BATCH, shard_size=SHARD, rank=1, world_size=2).close()
    store.refresh()
    assert len(array) == N
    np.testing.assert_array_equal(array[:], store["hook_logits"][:])
    store.close()
    with pytest.raises(ValueError, match="is closed"):
        array[:2]


def test_temporary_files_of_another_host_with_our_pid_are_left_alone(tmp_path, dataset):
    path = tmp_path / "store"
    path.mkdir()
    theirs = [path / f".store.json.{os.getpid()}.tmp", path / f".index.h5.{os.getpid()}.tmp"]
    for file in theirs:
        file.write_bytes(b"being written on another host")
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD).close()
    ActivationStore.rebuild(path).close()
    assert all(file.read_bytes() == b"being written on another host" for file in theirs)


# ------------------------------------------------------------------- reads never return what is not on disk
def test_a_shard_deleted_under_an_open_reader_raises_instead_of_zeros(store_copy, recorded):
    store, reference = ActivationStore(store_copy), ActivationStore(recorded)
    np.testing.assert_array_equal(store["hook_logits"][8:16], reference["hook_logits"][8:16])
    (store_copy / "shards" / "shard_00001.h5").unlink()
    for key in (slice(8, 16), 10, [3, 12], slice(0, 40, 5)):
        with pytest.raises(NotRecordedError, match="not recorded yet"):
            store["hook_logits"][key]
    assert not store.done[8:16].any() and store.done[:8].all()
    np.testing.assert_array_equal(store["hook_logits"][16:24], reference["hook_logits"][16:24])


def test_single_row_reads_see_a_shard_rewritten_in_place_and_a_closed_store(store_copy, recorded):
    """The per-sample fast path checks the shard file on every call: new contents are read, never stale ones."""
    store, reference = ActivationStore(store_copy), ActivationStore(recorded)
    row = store["hook_logits"][np.int64(10)]
    np.testing.assert_array_equal(row, reference["hook_logits"][10:11][0])
    row += 1  # a private copy, not a view of the shard
    np.testing.assert_array_equal(store["hook_logits"][10], reference["hook_logits"][10:11][0])
    with h5py.File(store_copy / "shards" / "shard_00001.h5", "r+") as f:  # same size, new values
        f["hook_logits"][...] = np.arange(f["hook_logits"].size, dtype=np.float32).reshape(f["hook_logits"].shape)
    width = reference["hook_logits"].shape[1]
    np.testing.assert_array_equal(store["hook_logits"][10], np.arange(2 * width, 3 * width, dtype=np.float32))
    np.testing.assert_array_equal(store["hook_logits"][3], reference["hook_logits"][3:4][0])
    store.close()
    with pytest.raises(ValueError, match="is closed"):
        store["hook_logits"][3]

def test_an_edited_store_json_is_detected_and_intact_shards_are_not_blamed(store_copy):
    meta_file = store_copy / "store.json"
    original = meta_file.read_text()
    meta_file.write_text(original.replace('"dtype": "float32"', '"dtype": "float16"', 1))
    for index in (True, False):  # with the writers' index, and with every shard opened
        if not index:
            (store_copy / "index.json").unlink()
        with pytest.raises(StoreMetadataError, match="store.json was changed after its shards were written.*"
                                                      "restore the original store.json.*shards themselves are intact") as info:
            ActivationStore(store_copy)
        assert "Delete" not in str(info.value) and "delete" not in str(info.value)
    meta_file.write_text(original)
    store = ActivationStore(store_copy)
    meta_file.write_text(original.replace('"n_samples": 40', '"n_samples": 500'))
    with pytest.raises(StoreMetadataError, match="changed after this store was opened"):
        store.refresh()
    with pytest.raises(StoreMetadataError, match=r"store.json says n_samples 500 but lists 40 sample ids.*restore"):
        ActivationStore(store_copy)
    meta_file.write_text(original[:-20])
    with pytest.raises(StoreMetadataError, match=f"{meta_file} is not valid JSON"):
        ActivationStore(store_copy)


def test_a_shard_copied_under_another_number_is_refused(store_copy):
    shutil.copy(store_copy / "shards" / "shard_00003.h5", store_copy / "shards" / "shard_00001.h5")
    with pytest.raises(CorruptShardError, match=r"shard_00001.h5 is shard 3 with samples 24..32, not shard 1 "
                                                r"with 8..16 \(copied or renamed.*Delete these files \(and only"):
        ActivationStore(store_copy)


def test_gaps_in_the_shard_numbers_read_each_shard_by_its_number(store_copy, recorded):
    for shard in (0, 2, 4):  # as a rank of a multi-rank run leaves it
        (store_copy / "shards" / f"shard_0000{shard}.h5").unlink()
    store = ActivationStore(store_copy)
    assert sorted(store.shards_on_disk()) == [1, 3]
    reference = ActivationStore(recorded)
    for name in ("blocks.1.hook_resid_post", "class_rank"):
        np.testing.assert_array_equal(store[name][24:32], reference[name][24:32])
        np.testing.assert_array_equal(store[name][[30, 9]], reference[name][[30, 9]])


def test_negative_and_out_of_order_index_arrays(recorded):
    array = ActivationStore(recorded)["blocks.1.hook_resid_post"]
    full = array[:]
    np.testing.assert_array_equal(array[[-1, -40, 5]], full[[39, 0, 5]])
    np.testing.assert_array_equal(array[np.array([-3, 2]), [-1, 0]], full[[37, 2]][:, [16, 0]])
    np.testing.assert_array_equal(array[torch.tensor([33, -33])], full[[33, 7]])
    assert array[[]].shape == (0, 17, 32) and array[5:5].shape == (0, 17, 32)


def test_a_partial_last_shard(tmp_path, model):
    dataset = SyntheticImages(37)  # shards of 8: the last one holds 5 samples
    store = record_tiny(tmp_path / "odd", dataset, batch_size=BATCH, shard_size=SHARD)
    assert store.n_shards == 5 and store.shard_range(4) == (32, 37) and store.done.all()
    with torch.inference_mode():
        _, cache = model.run_with_cache(dataset.images[28:37], names_filter=["hook_logits"])
    np.testing.assert_allclose(store["hook_logits"][28:37], cache["hook_logits"].numpy(), rtol=1e-5, atol=1e-6)
    assert [len(chunk) for _, chunk in store.iter_chunks("hook_logits", 16)] == [16, 16, 5]
    assert store["hook_logits"][-1].shape == (10,)


def test_identity_includes_the_token_layout_and_token_selections(store_copy, dataset):
    store = ActivationStore(store_copy)
    layout = {**store.meta["layout"], "grid": [2, 8]}
    with pytest.raises(StoreMismatchError, match=r"token layout differs at grid\[0\]: store 4, model 2"):
        store.check_compatible({"layout": layout}, source="model")
    (store_copy / "shards" / "shard_00004.h5").unlink()
    before = snapshot(store_copy)
    hooks = {**HOOKS, "blocks.0.attn.hook_pattern": "all"}
    with pytest.raises(StoreMismatchError, match=r"output set differs at blocks.0.attn.hook_pattern.tokens: "
                                                 r"store \[0\], request None"):
        record_tiny(store_copy, dataset, hooks=hooks, batch_size=BATCH, shard_size=SHARD)
    assert snapshot(store_copy) == before


def test_iter_chunks_refuses_sizes_below_one(recorded):
    store = ActivationStore(recorded)
    for size in (0, -5, 2.5):
        with pytest.raises(ValueError, match="iter_chunks size must be a positive number of samples"):
            list(store.iter_chunks("hook_logits", size))


def test_tilde_paths_are_expanded(recorded, monkeypatch):
    monkeypatch.setenv("HOME", str(recorded.parent))
    assert ActivationStore("~/tiny").path == recorded


def test_the_reader_imports_no_torch():
    code = "import sys, vitlens.store; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- a thousand shards
@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """A store of 1,000 one-sample shards of the logits, recorded once."""
    path = tmp_path_factory.mktemp("thousand") / "store"
    with mock.patch("os.fsync"):  # durability is not what this store is for: 1,000 fsyncs take long
        vitlens.record(tiny_model(), SyntheticImages(1000), path, hooks="hook_logits", dtype="float32",
                       batch_size=1, shard_size=1, progress=False).close()
    return path


def folder_state(path):
    return {p.relative_to(path): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_opening_and_refreshing_a_thousand_shards_opens_only_new_ones(thousand, tmp_path, monkeypatch):
    path = tmp_path / "store"
    shutil.copytree(thousand, path)
    opened = []
    h5_file = h5py.File
    monkeypatch.setattr(h5py, "File", lambda name, *a, **k: opened.append(str(name)) or h5_file(name, *a, **k))
    before = folder_state(path)
    store = ActivationStore(path)
    assert store.done.all() and opened == [] and store.shard_opens == 0  # index.json vouches for every shard
    expected = store["hook_logits"][:]
    opened.clear()  # the read opened the shards; refreshes must not
    for shard in (3, 500, 999):
        (path / "shards" / f"shard_{shard:05d}.h5").unlink()
    before = folder_state(path)
    store.refresh()
    assert opened == [] and int(store.done.sum()) == 997
    assert folder_state(path) == before  # a reader writes nothing into the store
    vitlens.record(tiny_model(), SyntheticImages(1000), path, hooks="hook_logits", dtype="float32",
                   batch_size=1, shard_size=1, progress=False).close()
    opened.clear()
    (path / "index.json").unlink()  # the new shards are then unknown to the reader: it opens exactly those
    store.refresh()
    assert sorted(opened) == [str(path / "shards" / f"shard_{s:05d}.h5") for s in (3, 500, 999)]
    np.testing.assert_array_equal(store["hook_logits"][:], expected)
    opened.clear()
    store.refresh()
    assert opened == []
