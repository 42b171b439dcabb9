"""ViT-CX against a step-by-step restatement of the original (specs/rollout_and_vit_cx.md §2.2), one image and
one mask at a time, plus its determinism, NaN guard and cluster-order properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering

import analyses
from analyses.vit_cx import causal_scores, vit_cx_masks
from vitlens import load_model
from vitlens.data import load_dataset


@pytest.fixture(scope="module")
def scenes():
    model = load_model("tiny-scenes")
    data = load_dataset("scenes", model=model)
    return model, torch.stack([data[i]["image"] for i in (3, 170, 333)])


def original_vit_cx(model, image, seed, threshold=0.1):
    """§2.2 for one image [C H W], written plainly: returns (saliency [H W], K)."""
    H, W = image.shape[-2:]
    with torch.no_grad():
        probs = model(image[None]).softmax(dim=1)[0]
        target = int(probs.argmax())
        class_p = probs[target]
        _, cache = model.run_with_cache(image[None])
        tokens = cache["blocks.3.ln1.hook_normalized"][0, 1:]  # drop CLS
        feature_map = tokens.reshape(6, 6, -1).permute(2, 0, 1)  # [D 6 6]
        feature_map = F.interpolate(feature_map[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        mask = feature_map.reshape(feature_map.shape[0], H * W)
        mask = (mask - mask.min(1).values[:, None]) / (mask.max(1).values[:, None] - mask.min(1).values[:, None])
        num = mask @ mask.T
        denom = torch.linalg.norm(mask, dim=1).reshape(-1, 1) * torch.linalg.norm(mask, dim=1)
        similarity = num / denom
        similarity[torch.isnan(similarity)] = 0
        cluster = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="precomputed",
                                          linkage="complete").fit((1 - similarity).numpy())
        k = len(set(cluster.labels_))
        summed = torch.zeros(k, H * W)
        for i in range(len(mask)):
            summed[cluster.labels_[i]] += mask[i]
        lo, hi = summed.min(1).values[:, None], summed.max(1).values[:, None]
        masks = ((summed - lo) / (hi - lo)).reshape(k, H, W)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            noise = 0.1 * torch.randn(k, 3, H, W)
        p_final = torch.zeros(k)
        for j in range(k):  # one mask at a time
            masked = image * masks[j] + noise[j] * (1 - masks[j])
            reference = image + noise[j] * (1 - masks[j])
            p_masked = model(masked[None]).softmax(dim=1)[0, target]
            p_reference = model(reference[None]).softmax(dim=1)[0, target]
            p_final[j] = p_masked - p_reference + class_p
        saliency = sum(p_final[j] * masks[j] / masks.sum(0) for j in range(k)) / k
    return saliency, k


def test_compat_equals_the_original_per_image_per_mask(scenes):
    model, images = scenes
    maps = analyses.explain(model, images, "vit_cx", compat=True, seed=7, batch_size=10)
    _, masks = vit_cx_masks(model, images)
    assert len({len(m) for m in masks}) > 1  # images with different K share the batched forwards
    for b, image in enumerate(images):
        expected, k = original_vit_cx(model, image, seed=7)
        assert k == len(masks[b])
        torch.testing.assert_close(maps[b], expected, atol=1e-7, rtol=1e-4)
    default = analyses.explain(model, images, "vit_cx", seed=7)
    torch.testing.assert_close(default, maps)  # no NaN here: the two modes agree


def test_deterministic_and_global_rng_untouched(scenes):
    model, images = scenes
    state = torch.get_rng_state()
    first = analyses.explain(model, images[:2], "vit_cx", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, analyses.explain(model, images[:2], "vit_cx", seed=3))
    assert not torch.allclose(first, analyses.explain(model, images[:2], "vit_cx", seed=4))
    # each image gets what it gets alone, whatever the batch and chunk size
    torch.testing.assert_close(first[1:], analyses.explain(model, images[1:2], "vit_cx", seed=3, batch_size=2),
                               atol=1e-7, rtol=1e-5)
    # a CPU torch.Generator as the seed: image 0 draws what seed=3 gives, image 1 the generator's continuation
    generator = torch.Generator().manual_seed(3)
    drawn = analyses.explain(model, images[:2], "vit_cx", seed=generator)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(drawn[0], first[0])
    assert not torch.allclose(drawn[1], first[1])
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())
    with pytest.raises(ValueError, match="seed must be an int or a CPU torch.Generator"):
        analyses.explain(model, images[:1], "vit_cx", seed=0.5)


def test_one_cluster_gives_no_nan_by_default(scenes):
    model, images = scenes
    _, masks = vit_cx_masks(model, images[:1], distance_threshold=1.01)  # 1 - cos lies in [0, 1]: all merge
    assert len(masks[0]) == 1
    default = analyses.explain(model, images[:1], "vit_cx", distance_threshold=1.01)
    compat = analyses.explain(model, images[:1], "vit_cx", distance_threshold=1.01, compat=True)
    assert not default.isnan().any()
    assert compat.isnan().sum() >= 1  # the pixel where the only mask is 0, as in the original
    finite = ~compat.isnan()
    torch.testing.assert_close(default[finite], compat[finite])
    assert (default[~finite] == 0).all()


def test_without_noise_the_cluster_order_does_not_matter(scenes):
    model, images = scenes
    logits, masks = vit_cx_masks(model, images)
    target = logits.argmax(-1)
    clean = logits.softmax(-1).gather(1, target[:, None])[:, 0]
    permuted = [m.flip(0) for m in masks]
    quiet = causal_scores(model, images, target, clean, masks, noise=0.0)
    torch.testing.assert_close(quiet, causal_scores(model, images, target, clean, permuted, noise=0.0),
                               atol=1e-7, rtol=1e-5)
    noisy = causal_scores(model, images, target, clean, masks)  # noise slice k belongs to cluster k
    assert not torch.allclose(noisy, causal_scores(model, images, target, clean, permuted), atol=1e-7, rtol=1e-5)


def test_target_and_layer(scenes):
    model, images = scenes
    logits = model(images)
    predicted = logits.argmax(-1)
    torch.testing.assert_close(analyses.explain(model, images[:1], "vit_cx", int(predicted[0])),
                               analyses.explain(model, images[:1], "vit_cx"))
    torch.testing.assert_close(analyses.explain(model, images[:1], "vit_cx", layer=3),
                               analyses.explain(model, images[:1], "vit_cx", layer="blocks.3.ln1.hook_normalized"))
    with pytest.raises(ValueError, match="layer must be a block index"):
        analyses.explain(model, images[:1], "vit_cx", layer=9)
