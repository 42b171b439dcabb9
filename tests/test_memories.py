"""Key-value memories: projections, agreement and composition against plain loops; weights never change."""
import numpy as np
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


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_key_value_agreement_and_composition_against_plain_loops(model, data, store, kind):
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = np.asarray(data.samples.label)
    agreement = memories.key_value_agreement(store, model, kind, seed=4)
    composed = memories.composition(store, model, kind)
    assert list(agreement.columns) == ["layer", "class", "rate", "random_rate"]
    assert list(composed.columns) == ["layer", "rate"]
    random_class = torch.randint(10, (model.cfg.n_layers, 10), generator=torch.Generator().manual_seed(4))
    for layer in range(model.cfg.n_layers):
        top5, cache = _plain_top5(model, images, layer, kind)
        projection = model.vit.head.weight.detach() @ _raw_values(model, layer, kind)
        class_top5 = projection.topk(5, dim=1).indices
        memory_class = projection.argmax(0)
        predicted = model.unembed(cache[f"blocks.{layer}.hook_{kind}_out"]).argmax(-1)  # [n tokens]
        for c in np.unique(labels):
            images_of_c = np.flatnonzero(labels == c)
            for column, reference in (("rate", class_top5[c]), ("random_rate", class_top5[random_class[layer, c]])):
                hits = [bool(set(top5[i, t].tolist()) & set(reference.tolist()))
                        for i in images_of_c for t in range(top5.shape[1])]
                row = agreement[(agreement.layer == layer) & (agreement["class"] == c)]
                assert row[column].item() == pytest.approx(100 * np.mean(hits))
        matches = [any(memory_class[m] == predicted[i, t] for m in top5[i, t])
                   for i in range(len(images)) for t in range(top5.shape[1])]
        assert composed.rate[layer] == pytest.approx(100 * np.mean(matches), abs=1e-4)


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
