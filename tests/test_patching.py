"""Store-driven activation patching and token-grid sweeps."""
import numpy as np
import pytest
import torch
from helpers.tiny import SyntheticImages, tiny_model
from timm.models.vision_transformer import VisionTransformer

import vitlens
import vitlens.patching
from vitlens.patching import Patch, patch_hooks, patch_sweep, patch_value, run_patched, token_table
from vitlens.store import StoreMismatchError

N = 12
DONOR, TARGET = 3, 7


@pytest.fixture(scope="module")
def dataset():
    return SyntheticImages(N)


@pytest.fixture(scope="module")
def model():
    return tiny_model(reg_tokens=2)  # 19 tokens: CLS, 2 registers, 4x4 patches


@pytest.fixture(scope="module")
def store(tmp_path_factory, model, dataset):
    """float32, batch size 1: the donor's stored activations come from exactly the forward a patched run does."""
    path = tmp_path_factory.mktemp("patching") / "store"
    hooks = {"blocks.*.hook_resid_pre": "all", "blocks.*.hook_resid_post": "all", "hook_logits": "all",
             "blocks.0.hook_mlp_out": [0, 4, 9]}
    return vitlens.record(model, dataset, path, hooks=hooks, dtype="float32", batch_size=1, progress=False)


def image(dataset, i):
    return dataset.images[i:i + 1]


def test_patching_a_hook_reproduces_the_donor_downstream_exactly(model, store, dataset):
    patch = Patch("blocks.0.hook_resid_post", source=DONOR)
    with torch.inference_mode(), model.hooks(fwd_hooks=patch_hooks(store, [patch])):
        logits, cache = model.run_with_cache(image(dataset, TARGET), names_filter=["blocks.1.hook_resid_post"])
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_post"].numpy(),
                                  store["blocks.1.hook_resid_post"][DONOR:DONOR + 1])
    np.testing.assert_array_equal(logits.numpy(), store["hook_logits"][DONOR:DONOR + 1])
    assert not torch.equal(logits, run_patched(model, image(dataset, TARGET), store, []))


def test_patching_chosen_tokens_leaves_the_others(model, store, dataset):
    patch = Patch("blocks.1.hook_resid_pre", source=DONOR, tokens=[0, 5])
    with torch.inference_mode(), model.hooks(fwd_hooks=patch_hooks(store, [patch])):
        _, cache = model.run_with_cache(image(dataset, TARGET), names_filter=["blocks.1.hook_resid_pre"])
    patched = cache["blocks.1.hook_resid_pre"][0].numpy()
    donor, own = store["blocks.1.hook_resid_pre"][DONOR], store["blocks.1.hook_resid_pre"][TARGET]
    np.testing.assert_array_equal(patched[[0, 5]], donor[[0, 5]])
    others = np.setdiff1d(np.arange(19), [0, 5])
    np.testing.assert_array_equal(patched[others], own[others])


def test_patching_from_a_token_subset(model, store, dataset):
    patch = Patch("blocks.0.hook_mlp_out", source=DONOR, tokens=[9, 4])  # stored tokens: 0, 4, 9
    with torch.inference_mode(), model.hooks(fwd_hooks=patch_hooks(store, [patch])):
        _, cache = model.run_with_cache(image(dataset, TARGET), names_filter=["blocks.0.hook_mlp_out"])
    np.testing.assert_array_equal(cache["blocks.0.hook_mlp_out"][0, [9, 4]].numpy(),
                                  store["blocks.0.hook_mlp_out"][DONOR, [2, 1]])


def test_mean_and_zero_sources(model, store, dataset):
    labels = store.samples["label"].to_numpy()
    label = labels[0]
    resid = store["blocks.0.hook_resid_post"][:]
    np.testing.assert_allclose(patch_value(store, "blocks.0.hook_resid_post", "mean", label=label).numpy(),
                               resid[labels == label].mean(0), rtol=1e-6)
    np.testing.assert_allclose(patch_value(store, "blocks.0.hook_resid_post", "mean").numpy(), resid.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(patch_value(store, "blocks.0.hook_resid_post", [1, 4]).numpy(),
                               (resid[1] + resid[4]) / 2, rtol=1e-6)
    zero = run_patched(model, image(dataset, TARGET), store, [Patch("blocks.0.hook_mlp_out", "zero", tokens=[0])])
    with torch.inference_mode():
        def ablate_cls(activation, hook):
            activation = activation.clone()
            activation[:, 0] = 0
            return activation
        expected = model.run_with_hooks(image(dataset, TARGET), fwd_hooks=[("blocks.0.hook_mlp_out", ablate_cls)])
    assert torch.equal(zero, expected)
    with pytest.raises(ValueError, match="unknown patch source"):
        patch_value(store, "hook_logits", "median")
    with pytest.raises(ValueError, match="label= selects"):
        patch_value(store, "hook_logits", 3, label=1)
    with pytest.raises(ValueError, match="tokens \\[5\\] of blocks.0.hook_mlp_out are not in the store"):
        run_patched(model, image(dataset, TARGET), store, [Patch("blocks.0.hook_mlp_out", DONOR, tokens=[5])])


def test_token_table_follows_the_layout(model):
    table = token_table(model.layout)
    assert table.kind.tolist()[:4] == ["cls", "register", "register", "patch"]
    patches = table[table.kind == "patch"]
    assert patches.row.tolist() == [k // 4 for k in range(16)] and patches.col.tolist() == [k % 4 for k in range(16)]
    assert table.row[:3].isna().all() and table.name[18] == "patch(3,3)"


def test_patch_sweep_over_the_token_grid(model, store, dataset):
    images = dataset.images[[TARGET, 9]]
    donor_class = int(store["hook_logits"][DONOR].argmax())
    metric = lambda logits: logits[:, donor_class]  # noqa: E731
    df = patch_sweep(model, images, store, "blocks.*.hook_resid_post", DONOR, metric, batch_size=16)
    assert list(df.columns) == ["hook", "layer", "token", "kind", "name", "row", "col", "metric"]
    assert len(df) == 2 * 19 and df.layer.tolist() == [0] * 19 + [1] * 19
    assert df[df.token == 7].iloc[0][["kind", "row", "col"]].tolist() == ["patch", 1, 0]

    with torch.inference_mode():
        baseline = metric(model(images)).mean().item()
    last = df[df.layer == 1].set_index("token").metric
    donor_logit = store["hook_logits"][DONOR, donor_class]
    assert last[0] == pytest.approx(donor_logit, rel=1e-5)  # the logits read the last layer's CLS only
    np.testing.assert_allclose(last[1:], baseline, rtol=1e-5)
    for hook, token in [("blocks.0.hook_resid_post", 0), ("blocks.0.hook_resid_post", 11),
                        ("blocks.1.hook_resid_post", 2)]:
        single = run_patched(model, images, store, [Patch(hook, DONOR, tokens=[token])])
        swept = df[(df.hook == hook) & (df.token == token)].metric.item()
        assert swept == pytest.approx(metric(single).mean().item(), rel=1e-5)


def test_sweep_checks_the_store(model, store, dataset):
    images = image(dataset, TARGET)
    metric = lambda logits: logits[:, 0]  # noqa: E731
    df = patch_sweep(model, images, store, "blocks.0.hook_mlp_out", DONOR, metric, tokens="cls")
    assert df.token.tolist() == [0] and df.kind.tolist() == ["cls"]
    with pytest.raises(ValueError, match="not in the store"):
        patch_sweep(model, images, store, "blocks.0.hook_mlp_out", DONOR, metric, tokens="patches")
    with pytest.raises(KeyError, match="not recorded"):
        patch_sweep(model, images, store, "blocks.0.hook_attn_out", DONOR, metric)
    with pytest.raises(StoreMismatchError, match="weights hash differs"):
        patch_sweep(tiny_model(seed=1, reg_tokens=2), images, store, "blocks.0.hook_mlp_out", DONOR, metric)


def test_empty_sources_and_token_selections_are_errors(model, store, dataset):
    with pytest.raises(ValueError, match="source is an empty list of sample indices"):
        patch_value(store, "blocks.0.hook_resid_post", [])
    with pytest.raises(ValueError, match="a 'zero' source takes none"):
        patch_value(store, "blocks.0.hook_resid_post", "zero", label=1)
    metric = lambda logits: logits[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match="tokens=\\[\\] selects no token"):
        patch_sweep(model, image(dataset, TARGET), store, "blocks.0.hook_resid_post", DONOR, metric, tokens=[])


def test_token_indices_outside_the_layout_are_refused(model, store, dataset):
    """A negative index would silently patch a token counted from the end (and leave the sweep's grid columns NA)."""
    for tokens in ([-1], [19], [0, 19]):  # the tiny model has tokens 0..18
        with pytest.raises(ValueError, match="out of range: its token indices run 0..18"):
            run_patched(model, image(dataset, TARGET), store, [Patch("blocks.0.hook_resid_post", DONOR, tokens)])
    with pytest.raises(ValueError, match="out of range: its token indices run 0..18"):
        patch_sweep(model, image(dataset, TARGET), store, "blocks.0.hook_resid_post", DONOR,
                    lambda logits: logits[:, 0], tokens=[-1])


def test_whole_patch_of_a_token_subset_is_an_error(model, store, dataset):
    with pytest.raises(ValueError, match="recorded at tokens \\[0, 4, 9\\] only.*pass tokens="):
        run_patched(model, image(dataset, TARGET), store, [Patch("blocks.0.hook_mlp_out", DONOR)])


def test_images_on_another_token_grid_are_refused(store):
    torch.manual_seed(0)  # tiny_model's weights, taking any image size
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                            num_heads=2, mlp_ratio=2, reg_tokens=2, dynamic_img_size=True)
    dynamic = vitlens.HookedViT.from_timm(vit, tag="tiny-test")
    large = torch.randn(1, 3, 48, 48)
    with pytest.raises(StoreMismatchError, match="6x6 token grid but .* 4x4 grid"):
        run_patched(dynamic, large, store, [Patch("blocks.0.hook_resid_post", DONOR, tokens=[0])])
    with pytest.raises(StoreMismatchError, match="6x6 token grid"):
        patch_sweep(dynamic, large, store, "blocks.0.hook_resid_post", DONOR, lambda logits: logits[:, 0],
                    tokens="cls")
    patched = run_patched(dynamic, large, store, [Patch("hook_logits", DONOR)])  # no token axis: any grid
    np.testing.assert_array_equal(patched.numpy(), store["hook_logits"][DONOR:DONOR + 1])


def test_mean_source_spans_several_read_chunks(store, monkeypatch):
    import vitlens.patching as patching

    monkeypatch.setattr(patching, "MEAN_CHUNK", 5)  # 12 samples: chunks of 5, 5 and 2
    resid = store["blocks.0.hook_resid_post"][:]
    np.testing.assert_allclose(patch_value(store, "blocks.0.hook_resid_post", "mean").numpy(), resid.mean(0),
                               rtol=1e-5, atol=1e-6)
    picked = [0, 2, 3, 5, 7, 8, 11]
    np.testing.assert_allclose(patch_value(store, "blocks.0.hook_resid_post", picked).numpy(), resid[picked].mean(0),
                               rtol=1e-5, atol=1e-6)


def test_patching_attention_patterns_at_query_tokens(model, dataset, tmp_path):
    name = "blocks.0.attn.hook_pattern"  # recorded at the CLS query only: [head 1 key]
    store = vitlens.record(model, SyntheticImages(8), tmp_path / "patterns", hooks={name: "cls"}, dtype="float32",
                           batch_size=1, progress=False)
    with torch.inference_mode(), model.hooks(fwd_hooks=patch_hooks(store, [Patch(name, DONOR, tokens=[0])])):
        _, cache = model.run_with_cache(image(dataset, TARGET), names_filter=[name])
    with torch.inference_mode():
        _, own = model.run_with_cache(image(dataset, TARGET), names_filter=[name])
    patched = cache[name][0].numpy()  # [head query key]
    np.testing.assert_array_equal(patched[:, 0], store[name][DONOR][:, 0])
    np.testing.assert_array_equal(patched[:, 1:], own[name][0, :, 1:].numpy())


def test_patching_from_an_in_memory_cache_and_single_heads(model, dataset):
    donor, target = image(dataset, DONOR), image(dataset, TARGET)
    with torch.inference_mode():
        donor_logits, clean = model.run_with_cache(donor)
        patched = run_patched(model, target, clean, [Patch("blocks.1.hook_resid_post", 0)])
        assert torch.equal(patched, donor_logits)
        z = "blocks.1.attn.hook_z"
        with model.hooks(fwd_hooks=patch_hooks(vitlens.patching.CacheSource(clean, model),
                                               [Patch(z, 0, tokens=[0, 4], head=1)])):
            _, cache = model.run_with_cache(target, names_filter=[z])
        _, own = model.run_with_cache(target, names_filter=[z])
    expected = own[z].clone()
    expected[:, [0, 4], 1] = clean[z][:, [0, 4], 1]
    assert torch.equal(cache[z], expected)
    df = patch_sweep(model, target, clean, "blocks.0.attn.hook_z", 0, lambda logits: logits[:, 2], tokens=[0, 7],
                     head=0)
    single = run_patched(model, target, clean, [Patch("blocks.0.attn.hook_z", 0, tokens=[7], head=0)])
    assert df.metric.tolist()[1] == pytest.approx(single[0, 2].item(), rel=1e-5)

    def by_hand(z, hook):  # token 7, head 0 of the donor's z; every other entry the target's own
        z = z.clone()
        z[:, 7, 0] = clean["blocks.0.attn.hook_z"][:, 7, 0]
        return z
    with torch.inference_mode():
        expected = model.run_with_hooks(target, fwd_hooks=[("blocks.0.attn.hook_z", by_hand)])[0, 2].item()
        assert expected != pytest.approx(model(target)[0, 2].item(), abs=1e-6)  # the patch matters
    assert df.metric.tolist()[1] == pytest.approx(expected, abs=1e-5)


def test_sweep_metric_of_the_wrong_shape_is_refused(model, store, dataset):
    images = dataset.images[[TARGET, 9]]
    for bad in (lambda logits: logits, lambda logits: logits[:, [3]]):
        with pytest.raises(ValueError, match=r"metric returned shape .* one value per image \(\[2\]\)"):
            patch_sweep(model, images, store, "blocks.0.hook_resid_post", DONOR, bad, tokens="cls")
