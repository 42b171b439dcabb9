"""The shipped tiny scene ViTs: they load with plain timm, carry the right preprocessing, and classify the
held-out scenes; the object tokens carry most of the class evidence and the context tokens a weaker part."""
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

import vitlens
from vitlens.data import ensure_scenes, load_dataset

ZOO = Path(vitlens.__file__).parent / "zoo"
SHIPPED = sorted(p.name for p in ZOO.glob("tiny-scenes*") if (p / "model.safetensors").is_file())


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    """200 held-out validation scenes (20 per class) with object-area token masks."""
    root = ensure_scenes(tmp_path_factory.mktemp("scenes"), seed=0)
    dataset = load_dataset("scenes", root=root.parent, n_per_class=20, mask_resize="area")
    return next(iter(DataLoader(dataset, batch_size=len(dataset))))


def load_shipped(name: str) -> torch.nn.Module:
    return timm.create_model("local-dir:" + str(ZOO / name), pretrained=True).eval()


@torch.no_grad()
def accuracy_with_tokens(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         keep: torch.Tensor | None = None) -> float:
    """Top-1 accuracy when only the patch tokens in keep (B, grid_h, grid_w) stay after the position embedding
    (prefix tokens always stay), as in vit-cls_emb's token perturbation."""
    correct = 0
    for i in range(len(images)):
        tokens = model._pos_embed(model.patch_embed(images[i:i + 1]))
        if keep is not None:
            patches = tokens[:, model.num_prefix_tokens:][:, keep[i].flatten().bool()]
            tokens = torch.cat([tokens[:, :model.num_prefix_tokens], patches], dim=1)
        logits = model.forward_head(model.norm(model.blocks(model.norm_pre(tokens))))
        correct += int(logits.argmax(-1).item() == labels[i].item())
    return correct / len(images)


def test_tiny_model_is_shipped():
    assert "tiny-scenes" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_config_and_accuracy(name, held_out):
    model = load_shipped(name)
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 48, 48) and config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == (0.5, 0.5, 0.5) and tuple(config["std"]) == (0.5, 0.5, 0.5)
    assert model.patch_embed.grid_size == (6, 6) and model.num_classes == 10
    with torch.no_grad():
        predictions = model(held_out["image"]).argmax(-1)
    accuracy = (predictions == held_out["label"]).float().mean().item()
    assert accuracy >= 0.9
    record = json.loads((ZOO / name / "training.json").read_text())
    assert record["val_acc"] >= 0.9 and record["wall_time_s"] < 600


def test_object_tokens_carry_most_evidence_and_context_some(held_out):
    """Object tokens = any digit pixel in the patch; context tokens = none. (With the nearest masks, which look at
    one pixel per patch, many patches holding digit strokes count as context.)"""
    model = load_shipped("tiny-scenes")
    images, labels, has_object = held_out["image"], held_out["label"], held_out["token_mask"] > 0
    with torch.no_grad():
        forward = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy_with_tokens(model, images, labels) == pytest.approx(forward)  # the token path is the forward
    object_only = accuracy_with_tokens(model, images, labels, has_object)
    context_only = accuracy_with_tokens(model, images, labels, ~has_object)
    assert object_only >= 0.8
    assert 0.12 < context_only < 0.5  # above chance: the background tint agrees with the label 75% of the time
