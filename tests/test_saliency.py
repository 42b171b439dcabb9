"""Class-embedding saliency against a closed form, token-removal curves against a plain loop, AUCs."""
import numpy as np
import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import analyses
import vitlens
from analyses import saliency
from analyses.probing import Rows
from vitlens import HookedViT
from vitlens.data import load_dataset


def _one_layer(class_token=True):
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=16, patch_size=8, num_classes=7, embed_dim=16, depth=1, num_heads=2,
                            mlp_ratio=2, class_token=class_token, global_pool="token" if class_token else "avg")
    for p in vit.parameters():  # away from timm's small init, so every term of the closed form matters
        p.data.normal_(0, 0.5)
    return HookedViT.from_timm(vit.eval())


def _closed_form(model, images, target, compat):
    """d objective(token t) / d pattern[h, t, k] = V[h, k] . W_proj^T J_LN^T W_U g_p, written out by hand."""
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    V = cache["blocks.0.attn.hook_v"]  # [b k h dh]
    out = cache["blocks.0.hook_attn_out"]  # [b t d]
    norm, W_U = model.final_norm, model.W_U  # W_U [d C]
    logits = norm(out) @ W_U + model.b_U
    onehot = torch.nn.functional.one_hot(target, W_U.shape[1]).float()[:, None]  # [b 1 C]
    if compat:  # L = -log_softmax(q)_c with q = softmax(p): dL/dq = softmax(q) - e_c, then softmax's Jacobian
        q = logits.softmax(-1)
        g = q.softmax(-1) - onehot
        g_p = q * (g - (q * g).sum(-1, keepdim=True))
    else:
        g_p = onehot.expand_as(logits)
    mu, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
    sigma = (var + norm.eps).sqrt()
    xhat = (out - mu) / sigma
    u = norm.weight * (g_p @ W_U.T)  # [b t d]
    g_x = (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True)) / sigma
    g_z = (g_x @ model.vit.blocks[0].attn.proj.weight).unflatten(-1, (2, 8))  # [b t h dh]
    return torch.einsum("bkhe,bthe->bhtk", V, g_z)  # [b h t k]


@pytest.mark.parametrize("compat", [False, True])
def test_gradients_equal_the_closed_form_on_one_layer(compat):
    model = _one_layer()
    images, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    grads, patterns = saliency.class_embedding_gradients(model, images, target, compat=compat)
    expected = _closed_form(model, images, target, compat)
    torch.testing.assert_close(grads[:, 0], expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    torch.testing.assert_close(patterns[:, 0], cache["blocks.0.attn.hook_pattern"])
    maps = saliency.importance(model, images, target, compat=compat)  # CLS row, patches, summed over heads
    cls_row = expected[:, :, 0, 1:].sum(1)
    torch.testing.assert_close(maps.flatten(1), -cls_row if compat else cls_row, atol=1e-5, rtol=1e-4)
    via_explain = analyses.explain(model, images, "class_embedding", target=target, compat=compat)
    torch.testing.assert_close(via_explain, maps)


def test_token_subset_keeps_its_rows_and_out_of_range_tokens_are_refused():
    """tokens=[t] gives row t of the full gradients and zero elsewhere; a negative index (which would silently pick a
    token from the end) is refused."""
    model = _one_layer()
    images, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    full, _ = saliency.class_embedding_gradients(model, images, target)
    subset, _ = saliency.class_embedding_gradients(model, images, target, tokens=[2])
    torch.testing.assert_close(subset[:, :, :, 2], full[:, :, :, 2])
    assert not subset[:, :, :, [0, 1, 3, 4]].any()
    for bad in ([-1], [5], []):
        with pytest.raises(ValueError, match=r"layout indices in \[0, 5\)"):
            saliency.class_embedding_gradients(model, images, target, tokens=bad)


def test_each_block_differentiates_only_its_own_objective():
    """Block 0's gradient equals autograd of block 0's projected output alone (later blocks excluded)."""
    model = vitlens.load_model("tiny-scenes")
    images, target = torch.randn(2, 3, 48, 48), torch.tensor([2, 7])
    grads, _ = saliency.class_embedding_gradients(model, images, target)
    saved = {}

    def leaf(pattern, hook):
        saved["pattern"] = pattern.detach().requires_grad_(True)
        return saved["pattern"]

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", leaf),
                                ("blocks.0.hook_attn_out", lambda x, hook: saved.update(out=x))]):
        model(images)
    logit = model.unembed(saved["out"])[torch.arange(2), :, target].sum()
    (expected,) = torch.autograd.grad(logit, saved["pattern"])
    torch.testing.assert_close(grads[:, 0], expected)


def test_cls_measures_refuse_a_model_without_class_token():
    with pytest.raises(ValueError, match="no class token"):
        saliency.importance(_one_layer(class_token=False), torch.randn(1, 3, 16, 16), torch.tensor([0]))


@pytest.fixture(scope="module")
def scenes():
    model = vitlens.load_model("tiny-scenes")
    data = Rows(load_dataset("scenes", model=model, mask_resize="area"), range(0, 500, 10))
    items = [data[i] for i in range(len(data))]
    return (model, torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items]),
            torch.stack([i["token_mask"] for i in items]))


def _plain_accuracy(model, images, labels, scores, n, order):
    """Keep CLS and the n best (or worst) patches of each image, one image at a time."""
    correct = 0
    for image, label, score in zip(images, labels, scores.flatten(1)):
        ranked = score.argsort(descending=order == "negative", stable=True)
        if order == "positive":  # ascending with ties: the earlier patch first, as for the negative order
            ranked = (-score).argsort(descending=True, stable=True)
        keep = torch.cat([torch.tensor([0]), ranked[:n].sort().values + 1])
        vit = model.vit  # timm's own modules, step by step, with the tokens dropped after the position embedding
        with torch.no_grad():
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None])))[:, keep]
            logits = vit.forward_head(vit.norm(vit.blocks(x)))
        correct += int(logits.argmax() == label)
    return correct / len(images)


@pytest.mark.parametrize("order", ["negative", "positive"])
def test_token_removal_curve_equals_a_plain_loop(scenes, order):
    model, images, labels, _ = scenes
    images, labels = images[:6], labels[:6]
    scores = torch.randn(6, 6, 6, generator=torch.Generator().manual_seed(0))
    curve = saliency.token_removal_curve(model, images, labels, scores, order=order, n_keep=[1, 4, 20, 36],
                                         batch_size=10)
    expected = [_plain_accuracy(model, images, labels, scores, n, order) for n in (1, 4, 20, 36)]
    torch.testing.assert_close(curve, torch.tensor(expected, dtype=torch.float64))
    hits = saliency.token_removal_hits(model, images, labels, scores, order=order, n_keep=[1, 4, 20, 36],
                                       batch_size=10)  # each image's own curve: the plain loop on it alone
    assert hits.dtype == torch.bool and hits.shape == (4, 6)
    for b in range(6):
        plain = [_plain_accuracy(model, images[b:b + 1], labels[b:b + 1], scores[b:b + 1], n, order)
                 for n in (1, 4, 20, 36)]
        assert hits[:, b].tolist() == [p == 1.0 for p in plain]


def test_the_oracle_ordering_beats_random_on_the_scenes(scenes):
    model, images, labels, masks = scenes
    oracle = saliency.token_removal_curve(model, images, labels, saliency.oracle_scores(masks))
    worst = saliency.token_removal_curve(model, images, labels, saliency.oracle_scores(masks), order="positive")
    random = saliency.random_curve(model, images, labels, n_perms=3)
    assert len(oracle) == 35  # n = 1 .. 35 of 36 patches
    assert saliency.auc_study(oracle) > saliency.auc_study(random) + 0.05
    assert saliency.auc(oracle) > saliency.auc(random) > saliency.auc(worst)


def test_aucs_on_a_known_curve():
    curve = torch.tensor([0.5, 1.0, 0.5])
    assert saliency.auc_study(curve) == pytest.approx(2.0 / (1.0 * 4))  # sum / (max * N), N = len + 1
    assert saliency.auc_study(curve, n_patches=49) == pytest.approx(2.0 / 49)
    # trapezoid over the fraction kept (1/4, 2/4, 3/4): 0.25 * (0.75 + 0.75), divided by the span 0.5
    assert saliency.auc(curve) == pytest.approx(0.75)


def test_probe_scores_put_the_lowest_rank_sum_first():
    model = vitlens.load_model("tiny-scenes")
    ranks = torch.zeros(4, 1, 37, dtype=torch.long)
    ranks[:, 0, 1:] = torch.arange(36).flip(0)  # the last patch has rank 0 in every layer
    scores = saliency.probe_scores(ranks, model)
    assert scores.shape == (1, 6, 6)
    assert scores.flatten().argmax() == 35 and scores.flatten().argmin() == 0


def test_bad_orders_and_scores_are_named(scenes):
    model, images, labels, _ = scenes
    with pytest.raises(ValueError, match="order"):
        saliency.token_removal_curve(model, images[:1], labels[:1], torch.zeros(1, 36), order="up")
    with pytest.raises(ValueError, match="36 patches"):
        saliency.token_removal_curve(model, images[:1], labels[:1], torch.zeros(1, 30))


@pytest.fixture(scope="module")
def small_scenes():
    """The bundled model and 2 scenes per class: the first of each class trains the probes, 10 are perturbed."""
    model = vitlens.load_model("tiny-scenes")
    return model, load_dataset("scenes", model=model, n_per_class=2, mask_resize="area")


def test_run_curves_against_plain_loops_aucs_and_resume(small_scenes, tmp_path):
    model, data = small_scenes
    test_rows = [i for i in range(len(data)) if i not in data.samples.groupby("label").head(1).index]
    items = [data[i] for i in test_rows]
    images, labels = torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items])
    masks = torch.stack([i["token_mask"] for i in items])
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda module, inputs, out: seen.append(len(out)))
    try:
        curves, aucs = saliency.run(model, data, tmp_path / "s", train_per_class=1, n_perms=2, progress=False)
        first = len(seen)
        again = saliency.run(model, data, tmp_path / "s", train_per_class=1, n_perms=2, progress=False)
    finally:
        handle.remove()
    assert first > 0 and len(seen) == first  # resumed: every curve read back, no forward
    pd.testing.assert_frame_equal(again[0], curves)
    pd.testing.assert_frame_equal(again[1], aucs)
    assert list(curves.columns) == ["method", "order", "n_keep", "accuracy"]
    assert list(aucs.columns) == ["method", "order", "auc_study", "auc"]
    assert len(curves) == 4 * 2 * 35 and (tmp_path / "s" / "results" / "curves" / "oracle-negative.csv").exists()

    def curve(method, order):
        return curves[(curves.method == method) & (curves.order == order)].accuracy.to_numpy()

    ns = [1, 5, 18, 35]
    class_embedding = saliency.importance(model, images, labels)  # checked against the closed form above
    permutations = [torch.randperm(36, generator=torch.Generator().manual_seed(p)) for p in range(2)]
    for order in ("negative", "positive"):
        for method, scores in (("oracle", masks.float()), ("class_embedding", class_embedding)):
            expected = [_plain_accuracy(model, images, labels, scores, n, order) for n in ns]
            np.testing.assert_allclose(curve(method, order)[[n - 1 for n in ns]], expected, err_msg=method)
    random = [np.mean([_plain_accuracy(model, images, labels, (-torch.argsort(p).float()).expand(10, -1), n,
                                       "negative") for p in permutations]) for n in ns]
    np.testing.assert_allclose(curve("random", "negative")[[n - 1 for n in ns]], random)
    np.testing.assert_array_equal(curve("random", "positive"), curve("random", "negative"))
    for row in aucs.itertuples():  # sum / (max * N) with N = 36 patches; the trapezoid over n / N
        accuracy = curve(row.method, row.order)
        assert row.auc_study == pytest.approx(accuracy.sum() / (accuracy.max() * 36))
        assert row.auc == pytest.approx(np.trapezoid(accuracy, np.arange(1, 36) / 36) / (34 / 36))


def test_the_probe_ordering_reads_each_test_image_once_with_the_same_curves(small_scenes, monkeypatch):
    from analyses import probing

    model, data = small_scenes
    train, test = probing.split_per_class(data, 1)
    # the ordering as the split itself gives it: probes on the features of a second pass over the test split
    ranks = probing.probe_ranks(probing.extract_features(model, train, batch_size=4),
                                probing.extract_features(model, test, batch_size=4), model.cfg.d_vocab)
    items = [test[i] for i in range(len(test))]
    images, labels = torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items])
    expected = {order: saliency.token_removal_curve(model, images, labels, saliency.probe_scores(ranks, model),
                                                    order=order, batch_size=32).numpy() for order in saliency.ORDERS}
    reads = []
    get_item = type(data).__getitem__
    monkeypatch.setattr(type(data), "__getitem__", lambda self, i: reads.append(int(i)) or get_item(self, i))
    curves, _ = saliency.run(model, data, train_per_class=1, methods=["linear_probe"], batch_size=4, progress=False)
    assert sorted(reads) == list(range(len(data)))  # every image read once: train for the probes, test once
    for order in saliency.ORDERS:  # bit for bit the curves of the second pass
        got = curves[(curves.method == "linear_probe") & (curves.order == order)].accuracy.to_numpy()
        np.testing.assert_array_equal(got, expected[order])
        assert 0 < got.mean() < 1


def test_cli_saliency_writes_tables_and_refuses_a_model_without_class_token(small_scenes, tmp_path, capsys):
    import timm

    from vitlens.cli import main

    model, data = small_scenes
    store = tmp_path / "s"
    args = ["analyze", "saliency", "--store", str(store), "--n-per-class", "2", "--train-per-class", "1",
            "--methods", "class_embedding,random", "--n-perms", "2", "--no-progress"]
    assert main(args) == 0
    assert "perturbation_auc" in capsys.readouterr().out
    aucs = pd.read_csv(store / "results" / "perturbation_auc.csv")
    curves = pd.read_csv(store / "results" / "token_removal_curves.csv")
    expected_curves, expected_aucs = saliency.run(model, data, train_per_class=1, n_perms=2, progress=False,
                                                  methods=("class_embedding", "random"))
    pd.testing.assert_frame_equal(curves, expected_curves)
    pd.testing.assert_frame_equal(aucs, expected_aucs)
    assert main(args) == 0  # resumed from STORE/results/curves: the same tables
    pd.testing.assert_frame_equal(pd.read_csv(store / "results" / "perturbation_auc.csv"), aucs)

    torch.manual_seed(0)  # a model without a class token (average pooling), as a model folder
    gap = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2, num_classes=10, class_token=False, global_pool="avg")
    gap.pretrained_cfg = {**gap.pretrained_cfg, "input_size": (3, 48, 48), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    timm.models.save_for_hf(gap, tmp_path / "gap", model_args=dict(img_size=48, patch_size=8, embed_dim=32, depth=1,
                            num_heads=2, num_classes=10, class_token=False, global_pool="avg"))
    capsys.readouterr()
    bad = ["analyze", "saliency", "--store", str(tmp_path / "g"), "--model", f"local-dir:{tmp_path / 'gap'}",
           "--n-per-class", "2", "--train-per-class", "1", "--methods", "class_embedding", "--no-progress"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitlens: error:") and err.count("\n") == 1 and "no class token" in err, err


def test_maps_have_the_grid_shape_and_plot_flips_the_curve(scenes):
    model, images, labels, _ = scenes
    maps = analyses.explain(model, images[:2], "class_embedding", target=labels[:2], compat=True)
    assert maps.shape == (2, 6, 6)  # [batch grid_h grid_w] like every explanation method
    curves = pd.DataFrame({"method": "m", "order": "negative", "n_keep": [1, 2, 3], "accuracy": [0.2, 0.5, 0.9]})
    line = saliency.plot(curves).data[0]
    # the study's figure: x = % removed = 100 (N - n) / N with N = 4 patches
    np.testing.assert_allclose(line.x, [75, 50, 25])
    np.testing.assert_allclose(line.y, [0.2, 0.5, 0.9])
