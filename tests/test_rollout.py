"""Attention rollout, gradient rollout and Chefer relevance against plain per-image restatements.

The references below are written from the algorithm descriptions (specs/rollout_and_vit_cx.md §1.3, §1.4,
§6), one image at a time with Python loops, and read the attention with TransformerLens' cache and the
gradients with ``retain_grad`` + ``backward`` (the code under test uses hooks and ``autograd.grad``).
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import analyses
from analyses.rollout import chefer_relevance, gradient_rollout, rollout
from helpers.tiny import tiny_model
from vitlens import HookedViT, load_model
from vitlens.data import load_dataset

FUSIONS = ("mean", "max", "min")


def sharpen(model: HookedViT, qk: float = 4.0, head: float = 300.0) -> HookedViT:
    """Scale q and k (non-uniform attention, no topk ties) and the head (A*G not negligible), as in spec §4."""
    with torch.no_grad():
        for block in model.vit.blocks:
            d = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * d] *= qk
        model.vit.head.weight *= head
    return model


@pytest.fixture(scope="module")
def scenes():
    model = load_model("tiny-scenes")
    data = load_dataset("scenes", model=model)
    images = torch.stack([data[i]["image"] for i in (0, 120, 260)])
    return model, images


@pytest.fixture(scope="module")
def sharp():
    model = sharpen(tiny_model(seed=3))
    return model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def patterns(model, image):
    """[layer head N N] of one image [C H W], from the cache."""
    _, cache = model.run_with_cache(image[None], names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache["pattern", layer][0] for layer in range(model.cfg.n_layers)]


def gradients(model, image, target, hook="hook_pattern"):
    """(patterns, d logit_target / d hook) per layer for one image, via retain_grad and backward."""
    kept = []

    def keep(activation, hook):
        activation.retain_grad()
        kept.append(activation)

    with torch.enable_grad():
        leaf = image[None].clone().requires_grad_(True)
        logits = model.run_with_hooks(leaf, fwd_hooks=[(lambda n: n.endswith(hook), keep)])
        logits[0, target].backward()
    atts = patterns(model, image)
    return atts, [k.grad[0] for k in kept]


def fuse(a, fusion):
    return {"mean": lambda: a.mean(0), "max": lambda: a.max(0).values, "min": lambda: a.min(0).values}[fusion]()


def discard_plain(f, ratio, protected_column=None):
    """Zero the int(N*N*ratio) smallest entries, never one in `protected_column` (sorted by value)."""
    n = f.shape[0]
    f = f.clone()
    entries = sorted((f[i, j].item(), i, j) for i in range(n) for j in range(n) if j != protected_column)
    for _, i, j in entries[: min(int(n * n * ratio), len(entries))]:
        f[i, j] = 0
    return f


def corrected_reference(fused_layers, ratio, protect, n_prefix, grid):
    n = fused_layers[0].shape[0]
    r = torch.eye(n)
    for f in fused_layers:
        a = (discard_plain(f, ratio, 0 if protect else None) + torch.eye(n)) / 2
        a = a / a.sum(1, keepdim=True)  # each row by its own sum
        r = a @ r
    return r[0, n_prefix:].reshape(grid)


def original_reference(fused_layers, ratio, spare_origin):
    """vit-explain, §1.3 / §1.4 step by step on [1 N N] tensors."""
    r = torch.eye(fused_layers[0].shape[0])
    for f in fused_layers:
        f = f[None].clone()
        flat = f.view(1, -1)
        _, idx = flat.topk(int(flat.size(-1) * ratio), -1, False)
        if spare_origin:
            idx = idx[idx != 0]
        flat[0, idx] = 0
        a = (f + torch.eye(f.size(-1))) / 2
        a = a / a.sum(dim=-1)  # no keepdim: column j divided by the sum of row j
        r = torch.matmul(a, r)
    mask = r[0, 0, 1:]
    w = int(mask.size(-1) ** 0.5)
    mask = mask.reshape(w, w)
    return mask / mask.max()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_batched_rollout_equals_plain_reference(scenes, fusion):
    model, images = scenes
    # timm's fused attention (scaled_dot_product_attention, no attn_drop call) is on: the patterns still arrive
    assert all(block.attn.fused_attn for block in model.vit.blocks)
    for ratio, protect in [(0.0, True), (0.5, True), (0.9, False)]:
        maps = analyses.explain(model, images, "rollout", head_fusion=fusion, discard_ratio=ratio, protect_cls=protect)
        for b, image in enumerate(images):
            fused = [fuse(a, fusion) for a in patterns(model, image)]
            expected = corrected_reference(fused, ratio, protect, 1, (6, 6))
            torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-5)


def test_rollout_mean_without_discard_is_the_product_of_half_identity_averages(scenes):
    model, images = scenes
    maps = analyses.explain(model, images, "rollout", head_fusion="mean", discard_ratio=0.0)
    compat = analyses.explain(model, images, "rollout", head_fusion="mean", discard_ratio=0.0, compat=True)
    for b, image in enumerate(images):
        product = torch.eye(37, dtype=torch.float64)
        for a in patterns(model, image):
            half = (a.double().mean(0) + torch.eye(37, dtype=torch.float64)) / 2
            product = (half / half.sum(1, keepdim=True)) @ product
        expected = product[0, 1:].reshape(6, 6).float()
        torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-5)
        # rows of softmax sum to 1: the original's normalisation bug is harmless here, only the max division remains
        torch.testing.assert_close(compat[b], expected / expected.max(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_rollout_compat_equals_the_original(scenes, fusion):
    model, images = scenes
    for ratio in (0.0, 0.5, 0.9):
        maps = analyses.explain(model, images, "rollout", compat=True, head_fusion=fusion, discard_ratio=ratio)
        for b, image in enumerate(images):
            expected = original_reference([fuse(a, fusion) for a in patterns(model, image)], ratio, spare_origin=True)
            torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-5)
        assert torch.allclose(maps.amax((1, 2)), torch.ones(3))


def test_rollout_corrected_normalisation_differs_from_the_original(scenes):
    model, images = scenes
    fixed = analyses.explain(model, images, "rollout", head_fusion="max", discard_ratio=0.0)
    original = analyses.explain(model, images, "rollout", head_fusion="max", discard_ratio=0.0, compat=True)
    fixed = fixed / fixed.amax((1, 2), keepdim=True)
    assert (fixed - original).abs().max() > 1e-3  # spec §4: up to 0.09 for max fusion without discard


@pytest.mark.parametrize("wrt, clamp, fusion, protect", [("probs", "after", "mean", True),
                                                          ("scores", "before", "mean", True),
                                                          ("probs", "before", "max", False)])
def test_batched_gradient_rollout_equals_plain_reference(sharp, wrt, clamp, fusion, protect):
    model, images = sharp
    target = torch.tensor([1, 4, 7])
    maps = analyses.explain(model, images, "grad_rollout", target, wrt=wrt, clamp=clamp, discard_ratio=0.5,
                            head_fusion=fusion, protect_cls=protect)
    for b, image in enumerate(images):
        atts, grads = gradients(model, image, int(target[b]), "hook_pattern" if wrt == "probs" else "hook_attn_scores")
        fused = []
        for a, g in zip(atts, grads):  # forward order
            w = a * g
            fused.append(fuse(w.clamp(min=0), fusion) if clamp == "before" else fuse(w, fusion).clamp(min=0))
        expected = corrected_reference(fused, 0.5, protect, 1, (4, 4))
        torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-4)


def test_gradient_rollout_compat_equals_the_original(sharp):
    model, images = sharp
    target = torch.tensor([2, 2, 9])
    for ratio in (0.0, 0.9):
        maps = analyses.explain(model, images, "grad_rollout", target, compat=True, discard_ratio=ratio)
        for b, image in enumerate(images):
            atts, grads = gradients(model, image, int(target[b]), "hook_attn_scores")
            grads = grads[::-1]  # the backward hooks fired from the last layer to the first
            fused = []
            for a, g in zip(atts, grads):
                w = (a * g).mean(0)
                w[w < 0] = 0
                fused.append(w)
            expected = original_reference(fused, ratio, spare_origin=False)
            torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-4)


def test_gradient_rollout_target_none_is_the_predicted_class(sharp):
    model, images = sharp
    predicted = model(images).argmax(-1)
    torch.testing.assert_close(analyses.explain(model, images, "grad_rollout"),
                               analyses.explain(model, images, "grad_rollout", predicted))
    other = analyses.explain(model, images, "grad_rollout", (predicted + 1) % 10)
    assert not torch.allclose(other, analyses.explain(model, images, "grad_rollout", predicted))


def test_pure_functions_accept_captured_tensors(sharp):
    model, images = sharp
    atts = [torch.stack(x) for x in zip(*[patterns(model, image) for image in images])]
    rolled = rollout(atts, head_fusion="mean", discard_ratio=0.0)
    assert torch.allclose(rolled.sum(-1), torch.ones(3, 17))  # row-stochastic
    identity = [torch.zeros_like(a) for a in atts]
    assert torch.equal(chefer_relevance(atts, identity), torch.eye(17).expand(3, 17, 17))
    ones = [torch.ones_like(a) for a in atts]
    torch.testing.assert_close(gradient_rollout(atts, ones, discard_ratio=0.0), rolled)


def one_layer_model() -> HookedViT:
    """1 block, no final norm, the MLP's output zeroed: logit_c = W_U[:, c] . resid_mid[cls] + b_c."""
    torch.manual_seed(5)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1, num_heads=4,
                            mlp_ratio=2, final_norm=False)
    with torch.no_grad():
        vit.blocks[0].mlp.fc2.weight.zero_()
        vit.blocks[0].mlp.fc2.bias.zero_()
        vit.blocks[0].attn.qkv.weight[:64] *= 3
    return HookedViT.from_timm(vit)


def test_chefer_one_layer_closed_form():
    model = one_layer_model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([3, 8])
    maps = analyses.explain(model, images, "chefer", target)
    _, cache = model.run_with_cache(images)
    w_o = model.blocks[0].attn.W_O  # [head d_head d_model]
    for b in range(2):
        a = cache["pattern", 0][b]  # [head q k]
        v = cache["v", 0][b]  # [pos head d_head]
        # d logit / d A[h, 0, j] = v_j^h W_O^h W_U[:, c]; rows other than CLS do not reach the logit
        grad = torch.einsum("jhd,hdm,m->hj", v, w_o, model.W_U[:, target[b]])
        expected = (a[:, 0, :] * grad).clamp(min=0).mean(0)[1:].reshape(4, 4)
        torch.testing.assert_close(maps[b], expected, atol=1e-6, rtol=1e-4)


def test_chefer_start_layer_skips_early_layers(sharp):
    model, images = sharp
    target = torch.tensor([0, 1, 2])
    full = analyses.explain(model, images, "chefer", target)
    last = analyses.explain(model, images, "chefer", target, start_layer=1)
    for b, image in enumerate(images):
        atts, grads = gradients(model, image, int(target[b]))
        relevance = torch.eye(17)
        for a, g in zip(atts[1:], grads[1:]):
            relevance = relevance + (g * a).clamp(min=0).mean(0) @ relevance
        torch.testing.assert_close(last[b], relevance[0, 1:].reshape(4, 4), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(full, last)


def layouts():
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  embed_dim=32, depth=2, num_heads=2, num_classes=10)
    dynamic = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                                dynamic_img_size=True)
    return [("distilled", HookedViT.from_timm(distilled), (32, 32), 2, (4, 4)),
            ("registers", tiny_model(reg_tokens=3), (32, 32), 4, (4, 4)),
            ("non-square", HookedViT.from_timm(dynamic), (32, 48), 1, (4, 6))]


@pytest.mark.parametrize("name, model, size, n_prefix, grid", layouts(), ids=lambda x: x if isinstance(x, str) else "")
def test_prefix_tokens_and_non_square_grids(name, model, size, n_prefix, grid):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    maps = analyses.explain(model, images, "rollout", discard_ratio=0.5, head_fusion="max")
    assert maps.shape == (2, *grid)
    for b, image in enumerate(images):
        fused = [fuse(a, "max") for a in patterns(model, image)]
        torch.testing.assert_close(maps[b], corrected_reference(fused, 0.5, True, n_prefix, grid), atol=1e-6, rtol=1e-5)
    for method in ("grad_rollout", "chefer"):
        assert analyses.explain(model, images, method).shape == (2, *grid)
    vit_cx = analyses.explain(model, images, "vit_cx", distance_threshold=0.3)
    assert vit_cx.shape == (2, *size) and not vit_cx.isnan().any()


def test_bad_input():
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    gap = HookedViT.from_timm(VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2,
                                                num_heads=2, class_token=False, global_pool="avg"))
    for method in ("rollout", "grad_rollout", "chefer"):
        with pytest.raises(ValueError, match="no class token"):
            analyses.explain(gap, images, method)
    for method in ("rollout", "grad_rollout", "chefer", "vit_cx"):
        with pytest.raises(ValueError, match="Expected 32x32 images, got 48x48. Resize with `model.transform`"):
            analyses.explain(model, torch.randn(2, 3, 48, 48), method)
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        analyses.explain(model, images, "rollout", head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        analyses.explain(model, images, "rollout", discard_ratio=1.0)
    with pytest.raises(ValueError, match="compat=True reproduces vit-explain"):
        analyses.explain(model, images, "grad_rollout", compat=True, wrt="probs")
    with pytest.raises(ValueError, match="wrt must be one of"):
        analyses.explain(model, images, "grad_rollout", wrt="logits")
