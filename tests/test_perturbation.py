"""Attention and token perturbations (analyses/perturbation.py) on the bundled model."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitlens
from analyses import class_embedding as ce
from analyses import perturbation as pt
from helpers.tiny import SyntheticImages, tiny_model
from vitlens import HookedViT
from vitlens.cli import main
from vitlens.data import load_dataset


@pytest.fixture(scope="module")
def bundled():
    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, mask_resize="area", n_per_class=10)
    images = torch.stack([data[i]["image"] for i in range(6)])
    return model, data, images


def timm_forward_kept(vit, images, index):
    """The kept-token forward written with timm's modules alone: [batch n_keep] indices -> logits."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    x = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return vit.forward_head(vit.norm(vit.blocks(x)))


def test_keeping_every_token_gives_the_unperturbed_logits_exactly(bundled):
    model, _, images = bundled
    with torch.inference_mode():
        assert torch.equal(pt.forward_kept(model, images, torch.ones(6, 37, dtype=torch.bool)), model(images))


def test_forward_kept_matches_a_timm_forward_on_the_kept_tokens(bundled):
    model, _, images = bundled
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 37, generator=generator) < 0.4  # different counts per image
    with torch.inference_mode():
        logits, resid = pt.forward_kept(model, images, keep, return_resid=True)
        for i in range(6):
            index = torch.cat([torch.tensor([0]), keep[i, 1:].nonzero().squeeze(1) + 1])[None]
            torch.testing.assert_close(logits[i:i + 1], timm_forward_kept(model.vit, images[i:i + 1], index))
            dropped = torch.ones(37, dtype=torch.bool)
            dropped[index[0]] = False
            assert resid[i, dropped].isnan().all() and not resid[i, ~dropped].isnan().any()
        indices = torch.tensor([[3, 9], [4, 5], [30, 36], [1, 2], [7, 8], [10, 11]])
        torch.testing.assert_close(pt.forward_kept(model, images, indices),
                                   timm_forward_kept(model.vit, images, torch.cat([torch.zeros(6, 1).long(),
                                                                                   indices], 1)))


def test_attention_patterns(bundled):
    model, _, images = bundled
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(4)]
    seen = {}

    def grab(pattern, hook):
        seen[hook.name] = pattern.clone()

    with torch.inference_mode():
        model.run_with_hooks(images, fwd_hooks=[(n, grab) for n in names])
        original = dict(seen)
        model.run_with_hooks(images, fwd_hooks=pt.attention_hooks(model, "self_only") + [(n, grab) for n in names])
        for name in names:
            assert torch.equal(seen[name][:, :, 1:], torch.eye(37)[1:].expand(6, 4, 36, 37))  # one-hot image rows
        model.run_with_hooks(images, fwd_hooks=pt.attention_hooks(model, "no_cls", layers=[0], heads=[1, 3])
                             + [(n, grab) for n in names])
    edited, before = seen[names[0]], original[names[0]]
    assert (edited[:, [1, 3], 1:, 0] == 0).all()
    assert torch.equal(edited[:, [1, 3], 1:, 1:], before[:, [1, 3], 1:, 1:])  # not renormalised
    assert torch.equal(edited[:, [1, 3], 0], before[:, [1, 3], 0])  # the CLS row is unchanged
    assert torch.equal(edited[:, [0, 2]], before[:, [0, 2]])  # other heads unchanged
    assert (edited[:, [1, 3], 1:].sum(-1) < 1 - 1e-6).all()


def test_ranks_are_minus_one_where_dropped_and_match_the_projection(bundled):
    model, data, images = bundled
    labels = torch.tensor(data.samples.label[:6].to_list())
    masks = torch.stack([data[i]["token_mask"] for i in range(6)])
    with torch.inference_mode():
        ranks = pt.ranks(model, images, labels, "context", token_mask=masks)
        _, cache = model.run_with_cache(images)
        logits = model.unembed(cache["blocks.3.hook_resid_post"])
        full = pt.ranks(model, images, labels, "none")
    object_tokens = masks.reshape(6, -1) > 0
    assert ((ranks[:, 1:] == -1) == ~object_tokens).all() and (ranks[:, 0] >= 0).all()
    expected = (logits > logits[torch.arange(6), :, labels][..., None]).sum(-1)
    assert torch.equal(full, expected)


def test_the_studys_findings_and_compat_token_sets(bundled):
    model, data, _ = bundled
    tables = {kind: pt.run(model, data, kind, batch_size=50) for kind in pt.KINDS}
    for kind, frame in tables.items():
        assert list(frame.columns) == ["kind", "rate", "reference_rate", "accuracy", "reference_accuracy",
                                       "n_images"]
        assert frame.n_images[0] == 100
    none = tables["none"].iloc[0]
    assert none.rate == none.reference_rate and none.accuracy == none.reference_accuracy
    assert tables["self_only"].rate[0] < 0.5 * none.rate  # self_only collapses identifiability
    assert abs(tables["no_cls"].rate[0] - none.rate) < 3  # no_cls barely changes it
    assert tables["context"].accuracy[0] > tables["class_label"].accuracy[0] + 30  # object matters more
    compat = pt.run(model, data, "self_only", compat=True, batch_size=50)
    assert compat.reference_rate[0] == tables["self_only"].reference_rate[0]  # both: image tokens
    assert compat.rate[0] != tables["self_only"].rate[0]  # the study's perturbed rate counts CLS too
    figure = pt.plot(pd.concat(tables.values()))
    assert isinstance(figure, go.Figure) and len(figure.data) == 2


def test_bad_input(bundled, tmp_path):
    model, _, images = bundled
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="token_mask"):
        pt.ranks(model, images, labels, "context")
    with pytest.raises(ValueError, match="segmentation"):
        pt.run(tiny_model(), SyntheticImages(4), "class_label")
    gap = HookedViT.from_timm(VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1,
                                                num_heads=2, class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="no_cls.*class token"):
        pt.attention_hooks(gap, "no_cls")
    with pytest.raises(ValueError, match="unknown"):
        pt.attention_hooks(model, "none_at_all")
    with pytest.raises(ValueError, match="one column per token"):
        pt.forward_kept(model, images, torch.ones(6, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="prefix"):
        pt.forward_kept(model, images, torch.ones(6, 37, dtype=torch.bool).index_fill(1, torch.tensor([0]), False),
                        keep_prefix=False)


def test_cli_context_perturbation(tmp_path, capsys):
    args = ["analyze", "context-perturbation", "--store", str(tmp_path / "s"), "--n-per-class", "2",
            "--no-progress"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "s" / "results" / "context_perturbation.csv")
    assert table.kind.tolist() == ["context", "class_label"]
    assert "context_perturbation" in capsys.readouterr().out
    assert main(args) == 0  # resumed: recorded stores reused
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "s" / "results" / "context_perturbation.csv"), table)


def test_cli_attention_perturbation(tmp_path, capsys):
    args = ["analyze", "attention-perturbation", "--store", str(tmp_path / "s"), "--n-per-class", "1",
            "--no-progress", "--random-twin"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "s" / "results" / "attention_perturbation.csv")
    assert table.kind.tolist() == ["self_only", "no_cls"]
    assert (table.rate[0] < table.reference_rate[0]) and table.n_images.tolist() == [10, 10]
    random = pd.read_csv(tmp_path / "s" / "results" / "attention_perturbation_random.csv")
    twin = ce.random_model(vitlens.load_model("tiny-scenes"))  # the twin's unperturbed accuracy, computed plainly
    data = load_dataset("scenes", model=twin, mask_resize="area", n_per_class=1)
    with torch.inference_mode():
        logits = twin(torch.stack([data[i]["image"] for i in range(len(data))]))
    accuracy = 100 * (logits.argmax(1).numpy() == data.samples["label"].to_numpy()).mean()
    assert random.reference_accuracy.tolist() == pytest.approx([accuracy, accuracy])
    assert (tmp_path / "s-random" / "perturbation" / "self_only").exists()
    assert "attention_perturbation" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", "attention-perturbation", "--help"])
    assert "--compat" in capsys.readouterr().out
