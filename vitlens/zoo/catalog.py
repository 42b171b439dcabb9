"""The zoo's nicknames and weight-file suffixes, importable without torch or timm (the CLI checks its
arguments with them before anything heavy loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

WEIGHT_SUFFIXES = frozenset({".safetensors", ".pth", ".pt", ".bin"})
"""Suffixes of a checkpoint file given as a model name (with ``arch=``)."""


@dataclass(frozen=True)
class ZooEntry:
    """A nickname: the timm architecture (with pretrained tag) and how its weights are found."""

    timm_name: str
    note: str
    kwargs: dict = field(default_factory=dict)
    checkpoint_hint: Optional[str] = None  # weights that exist only as a file from the original authors
    extra_keys: bool = False  # the authors' file also holds weights this architecture does not use
    bundled: Optional[str] = None  # folder under vitlens/zoo/


ZOO: dict[str, ZooEntry] = {
    "tiny-scenes": ZooEntry("vit_tiny_scenes", "bundled 4-block ViT trained on the scene set", bundled="tiny-scenes"),
    "tiny-scenes-gap": ZooEntry("vit_tiny_scenes_gap", "bundled average-pool variant", bundled="tiny-scenes-gap"),
    "vit_b_32": ZooEntry("vit_base_patch32_224.augreg_in21k_ft_in1k", "ViT-B/32, in21k -> in1k (augreg)"),
    "vit_b_16": ZooEntry("vit_base_patch16_224.augreg_in21k_ft_in1k",
                         "ViT-B/16, in21k -> in1k (augreg; the bare timm name now means augreg2)"),
    "vit_l_16": ZooEntry("vit_large_patch16_224.augreg_in21k_ft_in1k", "ViT-L/16, in21k -> in1k (augreg)"),
    "vit_miil_16": ZooEntry("vit_base_patch16_224_miil.in21k_ft_in1k",
                            "ViT-B/16 MIIL, 1000 classes (the bare timm name now has 11,221)"),
    "vit_cifar_16": ZooEntry("vit_base_patch16_224", "ViT-B/16 fine-tuned on CIFAR-100 (vit-cls_emb checkpoint)",
                             kwargs={"num_classes": 100},
                             checkpoint_hint="vit_base_patch16_224-CIFAR100.pt from the vit-cls_emb authors"),
    "deit_ensemble_16": ZooEntry("deit_base_patch16_224", "DeiT-B 'Refinement' model of Naseer et al. (CLS head only)",
                                 checkpoint_hint="deit_base_trm.pth from Naseer et al.'s release",
                                 extra_keys=True),  # its intermediate heads are unused, as in vit-cls_emb
    "vit_gap_16": ZooEntry("vit_base_patch16_rpn_224.sw_in1k", "ViT-B/16, global average pool, post-norm blocks"),
}
