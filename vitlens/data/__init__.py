"""Datasets for analyses: ImageNet-S (images, masks on the token grid, the seeds' stimuli CSV), labelled image
folders, and the bundled scene set that needs nothing downloaded.

Every dataset yields dicts {"image", "label", "sample_id", "index"} plus "token_mask" where masks exist, and
exposes `.samples` (a DataFrame in item order) and `.classes`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from .common import PREPROCESSING, ImageDataset, load_rgb, vit_cls_emb_config
from .folder import ImageFolderDataset
from .imagenet_s import CATS_EXCLUDE_919, STIM_INFO_COLUMNS, ImageNetS, is_imagenet_s, read_synset_mapping
from .masks import IGNORE_ID, decode_segmentation, encode_segmentation, input_box, token_mask
from .scenes import DATA_CONFIG as SCENES_DATA_CONFIG
from .scenes import GRID as SCENES_GRID
from .scenes import cache_dir, ensure_scenes, render_scene, train_scenes, write_scenes

__all__ = [
    "CATS_EXCLUDE_919", "IGNORE_ID", "PREPROCESSING", "SCENES_DATA_CONFIG", "SCENES_GRID", "STIM_INFO_COLUMNS", "ImageDataset",
    "ImageFolderDataset", "ImageNetS", "cache_dir", "decode_segmentation", "encode_segmentation", "ensure_scenes",
    "input_box", "load_dataset", "load_rgb", "read_synset_mapping", "render_scene", "token_mask", "train_scenes",
    "vit_cls_emb_config", "write_scenes",
]


def load_dataset(name_or_root: str | Path, split: str = "validation", *, model=None, data_config: dict | None = None,
                 transform: Callable | None = None, grid: tuple[int, int] | None = None,
                 mask_resize: str = "nearest", n_per_class: int | None = None, variant: int | None = None,
                 stimuli: Path | str | bool | None = None, root: Path | str | None = None,
                 seed: int = 0, preprocessing: str = "timm") -> Dataset:
    """A dataset by name or path, preprocessed for `model`.

    name_or_root: "scenes" (the bundled scene set, generated on first use under `root` or `cache_dir()` with
    `seed`), an ImageNet-S root (holding `ImageNetS{N}/`, see `ImageNetS`), or a labelled image folder
    `root/<class>/<image>` (`ImageFolderDataset`; `split`, `variant`, `stimuli`, `grid` and `mask_resize` do
    not apply and must keep their defaults). `n_per_class` keeps the first n images of each class.
    Preprocessing: timm's eval transform for `model.data_config`, tokens from `model.layout.grid`; explicit
    `data_config`, `transform` or `grid` win. `preprocessing="vit-cls_emb"` is the class-embedding study's
    instead: a PIL bilinear resize to the model's input size with no crop, x/255, (x - 0.5)/0.5, and token masks
    by nearest from the full-resolution mask (`vit_cls_emb_config`; it needs `model`). Paths may start with `~`.
    Without a model: the scenes' own config and 6x6 grid; timm's default ImageNet config and no token masks for
    ImageNet-S (pass `grid=`). Masks follow the image's resize
    and crop; `mask_resize` "nearest" gives 0/1 tokens (cv2 INTER_NEAREST), "area" object fractions.
    Images are read as RGB (grayscale is converted).
    """
    if isinstance(name_or_root, str) and name_or_root == "scenes":
        if split != "validation":
            raise ValueError(f"the scene set has only a 'validation' split on disk (got {split!r}); training "
                             "scenes come from vitlens.data.train_scenes")
        if model is None and transform is None and data_config is None and preprocessing == "timm":
            data_config = SCENES_DATA_CONFIG
        if model is None and grid is None:
            grid = SCENES_GRID
        return ImageNetS(ensure_scenes(root, seed=seed), split, model=model, data_config=data_config,
                         transform=transform, grid=grid, mask_resize=mask_resize, n_per_class=n_per_class,
                         stimuli=stimuli, preprocessing=preprocessing)
    path = Path(name_or_root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {path} does not exist; expected 'scenes', an ImageNet-S root holding "
                                "ImageNetS919/ (or 300/50), or an image folder root/<class>/<image>")
    if is_imagenet_s(path):
        return ImageNetS(path, split, variant=variant, model=model, data_config=data_config, transform=transform,
                         grid=grid, mask_resize=mask_resize, n_per_class=n_per_class, stimuli=stimuli,
                         preprocessing=preprocessing)
    changed = {"split": split != "validation", "variant": variant is not None, "stimuli": stimuli not in (None, False),
               "grid": grid is not None, "mask_resize": mask_resize != "nearest"}
    not_applying = [name for name, is_set in changed.items() if is_set]
    if not_applying:
        raise ValueError(f"{', '.join(not_applying)} do not apply to the image folder {path} (it has no splits, "
                         "variants, stimuli CSV or masks); leave them at their defaults, or pass an ImageNet-S root")
    return ImageFolderDataset(path, model=model, data_config=data_config, transform=transform,
                              n_per_class=n_per_class, preprocessing=preprocessing)
