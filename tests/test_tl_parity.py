"""TransformerLens parity: weight geometry, the switch-gated hooks, exact cache helpers, TL's patching module."""
import pytest
import torch
import torch.nn.functional as F
import transformer_lens.patching as tl_patching
from test_hooked import BASE, build, images
from timm.models.vision_transformer import VisionTransformer
from transformer_lens import FactoredMatrix

from vitlens import HookedViT
from vitlens.patching import act_patch, patch_index

FAMILIES = ["cls", "avg_fc_norm", "no_cls", "distilled", "registers", "layerscale", "qk_norm", "pre_norm",
            "dynamic_size"]  # every family with linear head outputs (res_post: see test_post_norm_geometry_refused)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    model = HookedViT.from_timm(build(request.param))
    with torch.no_grad():
        logits, cache = model.run_with_cache(images())
    return request.param, model, logits, cache


def _ln(x, norm):
    """LayerNorm by hand."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight + norm.bias


@torch.no_grad()
def test_qkv_and_outputs_from_weights(run):
    name, model, _, cache = run
    for layer, block in enumerate(model.blocks):
        attn, x = block.attn, cache["normalized", layer, "ln1"]
        q = torch.einsum("bpm,hmd->bphd", x, attn.W_Q) + attn.b_Q
        k = torch.einsum("bpm,hmd->bphd", x, attn.W_K) + attn.b_K
        v = torch.einsum("bpm,hmd->bphd", x, attn.W_V) + attn.b_V
        q, k = attn.target.q_norm(q), attn.target.k_norm(k)  # identity except on qk-norm models
        for got, hooked in [(q, "q"), (k, "k"), (v, "v")]:
            torch.testing.assert_close(got, cache[hooked, layer], atol=1e-5, rtol=0)
        out = torch.einsum("bphd,hdm->bpm", cache["z", layer], attn.W_O) + attn.b_O
        torch.testing.assert_close(out, cache["attn_out", layer], atol=1e-5, rtol=0)
        mlp = cache["post", layer] @ block.mlp.W_out + block.mlp.b_out
        torch.testing.assert_close(mlp, cache["mlp_out", layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(_ln(cache["resid_pre", layer], block.ln1.target), x, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hook_result_ov_and_qk_reproduce_the_forward(run):
    name, model, logits, cache = run
    model.set_use_attn_result(True)
    try:
        patched_logits, with_result = model.run_with_cache(images())
    finally:
        model.set_use_attn_result(False)
    torch.testing.assert_close(patched_logits, logits, atol=1e-5, rtol=0)
    for layer, block in enumerate(model.blocks):
        attn, x = block.attn, cache["normalized", layer, "ln1"]
        result = with_result["result", layer]  # [batch pos head d_model]
        torch.testing.assert_close(result.sum(2) + attn.b_O, cache["attn_out", layer], atol=1e-5, rtol=0)
        # OV: each head's result is the pattern-weighted OV image of the inputs, plus its value bias through W_O.
        pattern = with_result["pattern", layer]
        ov = torch.einsum("bkm,hmn->bhkn", x, attn.OV.AB) + (attn.b_V[:, None] @ attn.W_O)
        torch.testing.assert_close(torch.einsum("bhqk,bhkn->bqhn", pattern, ov), result, atol=1e-5, rtol=0)
        if name == "qk_norm":
            with pytest.raises(ValueError, match="qk_norm"):
                attn.QK
            continue
        qk = attn.QK
        assert isinstance(qk, FactoredMatrix) and qk.AB.shape == (2, 32, 32)
        q_bias = torch.einsum("hd,bkm,hmd->bhk", attn.b_Q, x, attn.W_K)[:, :, None, :]  # b_Q . key, per key
        k_bias = torch.einsum("bqm,hmd,hd->bhq", x, attn.W_Q, attn.b_K)[:, :, :, None]  # query . b_K, per query
        scores = (torch.einsum("bqm,hmn,bkn->bhqk", x, qk.AB, x) + q_bias + k_bias
                  + (attn.b_Q * attn.b_K).sum(-1)[:, None, None])
        torch.testing.assert_close(scores / model.cfg.d_head ** 0.5, with_result["attn_scores", layer],
                                   atol=1e-4, rtol=0)


@torch.no_grad()
def test_split_qkv_inputs_give_the_same_forward(run):
    name, model, logits, cache = run
    for switch in ("set_use_split_qkv_input", "set_use_attn_in"):
        getattr(model, switch)(True)
        try:
            split_logits, split = model.run_with_cache(images())
        finally:
            getattr(model, switch)(False)
        torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=0)
        for layer in range(model.cfg.n_layers):
            for act in ("q", "k", "v"):
                torch.testing.assert_close(split[act, layer], cache[act, layer], atol=1e-5, rtol=0)
            fork = split["q_input" if switch == "set_use_split_qkv_input" else "attn_in", layer]
            assert fork.shape[2] == model.cfg.n_heads
            torch.testing.assert_close(fork, cache["resid_pre", layer][:, :, None].expand_as(fork), atol=1e-5, rtol=0)


@torch.no_grad()
def test_full_decomposition_sums_to_the_residual(run):
    name, model, _, cache = run
    for layer in (1, None):
        full, labels = cache.get_full_resid_decomposition(layer=layer, return_labels=True)
        target = cache["resid_pre", layer] if layer is not None else cache["resid_post", -1]
        assert labels[-2:] == ["embed", "bias"] and len(labels) == len(full)
        torch.testing.assert_close(full.sum(0), target, atol=1e-4, rtol=0)
    mid = cache.get_full_resid_decomposition(layer=0, mlp_input=True, expand_neurons=False)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 0], atol=1e-4, rtol=0)
    # apply_ln with a projection (TransformerLens' folded neuron path): ln1 by hand, then the projection.
    project = torch.randn(32, 5, generator=torch.Generator().manual_seed(2))
    projected = cache.get_full_resid_decomposition(layer=1, apply_ln=True, project_output_onto=project)
    resid = cache["resid_pre", 1]
    by_hand = (resid - resid.mean(-1, keepdim=True)) / cache["scale", 1, "ln1"] @ project
    torch.testing.assert_close(projected.sum(0), by_hand, atol=1e-4, rtol=0)


@torch.no_grad()
def test_apply_ln_at_block_inputs_is_layernorm_by_hand(run):
    name, model, _, cache = run
    stack = cache.decompose_resid(layer=1)
    scale = cache["scale", 1, "ln1"]
    normed = cache.apply_ln_to_stack(stack, layer=1)
    expected = (stack - stack.mean(-1, keepdim=True)) / scale
    torch.testing.assert_close(normed, expected, atol=1e-6, rtol=0)
    # With the affine applied, the components sum to ln1.hook_normalized.
    ln1 = model.vit.blocks[1].norm1
    torch.testing.assert_close(normed.sum(0) * ln1.weight + ln1.bias, cache["normalized", 1, "ln1"], atol=1e-5, rtol=0)
    assert model.cfg.normalization_type == "LN"
    if name in ("avg_fc_norm", "no_cls"):
        with pytest.raises(ValueError, match="fc_norm"):
            cache.accumulated_resid(apply_ln=True)


@torch.no_grad()
def test_logit_attrs_sum_to_logit_minus_bias_on_every_head_layout(run):
    name, model, logits, cache = run
    classes = logits.argmax(-1)
    expected = logits.gather(1, classes[:, None])[:, 0] - model.logit_bias(classes)
    if name in ("avg_fc_norm", "no_cls"):
        with pytest.raises(ValueError, match="no per-token final LayerNorm"):
            cache.logit_attrs(cache.decompose_resid(), classes)
        return
    if name == "distilled":  # the logit is the mean of head(CLS) and head_dist(dist): both are attributed
        stack = cache.get_full_resid_decomposition(expand_neurons=False)
        attrs = cache.logit_attrs(stack, classes)
        with pytest.raises(ValueError, match="two tokens"):
            cache.logit_attrs(stack[:, :, 0], classes, pos_slice=0)
        with pytest.raises(ValueError, match="head_dist"):
            model.tokens_to_residual_directions(classes)
        vit = model.vit
        resid = cache["resid_post", -1]
        by_hand = (vit.head(_ln(resid[:, 0], vit.norm)) + vit.head_dist(_ln(resid[:, 1], vit.norm))) / 2
        torch.testing.assert_close(by_hand, logits, atol=1e-5, rtol=0)
        bias = (vit.head.bias + vit.head_dist.bias + (vit.head.weight + vit.head_dist.weight) @ vit.norm.bias) / 2
        torch.testing.assert_close(model.logit_bias(classes), bias[classes], atol=1e-6, rtol=0)
    else:
        attrs = cache.logit_attrs(cache.get_full_resid_decomposition(pos_slice=0), classes, pos_slice=0)
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sliced_cache_keeps_the_vit_helpers(run):
    name, model, _, cache = run
    sliced = cache.apply_slice_to_batch_dim([0, 2])
    assert type(sliced) is type(cache)
    torch.testing.assert_close(sliced.decompose_resid().sum(0), cache["resid_post", -1][[0, 2]], atol=1e-5, rtol=0)


@torch.no_grad()
def test_stacked_weights_embeddings_and_views():
    model = HookedViT.from_timm(build("layerscale"))
    assert model.W_Q.shape == (2, 2, 32, 16) and model.W_O.shape == (2, 2, 16, 32) and model.b_O.shape == (2, 32)
    assert model.W_in.shape == (2, 32, 64) and model.OV.AB.shape == (2, 2, 32, 32)
    torch.testing.assert_close(model.W_K[1], model.blocks[1].attn.W_K, atol=0, rtol=0)
    # Views: an in-place edit of the timm weights shows up at once.
    assert model.blocks[0].attn.W_V.data_ptr() >= model.vit.blocks[0].attn.qkv.weight.data_ptr()
    model.vit.blocks[0].attn.qkv.weight[32 + 16 + 3, 5] = 7.0  # W_K of head 1, d_model 5, d_head 3
    assert model.blocks[0].attn.W_K[1, 5, 3] == 7.0
    # W_E, b_E, W_pos: hook_full_embed rebuilt from the patches by hand.
    x = images()
    _, cache = model.run_with_cache(x, names_filter=["hook_embed", "hook_full_embed", "hook_pos_embed"])
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, -1)  # (chan, row, col)
    torch.testing.assert_close(patches @ model.W_E + model.b_E, cache["hook_embed"], atol=1e-5, rtol=0)
    cls = model.vit.cls_token[0].expand(3, 1, -1)
    tokens = torch.cat([cls, cache["hook_embed"]], 1)
    torch.testing.assert_close(tokens + model.W_pos, cache["hook_full_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["hook_pos_embed"], model.W_pos.expand(3, -1, -1), atol=1e-6, rtol=0)
    assert torch.equal(model.blocks[0].ln1.w, model.vit.blocks[0].norm1.weight)
    with pytest.raises(ValueError, match="not a LayerNorm"):
        HookedViT.from_timm(build("avg_fc_norm")).ln_final.w


@torch.no_grad()
def test_pos_embed_hook_replaces_the_position_embedding():
    model = HookedViT.from_timm(build("registers"))  # no_embed_class: registers carry no position
    x = images()
    _, cache = model.run_with_cache(x, names_filter=["hook_embed", "hook_full_embed"])
    other = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(5))
    no_pos = model.run_with_hooks(x, fwd_hooks=[("hook_pos_embed", lambda pos, hook: other)])
    vit = model.vit
    tokens = torch.cat([vit.cls_token.expand(3, -1, -1), vit.reg_token.expand(3, -1, -1), cache["hook_embed"]], 1)
    expected = model.run_with_hooks(x, fwd_hooks=[("hook_full_embed", lambda t, hook: tokens + other)])
    torch.testing.assert_close(no_pos, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(no_pos, model(x), atol=1e-3)


@torch.no_grad()
def test_post_norm_qkv_read_the_raw_residual_and_split_inputs_agree():
    """ResPostBlock attends to the un-normalised stream: q = resid_pre @ W_Q + b_Q (no ln1 before it)."""
    model = HookedViT.from_timm(build("res_post"))
    x = images()
    logits, cache = model.run_with_cache(x)
    for layer, block in enumerate(model.blocks):
        attn, resid = block.attn, cache["resid_pre", layer]
        qkv = model.vit.blocks[layer].attn.qkv.weight  # [3*d_model d_model], rows q | k | v, head-major
        for i, act in enumerate("qkv"):
            by_hand = (resid @ qkv[i * 32:(i + 1) * 32].T).view(3, -1, 2, 16)  # no qkv bias on this family
            torch.testing.assert_close(by_hand, cache[act, layer], atol=1e-5, rtol=0)
            weight = getattr(attn, f"W_{act.upper()}")
            torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", resid, weight) + getattr(attn, f"b_{act.upper()}"),
                                       cache[act, layer], atol=1e-5, rtol=0)
    model.set_use_split_qkv_input(True)
    try:
        split_logits, split = model.run_with_cache(x)
    finally:
        model.set_use_split_qkv_input(False)
    torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(split["v", 1], cache["v", 1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_dynamic_size_helpers_and_sweeps_follow_the_input_grid():
    """cfg.n_ctx is the default size's token count; at another size the helpers and sweeps use that input's grid."""
    model = HookedViT.from_timm(build("dynamic_size"))
    assert model.cfg.n_ctx == 17  # 32x32 images: CLS + 4x4 patches
    x, clean = torch.randn(2, 3, 24, 40), torch.randn(2, 3, 24, 40)  # a 3x5 grid: 16 tokens
    _, cache = model.run_with_cache(x)
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    assert full.shape[2] == 16
    torch.testing.assert_close(full.sum(0), cache["resid_post", -1], atol=1e-4, rtol=0)
    _, clean_cache = model.run_with_cache(clean)
    grid = act_patch(model, x, clean_cache, metric, "resid_pre")
    assert grid.shape == (2, 16)
    expected = _by_hand(model, x, clean_cache, metric, "blocks.1.hook_resid_pre", (slice(None), 15))
    assert grid[1, 15].item() == pytest.approx(expected, abs=1e-5)
    frame = act_patch(model, x, clean_cache, metric, "resid_pre", as_frame=True)
    assert (frame.iloc[15].row, frame.iloc[15].col) == (2, 4)  # the last patch of 3 rows x 5 cols


def test_post_norm_geometry_refused_and_switches_explain_themselves():
    model = HookedViT.from_timm(build("res_post"))
    with pytest.raises(ValueError, match="post-norm"):
        model.blocks[0].attn.OV
    with pytest.raises(ValueError, match="post-norm"):
        model.set_use_attn_result(True)
    model = HookedViT.from_timm(build("cls"))
    with pytest.raises(ValueError, match="set_use_attn_result"):
        model.run_with_hooks(images(), fwd_hooks=[("blocks.0.attn.hook_result", lambda t, hook: None)])
    with pytest.raises(ValueError, match="set_use_hook_mlp_in"):
        model.run_with_cache(images(), names_filter=["blocks.0.hook_mlp_in"])
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="exclusive"):
        model.set_use_attn_in(True)
    model.set_use_split_qkv_input(False)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_hook_mlp_in_patches_only_the_mlp_branch():
    model = HookedViT.from_timm(build("cls"))
    model.set_use_hook_mlp_in(True)
    x = images()
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", zero)]):
        _, cache = model.run_with_cache(x, names_filter=["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"])
    mlp = model.vit.blocks[0].mlp
    expected = mlp(model.vit.blocks[0].norm2(torch.zeros(1, 1, 32)))  # LayerNorm of zeros is its bias
    torch.testing.assert_close(cache["mlp_out", 0], expected.expand_as(cache["mlp_out", 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["resid_mid", 0], model.run_with_cache(x)[1]["resid_mid", 0], atol=1e-6, rtol=0)


def test_api_gaps_cfg_loss_stop_at_layer_and_plain_dict():
    model = HookedViT.from_timm(build("cls"))
    cfg = model.cfg
    assert (cfg.device, cfg.dtype, cfg.n_classes, cfg.patch_size, cfg.image_size) == \
        (torch.device("cpu"), torch.float32, 10, (8, 8), (32, 32))
    assert cfg.eps == 1e-6 and cfg.n_key_value_heads == 2 and cfg.act_fn == "gelu" and cfg.n_ctx == 17
    from timm.layers import QuickGELU
    torch.manual_seed(0)
    assert HookedViT.from_timm(VisionTransformer(**BASE, act_layer=QuickGELU)).cfg.act_fn == "quick_gelu"
    x, labels = images(), torch.tensor([1, 2, 3])
    with torch.no_grad():
        resid = model(x, stop_at_layer=1)
        _, cache = model.run_with_cache(x, return_cache_object=False)
    assert type(cache) is dict
    torch.testing.assert_close(resid, cache["blocks.0.hook_resid_post"], atol=1e-6, rtol=0)
    loss = model(x, return_type="loss", labels=labels)
    torch.testing.assert_close(loss, F.cross_entropy(model.vit(x), labels), atol=1e-6, rtol=0)
    _, grads = model.run_with_cache(x, return_type="loss", labels=labels, incl_bwd=True,
                                    names_filter="blocks.1.hook_resid_post")
    # d loss / d CLS residual of the last block, by hand through the final norm and head.
    resid = grads["blocks.1.hook_resid_post"].clone().requires_grad_(True)
    F.cross_entropy(model.vit.head(model.vit.norm(resid[:, 0])), labels).backward()
    torch.testing.assert_close(grads["blocks.1.hook_resid_post_grad"], resid.grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="labels"):
        model(x, return_type="loss")
    model.vit.to(torch.float64)
    assert model.cfg.dtype == torch.float64


@torch.no_grad()
def test_logit_lens_reads_the_class_token():
    model = HookedViT.from_timm(build("layerscale"))
    logits, cache = model.run_with_cache(images())
    lens = cache.logit_lens()
    torch.testing.assert_close(lens.values[-1], logits, atol=1e-5, rtol=0)
    by_hand = model.unembed(cache["resid_pre", 1][:, 0])
    torch.testing.assert_close(lens.values[1], by_hand, atol=1e-5, rtol=0)
    _, distilled = HookedViT.from_timm(build("distilled")).run_with_cache(images())
    with pytest.raises(ValueError, match="two heads"):
        distilled.logit_lens()


def test_in_place_hook_q_edit_with_grad_matches_returned_edit():
    model = HookedViT.from_timm(build("cls"))
    x = images()

    def in_place(q, hook):  # the TransformerLens Main Demo style: edit, return nothing
        q[:, :, 1] = 30.0

    def returned(q, hook):
        q = q.clone()
        q[:, :, 1] = 30.0
        return q

    a = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_q", in_place)])
    b = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_q", returned)])
    assert a.requires_grad
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, model(x), atol=1e-4)
    a.sum().backward()  # the in-place edit keeps a valid graph


def test_hook_returning_another_shape_names_hook_and_shapes():
    model = HookedViT.from_timm(build("cls"))
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post returned \(3, 5, 32\).*\(3, 17, 32\)"):
        model.run_with_hooks(images(), fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: t[:, :5])])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


# -- TransformerLens' patching module --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patching_setup():
    torch.manual_seed(0)  # a non-square grid: 4x3 patches of 8 on 32x24 images, plus 2 registers
    vit = VisionTransformer(**{**BASE, "img_size": (32, 24)}, reg_tokens=2).eval()
    model = HookedViT.from_timm(vit)
    clean, corrupted = torch.randn(2, 3, 32, 24), torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return model, corrupted, clean_cache


def _by_hand(model, corrupted, clean_cache, metric, hook, index):
    def patch(activation, hook):
        activation = activation.clone()
        activation[index] = clean_cache[hook.name][index]
        return activation
    with torch.no_grad():
        return metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, patch)])).item()


def metric(logits):
    return logits[:, 4].mean()


def test_act_patch_resid_pre_matches_a_sweep_by_hand(patching_setup):
    model, corrupted, clean_cache = patching_setup
    with torch.no_grad():
        result = act_patch(model, corrupted, clean_cache, metric, "resid_pre")
    assert result.shape == (2, 15)  # CLS, 2 registers, 4x3 patches: not the image width (24)
    for layer in range(2):
        for pos in range(15):
            expected = _by_hand(model, corrupted, clean_cache, metric, f"blocks.{layer}.hook_resid_pre",
                                (slice(None), pos))
            assert result[layer, pos].item() == pytest.approx(expected, abs=1e-5), (layer, pos)
    frame = act_patch(model, corrupted, clean_cache, metric, "resid_pre", as_frame=True)
    assert len(frame) == 30 and frame.metric.tolist() == pytest.approx(result.flatten().tolist())
    last = frame.iloc[14]
    assert (last.kind, last.row, last.col) == ("patch", 3, 2)  # row-major on 4 rows x 3 cols


def test_act_patch_heads_and_patterns_at_query_tokens(patching_setup):
    model, corrupted, clean_cache = patching_setup
    with torch.no_grad():
        heads = act_patch(model, corrupted, clean_cache, metric, "attn_head_out")
        by_pos = act_patch(model, corrupted, clean_cache, metric, "attn_head_q_by_pos")
        pattern = act_patch(model, corrupted, clean_cache, metric, "attn_head_pattern_by_pos")
    assert heads.shape == (2, 2) and by_pos.shape == (2, 15, 2) and pattern.shape == (2, 2, 15)
    for layer, head in [(0, 1), (1, 0)]:
        assert heads[layer, head].item() == pytest.approx(_by_hand(
            model, corrupted, clean_cache, metric, f"blocks.{layer}.attn.hook_z", (slice(None), slice(None), head)),
            abs=1e-5)
    for layer, pos, head in [(1, 0, 1), (0, 9, 0)]:
        assert by_pos[layer, pos, head].item() == pytest.approx(_by_hand(
            model, corrupted, clean_cache, metric, f"blocks.{layer}.attn.hook_q", (slice(None), pos, head)), abs=1e-5)
    for layer, head, query in [(1, 1, 0), (0, 0, 7)]:  # a query row of the pattern
        assert pattern[layer, head, query].item() == pytest.approx(_by_hand(
            model, corrupted, clean_cache, metric, f"blocks.{layer}.attn.hook_pattern", (slice(None), head, query)),
            abs=1e-5)


def test_tl_patching_called_directly_works_or_refuses(patching_setup):
    model, corrupted, clean_cache = patching_setup
    with torch.no_grad():
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
        ours = act_patch(model, corrupted, clean_cache, metric, "attn_head_out")
        torch.testing.assert_close(heads, ours, atol=1e-6, rtol=0)
        for sweep in (tl_patching.get_act_patch_resid_pre, tl_patching.get_act_patch_attn_head_pattern_by_pos,
                      tl_patching.get_act_patch_block_every):
            with pytest.raises(ValueError, match="24 positions from the image width.*15 tokens"):
                sweep(model, corrupted, clean_cache, metric)
        # With an index from the token layout, TL's generic function sweeps the right positions.
        flat = tl_patching.generic_activation_patch(model, corrupted, clean_cache, metric,
                                                    tl_patching.layer_pos_patch_setter, "resid_pre",
                                                    index_df=patch_index(model, "resid_pre", corrupted))
        torch.testing.assert_close(flat.reshape(2, 15), act_patch(model, corrupted, clean_cache, metric, "resid_pre"))


def test_tl_direct_path_patching_runs_through_split_qkv(patching_setup):
    model, corrupted, clean_cache = patching_setup
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(corrupted)
        result = tl_patching.get_act_patch_direct_path(model, corrupted, clean_cache, corrupted_cache, metric,
                                                       src_layer=0, src_head=1, component="v", verbose=False)
        assert not model.cfg.use_split_qkv_input  # the caller's switches are restored
        # By hand: head (0, 1)'s clean-minus-corrupted write added to head (1, 0)'s own value input only.
        W_O = model.blocks[0].attn.W_O[1]
        delta = (clean_cache["z", 0][:, :, 1] - corrupted_cache["z", 0][:, :, 1]) @ W_O
        resid = corrupted_cache["resid_pre", 1] + delta
        attn = model.blocks[1].attn
        v = torch.einsum("bpm,hmd->bphd", model.vit.blocks[1].norm1(resid), attn.W_V) + attn.b_V

        def patch_v(value, hook):
            value = value.clone()
            value[:, :, 0] = v[:, :, 0]
            return value
        expected = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_v", patch_v)]))
    assert result[1, 0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert result[0].abs().sum() == 0
