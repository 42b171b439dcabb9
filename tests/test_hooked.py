"""HookedViT against the timm model it wraps, on tiny random configs of every supported family."""
import pytest
import torch.nn.functional as F
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from vitlens import HookedViT, UnknownHookError, UnsupportedModelError

BASE = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
FAMILIES = {
    "cls": dict(),
    "avg_fc_norm": dict(global_pool="avg"),
    "no_cls": dict(class_token=False, global_pool="avg"),
    "distilled": dict(distilled=True),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "layerscale": dict(init_values=0.5),
    "qk_norm": dict(qk_norm=True),
    "pre_norm": dict(pre_norm=True),
    "dynamic_size": dict(dynamic_img_size=True),
    "res_post": dict(block_fn=ResPostBlock, class_token=False, global_pool="avg", qkv_bias=False),
}


def build(family: str, seed: int = 0) -> VisionTransformer:
    """A random timm model whose norms have non-trivial gains and biases (so folding is really tested)."""
    torch.manual_seed(seed)
    kwargs = {**BASE, **FAMILIES[family]}
    cls = VisionTransformerDistilled if kwargs.pop("distilled", False) else VisionTransformer
    vit = cls(**kwargs).eval()
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        for name, p in vit.named_parameters():
            if name.endswith("bias") and p.abs().sum() == 0 or "token" in name:
                p.normal_(0.0, 0.2)
    return vit


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    vit = build(request.param)
    return request.param, vit, HookedViT.from_timm(vit)


def images(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_timm_bit_for_bit(family):
    name, vit, model = family
    x = images()
    assert torch.equal(model(x), vit(x)), name
    # With hooks attached, HookedViT replays timm's forward module by module: still the same bits.
    observe = [(lambda n: "attn.hook_" not in n, lambda t, hook: None)]
    assert torch.equal(model.run_with_hooks(x, fwd_hooks=observe), vit(x)), name


@torch.no_grad()
def test_dynamic_size_other_resolution_equal_timm():
    vit = build("dynamic_size")
    model = HookedViT.from_timm(vit)
    x = torch.randn(2, 3, 48, 40)
    assert torch.equal(model(x), vit(x))
    _, cache = model.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    layout = model.layout_for(x)
    assert layout.grid == (6, 5)
    assert cache["blocks.0.hook_resid_post"].shape[1] == layout.n_tokens


@torch.no_grad()
def test_resid_post_equals_forward_intermediates(family):
    name, vit, model = family
    x = images()
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    inter = vit.forward_intermediates(x, indices=len(vit.blocks), norm=False, output_fmt="NLC", intermediates_only=True)
    for layer, expected in enumerate(inter):
        got = cache["resid_post", layer][:, model.layout.n_prefix:]
        assert torch.equal(got, expected), (name, layer)


@torch.no_grad()
def test_residual_stream_identities(family):
    name, _, model = family
    _, cache = model.run_with_cache(images())
    for layer in range(model.cfg.n_layers):
        assert torch.equal(cache["resid_pre", layer] + cache["attn_out", layer], cache["resid_mid", layer])
        assert torch.equal(cache["resid_mid", layer] + cache["mlp_out", layer], cache["resid_post", layer])
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_full_embed"])


@torch.no_grad()
def test_pattern_rows_sum_to_one_and_logits_match_fused(family):
    name, vit, model = family
    x = images()
    logits, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]
        assert pattern.shape == (3, model.cfg.n_heads, model.cfg.n_ctx, model.cfg.n_ctx)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, vit(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_pattern_matches_recomputation_from_q_k():
    model = HookedViT.from_timm(build("qk_norm"))
    _, cache = model.run_with_cache(images())
    q, k = cache["q", 1], cache["k", 1]  # [batch pos head d_head], after qk-norm
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / model.cfg.d_head ** 0.5
    torch.testing.assert_close(cache["pattern", 1], scores.softmax(-1), atol=1e-6, rtol=0)


@torch.no_grad()
def test_fused_attention_stays_on_where_no_pattern_hook(monkeypatch):
    model = HookedViT.from_timm(build("cls"))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model.run_with_cache(images(), names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1  # block 0 fused, block 1 eager
    calls.clear()
    model.run_with_cache(images(), names_filter=["blocks.0.attn.hook_z", "blocks.1.attn.hook_q"])
    assert len(calls) == 2  # q/k/v/z hooks keep the fused kernel


@torch.no_grad()
def test_patching_resid_from_other_image_gives_its_logits(family):
    name, _, model = family
    a, b = images(seed=1), images(seed=2)
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_resid_post"
        logits_b, cache_b = model.run_with_cache(b, names_filter=hook)
        patched = model.run_with_hooks(a, fwd_hooks=[(hook, lambda t, hook: cache_b[hook.name])])
        assert torch.equal(patched, logits_b), (name, layer)
        assert not torch.equal(patched, model(a))


@torch.no_grad()
def test_zero_ablating_a_head_changes_logits_and_only_that_head():
    model = HookedViT.from_timm(build("cls"))
    x = images()

    def ablate(z, hook):
        z[:, :, 1] = 0
        return z

    _, clean = model.run_with_cache(x)
    ablated_logits = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
    assert not torch.allclose(ablated_logits, clean["hook_logits"])
    # The head's contribution through W_O is what disappears from attn_out.
    head1 = torch.einsum("bpd,dm->bpm", clean["z", 0][:, :, 1], model.blocks[0].attn.W_O[1])
    _, cache = model.run_with_cache(x, names_filter="blocks.0.hook_attn_out")
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]):
        _, ablated = model.run_with_cache(x, names_filter="blocks.0.hook_attn_out")
    torch.testing.assert_close(cache["attn_out", 0] - ablated["attn_out", 0], head1, atol=1e-5, rtol=0)


def test_hooks_removed_after_a_raising_call():
    model = HookedViT.from_timm(build("cls"))

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(images(), fwd_hooks=[("blocks.1.hook_mlp_out", boom), ("hook_logits", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(images(), fwd_hooks=[(lambda n: "pattern" in n, boom)])
    with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[("hook_embed", boom)]):
        model(images())
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(model(images()), model.vit(images()), atol=0, rtol=0)


def test_unknown_hook_name_lists_close_names():
    model = HookedViT.from_timm(build("cls"))
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_post"):
        model.run_with_hooks(images(), fwd_hooks=[("blocks.0.hook_resid_pots", lambda t, hook: t)])
    with pytest.raises(UnknownHookError, match=r"blocks\.1\.attn\.hook_pattern"):
        model.run_with_cache(images(), names_filter=["blocks.1.attn.hook_patern"])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_token_layout_of_each_family():
    expected = {  # cls, dist, registers, prefix
        "cls": (0, None, (), 1),
        "no_cls": (None, None, (), 0),
        "distilled": (0, 1, (), 2),
        "registers": (0, None, (1, 2, 3, 4), 5),
    }
    for family, (cls_index, dist_index, regs, n_prefix) in expected.items():
        layout = HookedViT.from_timm(build(family)).layout
        assert (layout.cls_index, layout.dist_index, layout.register_indices, layout.n_prefix) == \
            (cls_index, dist_index, regs, n_prefix)
        assert layout.grid == (4, 4) and layout.n_tokens == n_prefix + 16
        assert layout.tokens("patches").tolist() == list(range(n_prefix, n_prefix + 16))
    layout = HookedViT.from_timm(build("registers")).layout
    assert layout.tokens("registers").tolist() == [1, 2, 3, 4]
    assert layout.describe(0) == "cls" and layout.describe(2) == "reg1"
    assert layout.describe(5 + 6) == "patch(1,2)" and layout.patch_position(5 + 15) == (3, 3)
    with pytest.raises(ValueError, match="no class token"):
        HookedViT.from_timm(build("no_cls")).tokens("cls")


@torch.no_grad()
def test_registers_hold_their_own_tokens():
    """The register embeddings really sit at the register indices of hook_full_embed."""
    vit = build("registers")
    model = HookedViT.from_timm(vit)
    _, cache = model.run_with_cache(images(), names_filter="hook_full_embed")
    regs = cache["hook_full_embed"][:, model.tokens("registers")]
    torch.testing.assert_close(regs, vit.reg_token.expand(3, -1, -1), atol=0, rtol=0)  # no_embed_class: no pos


@torch.no_grad()
def test_logit_attrs_sum_to_logit_minus_documented_bias():
    """decompose_resid + logit_attrs is exact for CLS pooling: attrs sum to logit - logit_bias."""
    model = HookedViT.from_timm(build("layerscale"))
    x = images()
    logits, cache = model.run_with_cache(x)
    stack, labels = cache.decompose_resid(pos_slice=0, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(stack.sum(0), cache["resid_post", 1][:, 0], atol=1e-5, rtol=0)
    classes = logits.argmax(-1)
    attrs = cache.logit_attrs(stack, tokens=classes, pos_slice=0)
    expected = logits.gather(1, classes[:, None])[:, 0] - model.logit_bias(classes)
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=0)
    assert not torch.allclose(attrs.sum(0), logits.gather(1, classes[:, None])[:, 0], atol=1e-2)


@torch.no_grad()
def test_head_results_and_neurons_reassemble_outputs():
    """W_O / W_out (LayerScale folded in) rebuild attn_out and mlp_out; accumulated_bias feeds the full decomposition."""
    model = HookedViT.from_timm(build("layerscale"))
    _, cache = model.run_with_cache(images())
    heads = cache.stack_head_results(layer=-1)  # [layer*head batch pos d_model]
    per_layer = heads.reshape(model.cfg.n_layers, model.cfg.n_heads, *heads.shape[1:]).sum(1)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(per_layer[layer] + model.blocks[layer].attn.b_O, cache["attn_out", layer],
                                   atol=1e-5, rtol=0)
        mlp = cache["post", layer] @ model.blocks[layer].mlp.W_out + model.blocks[layer].mlp.b_out
        torch.testing.assert_close(mlp, cache["mlp_out", layer], atol=1e-5, rtol=0)
    full, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert labels[-2:] == ["embed", "bias"]
    torch.testing.assert_close(full.sum(0), cache["resid_post", 1], atol=1e-4, rtol=0)


@torch.no_grad()
def test_unembed_of_last_cls_is_the_logits_and_accumulated_resid_lens():
    model = HookedViT.from_timm(build("cls"))
    logits, cache = model.run_with_cache(images())
    torch.testing.assert_close(model.unembed(cache["resid_post", 1][:, 0]), logits, atol=1e-5, rtol=0)
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=0)  # final norm applied with its affine
    torch.testing.assert_close(model.vit.head(lens[-1]), logits, atol=1e-5, rtol=0)


def test_unsupported_families_are_named():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="Attention-pool"):
        HookedViT.from_timm(VisionTransformer(**{**BASE, "global_pool": "map"}))
    from timm.layers import SwiGLUPacked

    with pytest.raises(UnsupportedModelError, match="gated MLP"):
        HookedViT.from_timm(VisionTransformer(**BASE, mlp_layer=SwiGLUPacked))
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        HookedViT.from_timm(torch.nn.Linear(2, 2))


def test_wrong_image_size_and_channels_are_explained():
    model = HookedViT.from_timm(build("cls"))
    with pytest.raises(ValueError, match="Expected 32x32 images, got 48x48"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="grayscale"):
        model(torch.zeros(1, 1, 32, 32))


def test_weights_have_one_owner_and_hash_tracks_them():
    vit = build("cls")
    model = HookedViT.from_timm(vit)
    assert set(model.state_dict()) == {f"vit.{k}" for k in vit.state_dict()}
    h = model.weights_hash()
    assert h == HookedViT.from_timm(build("cls")).weights_hash()
    assert h != HookedViT.from_timm(build("cls", seed=1)).weights_hash()


def test_backward_hooks_give_pattern_gradients():
    """Gradient-based explanations (grad rollout, Chefer) read d logit / d pattern through bwd hooks."""
    model = HookedViT.from_timm(build("cls"))
    x = images()
    kept, grads = {}, {}

    def keep(pattern, hook):
        pattern.retain_grad()
        kept[hook.name] = pattern

    def save_grad(grad, hook):
        grads[hook.name] = grad

    names = [f"blocks.{l}.attn.hook_pattern" for l in range(2)]
    with model.hooks(fwd_hooks=[(n, keep) for n in names], bwd_hooks=[(n, save_grad) for n in names]):
        model(x)[:, 3].sum().backward()
    for name in names:
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], kept[name].grad, atol=0, rtol=0)
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_layout_for_rounds_up_with_dynamic_img_pad():
    torch.manual_seed(0)
    vit = VisionTransformer(**BASE, dynamic_img_size=True, dynamic_img_pad=True).eval()
    model = HookedViT.from_timm(vit)
    x = torch.randn(1, 3, 36, 30)  # padded to 40x32 by timm
    _, cache = model.run_with_cache(x, names_filter="hook_full_embed")
    layout = model.layout_for(x)
    assert layout.grid == (5, 4) and cache["hook_full_embed"].shape[1] == layout.n_tokens


@torch.no_grad()
def test_hook_scale_replacement_is_applied():
    model = HookedViT.from_timm(build("cls"))
    x, name = images(), "blocks.0.ln1.hook_normalized"
    bias = model.vit.blocks[0].norm1.bias
    _, clean = model.run_with_cache(x, names_filter=name)
    with model.hooks(fwd_hooks=[("blocks.0.ln1.hook_scale", lambda scale, hook: 2 * scale)]):
        _, doubled = model.run_with_cache(x, names_filter=name)
    torch.testing.assert_close(doubled[name], (clean[name] - bias) / 2 + bias, atol=1e-5, rtol=0)
    with model.hooks(fwd_hooks=[("blocks.0.ln1.hook_scale", lambda scale, hook: scale.clone())]):
        torch.testing.assert_close(model(x), model.vit(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_apply_ln_refused_where_there_is_no_per_token_layernorm():
    _, cache = HookedViT.from_timm(build("avg_fc_norm")).run_with_cache(images())
    with pytest.raises(ValueError, match="no per-token final LayerNorm.*fc_norm"):
        cache.accumulated_resid(apply_ln=True)
    with pytest.raises(ValueError, match="no per-token final LayerNorm"):
        cache.logit_attrs(cache.decompose_resid(), tokens=torch.zeros(3, dtype=torch.long))
    cache.decompose_resid(layer=1, apply_ln=True)  # block inputs of pre-norm blocks are per-token LayerNorms
    _, cache = HookedViT.from_timm(build("res_post")).run_with_cache(images())
    with pytest.raises(ValueError, match="post-norm"):
        cache.decompose_resid(layer=1, apply_ln=True)


def test_output_weights_refused_for_post_norm_blocks():
    model = HookedViT.from_timm(build("res_post"))
    for get in (lambda b: b.attn.W_O, lambda b: b.attn.b_O, lambda b: b.mlp.W_out, lambda b: b.mlp.b_out):
        with pytest.raises(ValueError, match="post-norm"):
            get(model.blocks[0])
    assert model.blocks[0].mlp.W_in.shape == (32, 64)  # input weights stay well defined


def test_module_name_in_names_filter_is_refused():
    model = HookedViT.from_timm(build("cls"))
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.attn\.hook_"):
        model.run_with_cache(images(), names_filter="blocks.0.attn")


def test_weights_hash_follows_in_place_changes():
    model = HookedViT.from_timm(build("cls"))
    h = model.weights_hash()
    with torch.no_grad():
        model.vit.head.bias.add_(1)
    assert model.weights_hash() != h
    model.vit.load_state_dict(build("cls").state_dict())
    assert model.weights_hash() == h
    model.vit.half()
    assert model.weights_hash() != h


def test_zero_bias_placeholders_keep_the_weight_dtype():
    torch.manual_seed(0)
    vit = VisionTransformer(**BASE, proj_bias=False).to(torch.bfloat16)
    vit.head.register_parameter("bias", None)
    model = HookedViT.from_timm(vit)
    assert model.blocks[0].attn.b_O.dtype == model.b_U.dtype == model.accumulated_bias(1).dtype == torch.bfloat16


@torch.no_grad()
def test_hooking_only_attention_scores_turns_fused_attention_off():
    model = HookedViT.from_timm(build("cls"))
    seen = {}
    _, cache = model.run_with_cache(images(), names_filter=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"])
    model.run_with_hooks(images(), fwd_hooks=[("blocks.1.attn.hook_attn_scores",
                                               lambda t, hook: seen.setdefault("scores", t.clone()))])
    expected = torch.einsum("bqhd,bkhd->bhqk", cache["q", 1], cache["k", 1]) / model.cfg.d_head ** 0.5
    torch.testing.assert_close(seen["scores"], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_unembed_uses_fc_norm_on_average_pool_models():
    model = HookedViT.from_timm(build("avg_fc_norm"))
    logits, cache = model.run_with_cache(images())
    fc_norm, head = model.vit.fc_norm, model.vit.head
    pooled = cache["resid_post", 1][:, model.layout.n_prefix:].mean(1)  # avg pool of the patch tokens
    torch.testing.assert_close(model.unembed(pooled), logits, atol=1e-5, rtol=0)
    token = cache["resid_post", 1][:, 3]
    by_hand = F.layer_norm(token, (32,), fc_norm.weight, fc_norm.bias, fc_norm.eps) @ head.weight.T + head.bias
    torch.testing.assert_close(model.unembed(token), by_hand, atol=1e-5, rtol=0)


@torch.no_grad()
def test_class_rank_reducer_uses_fc_norm_on_average_pool_models():
    """The reducer's ranks against a projection written out by hand (F.layer_norm with fc_norm, then the head)."""
    from analyses.class_embedding import ClassRankReducer

    model = HookedViT.from_timm(build("avg_fc_norm"))
    _, cache = model.run_with_cache(images())
    resid, labels = cache["resid_post", 0], torch.tensor([0, 4, 9])
    fc_norm, head = model.vit.fc_norm, model.vit.head
    logits = F.layer_norm(resid, (32,), fc_norm.weight, fc_norm.bias, fc_norm.eps) @ head.weight.T + head.bias
    expected = (logits > logits[torch.arange(3), :, labels][..., None]).sum(-1)  # [batch pos]
    ranks = ClassRankReducer(precision="float32").reduce(model, resid, labels)
    assert torch.equal(ranks.long(), expected)
    raw = resid @ head.weight.T + head.bias  # what a final_norm that skipped fc_norm would rank
    assert not torch.equal((raw > raw[torch.arange(3), :, labels][..., None]).sum(-1), expected)


@torch.no_grad()
def test_dynamic_size_replay_with_hooks_at_a_non_square_size():
    vit = build("dynamic_size")
    model = HookedViT.from_timm(vit)
    x = torch.randn(2, 3, 48, 24)  # a 6x3 grid
    observe = [(lambda n: "attn.hook_" not in n, lambda t, hook: None)]
    assert torch.equal(model.run_with_hooks(x, fwd_hooks=observe), vit(x))
    _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
    inter = vit.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    assert torch.equal(cache["resid_post", 1][:, 1:], inter)
    layout = model.layout_for(x)
    assert layout.grid == (6, 3) and layout.patch_position(1 + 5) == (1, 2) and layout.describe(1 + 17) == "patch(5,2)"
    with pytest.raises(ValueError, match="not a patch token"):
        layout.patch_position(1 + 18)


def test_accumulated_bias_with_mlp_input_includes_that_layers_attention_bias():
    model = HookedViT.from_timm(build("layerscale"))
    b = [(blk.attn.b_O, blk.mlp.b_out) for blk in model.blocks]
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True), b[0][0] + b[0][1] + b[1][0], atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(model.accumulated_bias(1, include_mlp_biases=False), b[0][0], atol=0, rtol=0)


def test_backward_hook_gradient_has_the_right_value():
    """d logit / d pattern from the bwd hook equals the gradient computed by hand from v and W_O."""
    model = HookedViT.from_timm(build("cls"))
    x = images()
    grads = {}
    name = "blocks.1.attn.hook_pattern"
    with model.hooks(bwd_hooks=[(name, lambda grad, hook: grads.setdefault("pattern", grad.clone()))]):
        _, cache = model.run_with_cache(x, names_filter=["blocks.1.attn.hook_v", "blocks.1.hook_resid_pre"])
        model(x)[:, 3].sum().backward()
    # Block 1 is the last: logit = head(norm(resid_post[:, 0])), and resid_post depends on the pattern through
    # attn_out = sum_k pattern[q, k] v[k] @ W_O plus the MLP, which reads resid_mid. Differentiate that by hand.
    pattern = model.run_with_cache(x, names_filter=name)[1][name].clone().requires_grad_(True)
    vit, blk = model.vit, model.vit.blocks[1]
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache["v", 1])
    attn_out = torch.einsum("bqhd,hdm->bqm", z, model.blocks[1].attn.W_O) + model.blocks[1].attn.b_O
    resid_mid = cache["resid_pre", 1] + attn_out
    resid_post = resid_mid + blk.mlp(blk.norm2(resid_mid))
    vit.head(vit.norm(resid_post[:, 0]))[:, 3].sum().backward()
    torch.testing.assert_close(grads["pattern"], pattern.grad, atol=1e-5, rtol=0)
    assert pattern.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny-scenes", "tiny-scenes-gap", "distilled"])
@torch.no_grad()
def test_forward_head_equals_timm_forward_head_on_the_cached_residual(name):
    """forward_head(ln_final(resid)) against timm's vit.forward_head(vit.norm(resid)) and against pooling written
    out by hand (CLS token, or fc_norm of the patch mean), with hook_pooled and hook_logits firing on the way."""
    if name == "distilled":
        vit = build("distilled")
        model, x = HookedViT.from_timm(vit), images()
    else:
        from vitlens import load_model

        model = load_model(name)
        vit, x = model.vit, torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(x, names_filter=[last])
    resid = cache[last]  # [batch pos d_model]
    seen = {}
    keep = lambda t, hook: seen.setdefault(hook.name, t.clone())  # noqa: E731
    with model.hooks(fwd_hooks=[("hook_pooled", keep), ("hook_logits", keep)]):
        out = model.forward_head(model.ln_final(resid))
    torch.testing.assert_close(out, vit.forward_head(vit.norm(resid)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, logits, atol=1e-6, rtol=0)
    assert torch.equal(seen["hook_logits"], out)
    if name == "tiny-scenes":  # CLS pooling: the normed CLS token
        pooled = F.layer_norm(resid[:, 0], (64,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    elif name == "tiny-scenes-gap":  # norm is Identity; fc_norm of the mean of the 36 patch tokens
        assert isinstance(vit.norm, torch.nn.Identity)
        pooled = F.layer_norm(resid[:, 1:].mean(1), (64,), vit.fc_norm.weight, vit.fc_norm.bias, vit.fc_norm.eps)
    else:  # DeiT-distilled: CLS and distillation token, each through its own head, logits averaged
        pooled = F.layer_norm(resid[:, :2], (32,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
        by_hand = (pooled[:, 0] @ vit.head.weight.T + vit.head.bias
                   + pooled[:, 1] @ vit.head_dist.weight.T + vit.head_dist.bias) / 2
        torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["hook_pooled"], pooled, atol=1e-5, rtol=0)
    if name != "distilled":
        torch.testing.assert_close(out, pooled @ vit.head.weight.T + vit.head.bias, atol=1e-5, rtol=0)
    # A hook that replaces the logits replaces what forward_head returns (and so what forward returns).
    with model.hooks(fwd_hooks=[("hook_logits", lambda t, hook: torch.zeros_like(t))]):
        assert not model.forward_head(model.ln_final(resid)).any() and not model(x).any()
