"""The explain() interface: both spellings, the registry, targets, errors, upsample, plot, run into a store, CLI."""
from __future__ import annotations

import importlib

import pytest
import torch
from helpers.tiny import SyntheticImages, tiny_model

import analyses
from vitlens import ActivationStore, cli


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_analyses_explain_is_callable_and_the_module(model):
    images = torch.randn(2, 3, 32, 32)
    module = importlib.import_module("analyses.explain")
    from analyses import explain
    from analyses.explain import explain as function

    assert analyses.explain is module is explain
    expected = function(model, images, "rollout")
    torch.testing.assert_close(analyses.explain(model, images, "rollout"), expected)
    torch.testing.assert_close(analyses.explain.explain(model, images, "rollout"), expected)
    assert {"rollout", "grad_rollout", "chefer", "vit_cx"} <= set(module.methods())
    assert module.methods()["vit_cx"].resolution == "pixels" and module.methods()["chefer"].needs_grad


def test_targets(model):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    as_int = analyses.explain(model, images, "chefer", 5)
    torch.testing.assert_close(as_int, analyses.explain(model, images, "chefer", torch.tensor([5, 5, 5])))
    mixed = analyses.explain(model, images, "chefer", torch.tensor([5, 2, 5]))
    torch.testing.assert_close(mixed[[0, 2]], as_int[[0, 2]])
    assert not torch.allclose(mixed[1], as_int[1])
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 10\)"):
        analyses.explain(model, images, "chefer", 10)
    with pytest.raises(ValueError, match="batch=3"):
        analyses.explain(model, images, "chefer", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer class"):
        analyses.explain(model, images, "chefer", 1.5)


def test_unknown_method_and_option_list_the_valid_ones(model):
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="registered methods: .*chefer.*rollout") as error:
        analyses.explain(model, images, "lrp")
    assert isinstance(error.value, KeyError)
    with pytest.raises(ValueError, match="head_fusion='mean', discard_ratio=0.9") as error:
        analyses.explain(model, images, "rollout", fusion="max")
    assert isinstance(error.value, TypeError)
    with pytest.raises(ValueError, match=r"images must be a tensor \[batch C H W\]"):
        analyses.explain(model, images[0], "rollout")


def test_upsample():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    bilinear = analyses.explain.upsample(maps, 4)
    # align_corners=False: output pixel centres at 0.25, 0.75 ... of the input grid
    torch.testing.assert_close(bilinear[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(bilinear[0, :, 0], torch.tensor([0.0, 0.5, 1.5, 2.0]))
    nearest = analyses.explain.upsample(maps, (4, 6), mode="nearest")
    assert torch.equal(nearest[0], maps[0].repeat_interleave(2, 0).repeat_interleave(3, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        analyses.explain.upsample(maps, 4, mode="bicubic")


def test_plot_draws_every_map_and_the_mask_outline(model):
    images = torch.randn(2, 3, 32, 32)
    maps = {"rollout": analyses.explain(model, images, "rollout", discard_ratio=0.0),
            "vit_cx": analyses.explain(model, images, "vit_cx")}
    masks = torch.zeros(2, 4, 4)
    masks[:, 1:3, 1:3] = 1
    fig = analyses.explain.plot(maps, images, masks)
    kinds = [trace.type for trace in fig.data]
    assert kinds.count("image") == 2 * 3 and kinds.count("heatmap") == 2 * 2 and kinds.count("contour") == 2 * 3
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert heat.z.shape == (32, 32) and heat.z.min() == 0 and heat.z.max() == 1
    assert [a.text for a in fig.layout.annotations] == ["image", "rollout", "vit_cx"]


def test_run_writes_resumable_maps(model, tmp_path):
    data = SyntheticImages(n=6, seed=2)
    path = tmp_path / "maps"
    table = analyses.explain.run(model, data, ["rollout", "vit_cx"], path, options={"rollout": {"head_fusion": "max"}},
                                 batch_size=4, progress=False)
    assert list(table.method) == ["rollout", "vit_cx"] and list(table.samples) == [6, 6] and list(table.nan) == [0, 0]
    labels = torch.tensor(data.samples.label.tolist())
    with ActivationStore(path) as store:
        rollout = torch.from_numpy(store["map.rollout"][:])
        vit_cx = torch.from_numpy(store["map.vit_cx"][:])
        shards = sorted(p.stat().st_mtime_ns for p in path.rglob("*.h5"))
    torch.testing.assert_close(rollout, analyses.explain(model, data.images, "rollout", head_fusion="max"))
    expected = torch.cat([analyses.explain(model, data.images[i:i + 4], "vit_cx", labels[i:i + 4]) for i in (0, 4)])
    torch.testing.assert_close(vit_cx, expected)
    analyses.explain.run(model, data, ["rollout", "vit_cx"], path, options={"rollout": {"head_fusion": "max"}},
                         batch_size=4, progress=False)  # finished: nothing is recomputed
    assert sorted(p.stat().st_mtime_ns for p in path.rglob("*.h5")) == shards


def test_cli(tmp_path, capsys):
    store = tmp_path / "store"
    assert cli.main(["explain", "--store", str(store), "--methods", "rollout,grad_rollout", "--n-per-class", "1",
                     "--option", "discard_ratio=0.5", "--option", "rollout.head_fusion=min", "--no-progress"]) == 0
    table = (store / "results" / "explain.csv").read_text()
    assert "head_fusion=min" in table and "discard_ratio=0.5" in table
    with ActivationStore(store) as opened:
        assert opened["map.rollout"].shape == (10, 6, 6)
    assert cli.main(["explain", "--store", str(tmp_path / "x"), "--methods", "rollout",
                     "--option", "fusion=max"]) == 1
    assert "vitlens: error: --option 'fusion=max'" in capsys.readouterr().err


def test_run_under_torchrun_each_rank_writes_its_own_shards(model, tmp_path, monkeypatch):
    data = SyntheticImages(n=8, seed=5)
    path = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # the two torchrun ranks, one after the other
        monkeypatch.setenv("RANK", rank)
        table = analyses.explain.run(model, data, ["rollout"], path, batch_size=2, shard_size=2, progress=False)
        with ActivationStore(path) as store:
            done = store.done.copy()
        assert done.sum() == table.samples[0] == (4 if rank == "0" else 8)
        if rank == "0":  # shards 0 and 2 of 4: samples 0, 1, 4, 5
            assert done.tolist() == [True, True, False, False, True, True, False, False]
    with ActivationStore(path) as store:
        maps = torch.from_numpy(store["map.rollout"][:])
    torch.testing.assert_close(maps, analyses.explain(model, data.images, "rollout"))


def test_run_target_predicted_explains_the_top_class(model, tmp_path):
    data = SyntheticImages(n=4, seed=6)
    table = analyses.explain.run(model, data, ["grad_rollout"], tmp_path / "top", target="predicted", batch_size=4,
                                 progress=False)
    assert list(table.target) == ["predicted"]
    with ActivationStore(tmp_path / "top") as store:
        stored = torch.from_numpy(store["map.grad_rollout"][:])
    predicted = model(data.images).argmax(-1)
    labels = torch.tensor(data.samples.label.tolist())
    assert (predicted != labels).any()
    torch.testing.assert_close(stored, analyses.explain(model, data.images, "grad_rollout", predicted))
    assert not torch.allclose(stored, analyses.explain(model, data.images, "grad_rollout", labels))
    with pytest.raises(ValueError, match="target must be one of"):
        analyses.explain.run(model, data, ["rollout"], tmp_path / "bad", target="top", progress=False)
