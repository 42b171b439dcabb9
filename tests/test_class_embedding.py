"""Class-embedding projections and the vit-cls_emb measures (analyses/class_embedding.py), on the bundled model."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitlens
from helpers.tiny import SyntheticImages
from vitlens import HookedViT
from analyses import class_embedding as ce
from vitlens.cli import main
from vitlens.data import load_dataset

N_PER_CLASS = 12


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """tiny-scenes over 120 scenes (area masks), recorded in float32 with its random twin."""
    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, mask_resize="area", n_per_class=N_PER_CLASS)
    path = tmp_path_factory.mktemp("ce") / "scenes"
    store = ce.run(model, data, path, random_twin=True, precision="float32", batch_size=40, progress=False)
    return model, data, store, path


def test_run_records_the_named_outputs(study):
    model, _, store, _ = study
    n, layers, tokens = len(store), model.cfg.n_layers, model.layout.n_tokens
    for suffix in ("", "_attn", "_mlp"):
        assert store[f"class_rank{suffix}"][:].dtype == np.int16
        assert store[f"class_rank{suffix}"][:].shape == (n, layers, tokens)
        assert store[f"class_logit{suffix}"][:].dtype == np.float32
        assert store[f"class_top5{suffix}"][:].dtype == np.int16
        assert store[f"class_top5{suffix}"][:].shape == (n, layers, tokens, 5)
    assert store["hook_logits"][:].shape == (n, 10)


def test_last_layer_cls_rate_equals_top1_accuracy(study):
    model, data, store, _ = study
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.inference_mode():
        accuracy = 100 * (model(images).argmax(1).numpy() == data.samples["label"].to_numpy()).mean()
    table = ce.identifiability(store)
    last = table[(table.layer == model.cfg.n_layers - 1) & (table.tokens == "cls")].iloc[0]
    assert last.rate == accuracy and last.images_with_one == accuracy


def test_store_projections_equal_live_run_with_cache(study):
    model, data, store, _ = study
    images = torch.stack([data[i]["image"] for i in range(8)])
    labels = torch.tensor(data.samples["label"][:8].to_list())
    with torch.inference_mode():
        _, cache = model.run_with_cache(images)
    for suffix, hook in (("", "hook_resid_post"), ("_attn", "hook_attn_out"), ("_mlp", "hook_mlp_out")):
        for layer in range(model.cfg.n_layers):
            with torch.inference_mode():
                logits = model.vit.head(model.vit.norm(cache[f"blocks.{layer}.{hook}"]))  # [8 pos classes]
            label_logit = logits[torch.arange(8), :, labels]
            rank = (logits > label_logit[..., None]).sum(-1)
            np.testing.assert_array_equal(store[f"class_rank{suffix}"][:8, layer], rank.numpy(), err_msg=hook)
            np.testing.assert_allclose(store[f"class_logit{suffix}"][:8, layer], label_logit.numpy(), rtol=1e-5,
                                       atol=1e-5)
            top5 = store[f"class_top5{suffix}"][:8, layer]
            np.testing.assert_array_equal(top5[..., 0], logits.argmax(-1).numpy())
            picked = np.take_along_axis(logits.numpy(), top5.astype(np.int64), -1)
            assert (np.diff(picked, axis=-1) <= 0).all() and np.allclose(picked[..., -1],
                                                                          logits.topk(5).values[..., -1])


def test_identifiability_and_change_rates_against_plain_loops(study):
    model, _, store, _ = study
    rank, logit = store["class_rank"][:].astype(int), store["class_logit"][:]
    n, layers, _ = rank.shape
    table = ce.identifiability(store).set_index(["layer", "tokens"])
    for layer in range(layers):
        per_image = [np.mean([rank[i, layer, t] == 0 for t in range(1, 37)]) for i in range(n)]
        assert table.loc[(layer, "image"), "rate"] == pytest.approx(100 * np.mean(per_image))
        assert table.loc[(layer, "image"), "images_with_one"] == pytest.approx(
            100 * np.mean([(rank[i, layer, 1:] == 0).any() for i in range(n)]))
        assert table.loc[(layer, "cls"), "mean_identifiability"] == pytest.approx(np.mean(1 - rank[:, layer, 0] / 10))
    rates = ce.change_rate(store)
    assert list(rates.columns) == ["layer", "rate"] and list(rates.layer) == list(range(1, layers))
    for layer in range(1, layers):
        up = sum(logit[i, layer, t] > logit[i, layer - 1, t] for i in range(n) for t in range(1, 37))
        assert rates.set_index("layer").rate[layer] == pytest.approx(100 * up / (n * 36))
    similarity = ce.class_similarity_change(store).set_index(["layer", "sublayer", "tokens"])
    attn = store["class_logit_attn"][:]
    for layer in range(1, layers):
        up = np.mean([attn[i, layer, 0] - logit[i, layer - 1, 0] > 0 for i in range(n)])
        assert similarity.loc[(layer, "attn", "cls"), "rate"] == pytest.approx(100 * up)
    halves = ce.identifiability(store, blocks=2).set_index(["layer", "tokens"])  # layers (0, 1) and (2, 3)
    assert halves.loc[(1, "image"), "rate"] == pytest.approx((table.loc[(2, "image"), "rate"]
                                                              + table.loc[(3, "image"), "rate"]) / 2)


def test_residual_composition_against_a_plain_loop_and_compat_comp(study):
    _, _, store, _ = study
    top1 = {k: store[f"class_top5{k}"][:][..., 0] for k in ("", "_attn", "_mlp")}
    table, compat = ce.residual_composition(store), ce.residual_composition(store, compat=True)
    assert list(table.columns) == ["layer", "attn", "mlp", "prev", "comp"]
    for row in table.itertuples():
        r, a, m, p = top1[""][:, row.layer], top1["_attn"][:, row.layer], top1["_mlp"][:, row.layer], \
            top1[""][:, row.layer - 1]
        assert row.attn == pytest.approx(100 * (r == a).mean()) and row.prev == pytest.approx(100 * (r == p).mean())
        assert row.comp == pytest.approx(100 * ((r != a) & (r != m) & (r != p)).mean())
    mlp_only = compat.comp - table.comp  # the study's comp never tests the MLP: it counts the MLP-only matches too
    assert (mlp_only > 0).all()
    cls = ce.residual_composition(store, tokens="cls").set_index("layer")
    for layer in cls.index:
        r, m = top1[""][:, layer, 0], top1["_mlp"][:, layer, 0]
        assert cls.mlp[layer] == pytest.approx(100 * (r == m).mean())
    with pytest.raises(ValueError, match="tokens='patches'"):
        ce.residual_composition(store, tokens="patches")


def test_label_rank_ties_compat():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 0.0]]])
    assert ce.label_rank(logits, torch.tensor([2])).item() == 0  # ties never count
    assert ce.label_rank(logits, torch.tensor([2]), compat=True).item() == 1  # stable argsort: class 1 first
    assert ce.label_rank(logits, torch.tensor([1]), compat=True).item() == 0


def no_class_token_model():
    """A random 2-block ViT without a class token, average pooling (the GAP family), 4x4 patches."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                            class_token=False, global_pool="avg")
    return HookedViT.from_timm(vit, tag="tiny-gap")


def test_gap_model_compat_drops_a_real_image_token(tmp_path):
    store = ce.run(no_class_token_model(), SyntheticImages(8), tmp_path / "gap", precision="float32", progress=False)
    default, compat = ce.identifiability(store), ce.identifiability(store, compat=True)
    assert set(default.tokens) == {"image"}  # no class token
    rank = store["class_rank"][:]
    assert rank.shape[-1] == 16
    assert default.mean_identifiability.iloc[-1] == pytest.approx((1 - rank[:, -1] / 10).mean())
    assert compat.mean_identifiability.iloc[-1] == pytest.approx((1 - rank[:, -1, 1:] / 10).mean())
    assert not np.allclose(default.mean_identifiability, compat.mean_identifiability)


def test_the_studys_findings_on_the_bundled_model(study):
    model, _, store, path = study
    table = ce.identifiability(store)
    for kind in ("cls", "image"):
        curve = table[table.tokens == kind].sort_values("layer").mean_identifiability.to_numpy()
        assert (np.diff(curve) > 0).all(), kind  # identifiability rises with depth
    versus = ce.compare_to_random(store, ce.random_twin_path(path))
    last = versus[versus.layer == model.cfg.n_layers - 1]
    assert (last.p_value < 1e-6).all() and (last["mean"] > last.random_mean + 0.2).all()


def test_context_difference_against_a_plain_permutation_test(study):
    _, data, store, _ = study
    masks = np.stack([data[i]["token_mask"].reshape(-1).numpy() > 0 for i in range(len(data))])
    logit, attn = store["class_logit"][:], store["class_logit_attn"][:]
    table = ce.context_difference(store, data, measure="attn", n_permutations=20, seed=3)
    assert list(table.columns) == ["layer", "difference", "p_value"]
    rng = np.random.default_rng(3)
    delta = attn[:, 1:, 1:] - logit[:, :-1, 1:]  # [n layers-1 patches]
    values, labels = delta.transpose(0, 2, 1).reshape(-1, delta.shape[1]), masks.reshape(-1)
    observed = values[labels].mean(0) - values[~labels].mean(0)
    shuffled = [rng.permutation(labels) for _ in range(20)]
    larger = np.mean([values[s].mean(0) - values[~s].mean(0) > observed for s in shuffled], axis=0)
    np.testing.assert_allclose(table.difference, observed, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table.p_value, larger)


def test_missing_outputs_and_bad_arguments(study, tmp_path):
    _, data, store, _ = study
    bare = vitlens.record(vitlens.load_model("tiny-scenes"), data, tmp_path / "bare", hooks="hook_logits",
                          progress=False)
    for measure in (ce.identifiability, ce.change_rate, ce.residual_composition, ce.class_similarity_change,
                    lambda s: ce.context_difference(s, data), lambda s: ce.compare_to_random(s, store)):
        with pytest.raises(KeyError, match="vitlens analyze identifiability"):
            measure(bare)
    from analyses import perturbation as pt
    with pytest.raises(KeyError, match="vitlens analyze attention-perturbation"):
        pt.table(bare, "self_only")
    with pytest.raises(ValueError, match="precision"):
        ce.run(None, data, tmp_path / "x", precision="float16")
    with pytest.raises(ValueError, match="measure"):
        ce.context_difference(store, data, measure="logits")
    with pytest.raises(ValueError, match="blocks=3"):
        ce.identifiability(store, blocks=3)


def test_auto_precision(monkeypatch):
    monkeypatch.setattr(ce, "_cpu_has_native_bfloat16", lambda: False)
    assert ce.resolve_precision("auto", "cpu") == "float32"
    assert ce.resolve_precision("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(ce, "_cpu_has_native_bfloat16", lambda: True)
    assert ce.resolve_precision("auto", "cpu") == "bfloat16"
    assert ce.resolve_precision("float32", "cuda") == "float32"


def test_plots(study):
    _, data, store, path = study
    tables = [ce.identifiability(store), ce.compare_to_random(store, ce.random_twin_path(path)),
              ce.change_rate(store), ce.class_similarity_change(store), ce.residual_composition(store),
              ce.context_difference(store, data, n_permutations=2)]
    for table in tables:
        figure = ce.plot(table)
        assert isinstance(figure, go.Figure) and len(figure.data) >= 1
    with_twin = ce.plot(tables[0], baseline=ce.identifiability(ce.random_twin_path(path)))
    assert len(with_twin.data) == 4  # cls, image and their random baselines
    with pytest.raises(ValueError, match="no plot"):
        ce.plot(pd.DataFrame({"x": [1]}))


def test_cli_identifiability_resumes_and_writes_tables(tmp_path, capsys):
    args = ["analyze", "identifiability", "--store", str(tmp_path / "s"), "--n-per-class", "1", "--no-progress",
            "--precision", "float32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    written = pd.read_csv(tmp_path / "s" / "results" / "identifiability.csv")
    assert list(written.columns) == ["layer", "tokens", "rate", "images_with_one", "mean_identifiability"]
    assert "identifiability" in out and (tmp_path / "s" / "results" / "context_difference_attn.csv").exists()
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "s" / "shards").iterdir())
    assert main(args) == 0  # resume: nothing left to record
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "s" / "shards").iterdir()) == before
    assert main(args[:-1] + ["bfloat16"]) == 1  # another precision: the store names the difference
    assert "vitlens: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "identifiability", "--help"])
    assert "--random-twin" in capsys.readouterr().out


def test_compare_to_random_is_scipys_wilcoxon_of_plain_r(study):
    model, _, store, path = study
    twin = vitlens.ActivationStore(ce.random_twin_path(path))
    table = ce.compare_to_random(store, twin).set_index(["layer", "tokens"])
    from scipy.stats import wilcoxon
    for layer in range(model.cfg.n_layers):
        r, r_random = 1 - store["class_rank"][:, layer, 1:] / 10, 1 - twin["class_rank"][:, layer, 1:] / 10
        expected = wilcoxon(r.ravel(), r_random.ravel(), alternative="greater")
        assert table.loc[(layer, "image"), "p_value"] == pytest.approx(expected.pvalue)
        assert table.loc[(layer, "image"), "random_mean"] == pytest.approx(r_random.mean())


def test_mlp_similarity_change_reads_the_previous_residual(study):
    model, _, store, _ = study  # the study's quirk, kept: the MLP's input is taken as hs_{b-1}, as the attention's
    logit, mlp = store["class_logit"][:], store["class_logit_mlp"][:]
    table = ce.class_similarity_change(store).set_index(["layer", "sublayer", "tokens"])
    for layer in range(1, model.cfg.n_layers):
        up = (mlp[:, layer, 1:] - logit[:, layer - 1, 1:] > 0).mean()
        assert table.loc[(layer, "mlp", "image"), "rate"] == pytest.approx(100 * up)


def test_compat_projects_in_float32_where_auto_would_pick_bfloat16(monkeypatch):
    """The study ranked float32 logits (ties placed by its sort): compat=True keeps that even on hardware where
    "auto" means bfloat16, and refuses an explicit bfloat16."""
    monkeypatch.setattr(ce, "_cpu_has_native_bfloat16", lambda: True)
    assert ce.resolve_precision("auto", "cpu") == "bfloat16"
    model = vitlens.load_model("tiny-scenes")
    x = torch.randn(3, 37, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 5, 9])
    x[:, :, :] = x[:, :1, :]  # every token of an image the same: ties only across classes, below
    with torch.no_grad():
        model.vit.head.weight[0] = model.vit.head.weight[labels[0]]  # class 0 ties label 2 exactly
        model.vit.head.bias[0] = model.vit.head.bias[labels[0]]
        logits = model.vit.head(model.vit.norm(x))  # the study's float32 logits, plainly
    label_logit = logits[torch.arange(3), :, labels][..., None]
    study_rank = (logits > label_logit).sum(-1) + ((logits == label_logit)
                                                  & (torch.arange(10) < labels.view(-1, 1, 1))).sum(-1)
    with torch.inference_mode():
        compat = ce.project(model, x, labels, precision="auto", compat=True)
        default = ce.project(model, x, labels, precision="auto")
    assert torch.equal(compat.rank.long(), study_rank)
    assert (study_rank[0] == (logits[0] > label_logit[0]).sum(-1) + 1).all()  # the tie counts, as in the study
    assert torch.equal(compat.logit, label_logit.squeeze(-1))  # float32, not the rounded operands' logit
    assert not torch.equal(default.logit, compat.logit)  # auto alone did take the bfloat16 path
    with pytest.raises(ValueError, match="precision='auto' or 'float32' with compat=True"):
        ce.run(model, [], "unused", compat=True, precision="bfloat16")
    with pytest.raises(ValueError, match="compat=True"):
        ce.ProjectionReducer("rank", precision="bfloat16", compat=True)


def test_bfloat16_head_follows_in_place_weight_edits():
    model, fresh = vitlens.load_model("tiny-scenes"), vitlens.load_model("tiny-scenes")
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    with torch.inference_mode():
        before = ce.project(model, x, labels, precision="bfloat16")  # builds the cached bfloat16 head
    with torch.no_grad():
        model.vit.head.weight.mul_(-1)  # every logit difference flips: the cached head must be rebuilt
        fresh.vit.head.weight.mul_(-1)  # the same edit on a model that never projected
    with torch.inference_mode():
        after, expected = (ce.project(m, x, labels, precision="bfloat16") for m in (model, fresh))
    assert all(torch.equal(a, e) for a, e in zip(after, expected))
    assert not torch.equal(before.rank, after.rank)


def test_cli_record_class_rank_goes_through_the_registry(tmp_path):
    path = tmp_path / "ranks"
    assert main(["record", "tiny-scenes", "scenes", str(path), "--n-per-class", "1", "--class-rank", "float32",
                 "--no-progress"]) == 0
    store = vitlens.ActivationStore(path)
    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, n_per_class=1)
    images, labels = torch.stack([data[i]["image"] for i in range(len(data))]), torch.tensor(data.samples["label"])
    with torch.inference_mode():
        _, cache = model.run_with_cache(images)
        last = model.vit.head(model.vit.norm(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]))
    rank = (last > last[torch.arange(len(labels)), :, labels][..., None]).sum(-1)
    np.testing.assert_array_equal(store["class_rank"][:, -1], rank.numpy())
    assert store.outputs["class_rank"].reducer["class"] == "ClassRankReducer"
    bare = tmp_path / "auto"  # --class-rank alone: the reducer's own default, "auto"
    assert main(["record", "tiny-scenes", "scenes", str(bare), "--n-per-class", "1", "--class-rank",
                 "--no-progress"]) == 0
    assert vitlens.ActivationStore(bare).outputs["class_rank"].reducer["precision"] == "auto"
    assert ce.ClassRankReducer().precision == "auto"
