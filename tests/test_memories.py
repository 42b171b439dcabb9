"""Key-value memories: projections, agreement and composition against plain loops; weights never change."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import wilcoxon
from timm.models.vision_transformer import VisionTransformer

import vitlens
from analyses import memories
from tests.helpers.tiny import SyntheticImages, tiny_model
from vitlens import HookedViT


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    return SyntheticImages(12, seed=3)


@pytest.fixture(scope="module")
def store(model, data, tmp_path_factory):
    return vitlens.record(model, data, tmp_path_factory.mktemp("memories") / "store", reducers=memories.reducers(),
                          batch_size=4, progress=False)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _raw_values(model, layer, kind):
    """timm's own output weight [d_model memories] (this model has no LayerScale)."""
    block = model.vit.blocks[layer]
    return (block.mlp.fc2 if kind == "mlp" else block.attn.proj).weight.detach()


def _plain_top5(model, images, layer, kind):
    """[n tokens 5] indices of the largest coefficients, from run_with_cache (fc1 output; A.V heads concatenated)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    if kind == "mlp":
        coefficients = cache[f"blocks.{layer}.mlp.hook_pre"]
    else:
        pattern, v = cache[f"blocks.{layer}.attn.hook_pattern"], cache[f"blocks.{layer}.attn.hook_v"]
        coefficients = torch.einsum("bhqk,bkhd->bqhd", pattern, v).flatten(-2)
    return coefficients.topk(5, dim=-1).indices, cache


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_value_projection_is_a_plain_product_and_weights_stay_unchanged(model, kind):
    before = _snapshot(model)
    for layer in range(model.cfg.n_layers):
        expected = model.vit.head.weight.detach() @ _raw_values(model, layer, kind)  # [classes memories]
        torch.testing.assert_close(memories.value_projection(model, layer, kind), expected)
        cos = memories.value_cosines(model, layer, kind)
        head = model.vit.head.weight.detach()
        values = _raw_values(model, layer, kind)
        torch.testing.assert_close(cos, (head / head.norm(dim=1, keepdim=True)) @ (values / values.norm(dim=0)))
    table = memories.class_value_agreement(model, seed=1)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit
    assert set(table.columns) >= {"kind", "layer", "class", "cosine", "random_cosine", "p_value"}


def test_class_value_agreement_against_scipy(model):
    twin = tiny_model(seed=5)
    table = memories.class_value_agreement(model, random_model=twin)
    rows = table[(table.kind == "mlp") & (table.layer == 1)]
    head, values = model.vit.head.weight.detach(), _raw_values(model, 1, "mlp")
    top1 = ((head / head.norm(dim=1, keepdim=True)) @ (values / values.norm(dim=0))).max(1).values.numpy()
    head, values = twin.vit.head.weight.detach(), _raw_values(twin, 1, "mlp")
    baseline = ((head / head.norm(dim=1, keepdim=True)) @ (values / values.norm(dim=0))).max(1).values.numpy()
    np.testing.assert_allclose(rows.cosine, top1, rtol=1e-6)
    np.testing.assert_allclose(rows.random_cosine, baseline, rtol=1e-6)
    assert rows.p_value.iloc[0] == pytest.approx(wilcoxon(top1, baseline, alternative="greater").pvalue)


def _plain_agreement(model, data, kind, seed):
    """Per layer: ({class: (rate, random_rate)}, composition rate), in %, by plain loops over images and tokens."""
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = np.asarray(data.samples.label)
    random_class = torch.randint(10, (model.cfg.n_layers, 10), generator=torch.Generator().manual_seed(seed))
    tables = []
    for layer in range(model.cfg.n_layers):
        top5, cache = _plain_top5(model, images, layer, kind)
        projection = model.vit.head.weight.detach() @ _raw_values(model, layer, kind)
        class_top5 = projection.topk(5, dim=1).indices
        memory_class = projection.argmax(0)
        predicted = model.unembed(cache[f"blocks.{layer}.hook_{kind}_out"]).argmax(-1)  # [n tokens]
        rates = {}
        for c in np.unique(labels):
            images_of_c = np.flatnonzero(labels == c)
            rates[c] = [100 * np.mean([bool(set(top5[i, t].tolist()) & set(reference.tolist()))
                                       for i in images_of_c for t in range(top5.shape[1])])
                        for reference in (class_top5[c], class_top5[random_class[layer, c]])]
        matches = [any(memory_class[m] == predicted[i, t] for m in top5[i, t])
                   for i in range(len(images)) for t in range(top5.shape[1])]
        tables.append((rates, 100 * np.mean(matches)))
    return tables


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_key_value_agreement_and_composition_against_plain_loops(model, data, store, kind):
    agreement = memories.key_value_agreement(store, model, kind, seed=4)
    composed = memories.composition(store, model, kind)
    assert list(agreement.columns) == ["layer", "class", "rate", "random_rate"]
    assert list(composed.columns) == ["layer", "rate"]
    for layer, (rates, composition_rate) in enumerate(_plain_agreement(model, data, kind, seed=4)):
        for c, (rate, random_rate) in rates.items():
            row = agreement[(agreement.layer == layer) & (agreement["class"] == c)]
            assert row.rate.item() == pytest.approx(rate) and row.random_rate.item() == pytest.approx(random_rate)
        assert composed.rate[layer] == pytest.approx(composition_rate, abs=1e-4)


def _top1_cosines(vit, layer, kind):
    """[classes] largest cosine of each head row with any value vector, from timm's weights."""
    head = vit.head.weight.detach()
    values = (vit.blocks[layer].mlp.fc2 if kind == "mlp" else vit.blocks[layer].attn.proj).weight.detach()
    return ((head / head.norm(dim=1, keepdim=True)) @ (values / values.norm(dim=0))).max(1).values.numpy()


def _count_forwards(model):
    """A list that grows by the batch size at every forward of `model` (remove the returned handle)."""
    seen = []
    return seen, model.vit.patch_embed.register_forward_hook(lambda module, inputs, out: seen.append(len(out)))


def test_run_table_against_plain_computations_and_resume(model, data, tmp_path):
    seen, handle = _count_forwards(model)
    try:
        table = memories.run(model, data, tmp_path / "run", batch_size=5, progress=False)
        first = sum(seen)
        again = memories.run(model, data, tmp_path / "run", batch_size=5, progress=False)
    finally:
        handle.remove()
    assert first >= len(data) and sum(seen) == first  # resumed: the second run runs no forward at all
    pd.testing.assert_frame_equal(again, table)
    assert list(table.columns) == ["kind", "layer", "class_value_cosine", "random_cosine", "p_value",
                                   "key_value_rate", "random_rate", "composition_rate"]
    twin = copy.deepcopy(model.vit)  # the baseline: timm's own init of the same architecture, seed 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        twin.init_weights()
    for kind in ("attn", "mlp"):
        for layer, (rates, composition_rate) in enumerate(_plain_agreement(model, data, kind, seed=0)):
            row = table[(table.kind == kind) & (table.layer == layer)].iloc[0]
            top1, baseline = _top1_cosines(model.vit, layer, kind), _top1_cosines(twin, layer, kind)
            assert row.class_value_cosine == pytest.approx(top1.mean(), rel=1e-6)
            assert row.random_cosine == pytest.approx(baseline.mean(), rel=1e-6)
            assert row.p_value == pytest.approx(wilcoxon(top1, baseline, alternative="greater").pvalue)
            assert row.key_value_rate == pytest.approx(np.mean([r for r, _ in rates.values()]))
            assert row.random_rate == pytest.approx(np.mean([r for _, r in rates.values()]))
            assert row.composition_rate == pytest.approx(composition_rate, abs=1e-4)
    figure = memories.plot(table)
    assert len(figure.data) == 2 * (2 + 1 + 2)  # per kind: agreement + baseline, composition, cosine + baseline


def test_cls_tokens_need_a_class_token(data, tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                            mlp_ratio=2, class_token=False, global_pool="avg")
    gap = HookedViT.from_timm(vit, tag="tiny-gap")
    store = vitlens.record(gap, data, tmp_path / "gap", reducers=memories.reducers(), progress=False)
    with pytest.raises(ValueError, match="class token"):
        memories.key_value_agreement(store, gap, "mlp", tokens="cls")
    memories.key_value_agreement(store, gap, "mlp")  # all tokens work
    with pytest.raises(ValueError, match="kind"):
        memories.value_projection(gap, 0, "heads")


def test_cli_memories_writes_the_table_and_resumes(tmp_path, capsys):
    from vitlens.cli import main
    from vitlens.data import load_dataset

    store = tmp_path / "s"
    args = ["analyze", "memories", "--store", str(store), "--n-per-class", "1", "--no-progress"]
    assert main(args) == 0
    assert "memories" in capsys.readouterr().out
    written = pd.read_csv(store / "results" / "memories.csv")
    assert len(written) == 2 * 4 and set(written.kind) == {"attn", "mlp"}
    shards = sorted(p.stat().st_mtime_ns for p in (store / "shards").iterdir())
    assert main(args) == 0  # resumed: nothing recorded again, the same table
    assert sorted(p.stat().st_mtime_ns for p in (store / "shards").iterdir()) == shards
    pd.testing.assert_frame_equal(pd.read_csv(store / "results" / "memories.csv"), written)
    model = vitlens.load_model("tiny-scenes")  # the table is memories.run's over the same scenes
    data = load_dataset("scenes", model=model, n_per_class=1, mask_resize="area")
    expected = memories.run(model, data, store, progress=False)
    pd.testing.assert_frame_equal(written, expected, check_exact=False, rtol=1e-6)
    capsys.readouterr()
    assert main(args + ["--model", "tiny-scenes-gap"]) == 1  # another model into the same store
    err = capsys.readouterr().err
    assert err.startswith("vitlens: error:") and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_recorded_top5_memories_are_the_largest_coefficients(model, data, store, kind):
    """``memory_top5_{kind}``: int16 [n layers tokens 5], the indices of each token's 5 largest coefficients."""
    recorded = store[f"memory_top5_{kind}"][:]
    assert recorded.dtype == np.int16 and recorded.shape == (len(data), model.cfg.n_layers, 17, 5)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    for layer in range(model.cfg.n_layers):
        top5, _ = _plain_top5(model, images, layer, kind)
        assert np.array_equal(np.sort(recorded[:, layer], -1), np.sort(top5.numpy(), -1))


def test_cls_agreement_against_a_plain_loop_and_weights_unchanged(model, data, store):
    """tokens="cls": only token 0 counts; no memories call (store measures included) touches the weights."""
    before = _snapshot(model)
    table = memories.key_value_agreement(store, model, "mlp", tokens="cls", seed=2)
    memories.composition(store, model, "attn")
    memories.key_value_agreement(store, model, "attn")
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = np.asarray(data.samples.label)
    random_class = torch.randint(10, (model.cfg.n_layers, 10), generator=torch.Generator().manual_seed(2))
    for layer in range(model.cfg.n_layers):
        top5, _ = _plain_top5(model, images, layer, "mlp")
        class_top5 = (model.vit.head.weight.detach() @ _raw_values(model, layer, "mlp")).topk(5, dim=1).indices
        for c in np.unique(labels):
            row = table[(table.layer == layer) & (table["class"] == c)]
            for column, reference in (("rate", class_top5[c]), ("random_rate", class_top5[random_class[layer, c]])):
                expected = 100 * np.mean([bool(set(top5[i, 0].tolist()) & set(reference.tolist()))
                                          for i in np.flatnonzero(labels == c)])
                assert row[column].item() == pytest.approx(expected)
    after = _snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_token_indices_match_kinds_and_out_of_range_ones_are_refused(model, store):
    """tokens=[0] is the CLS selection; a negative or too large index (which would silently count a token from the
    end, or fail deep inside) is refused with a message naming the range."""
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(memories.key_value_agreement(store, model, "mlp", tokens=[0]),
                                  memories.key_value_agreement(store, model, "mlp", tokens="cls"))
    for bad in ([-1], [0, 17], []):
        with pytest.raises(ValueError, match=r"layout indices in \[0, 17\)"):
            memories.composition(store, model, "mlp", tokens=bad)
