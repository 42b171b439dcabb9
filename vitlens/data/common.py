"""What the datasets share: preprocessing from a timm data config, image reading, and the item dict."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch.utils.data import Dataset

from .masks import MASK_RESIZE_MODES, decode_segmentation, input_box, token_mask

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
SAMPLE_COLUMNS = ["sample_id", "label", "class", "name", "image_path", "mask_path", "seg_id"]


def default_data_config() -> dict:
    """timm's default ImageNet preprocessing: 224 px, bicubic, crop_pct 0.875, centre crop, ImageNet mean/std."""
    return resolve_data_config(pretrained_cfg={"input_size": (3, 224, 224)})


PREPROCESSING = ("timm", "vit-cls_emb")


def vit_cls_emb_config(input_size) -> dict:
    """The class-embedding study's preprocessing as a timm data config (HF ``ViTImageProcessor``): a PIL bilinear
    resize of the whole image to `input_size` (C, H, W), no crop, x/255, then (x - 0.5) / 0.5. Masks then go to
    the token grid from the full-resolution mask (the whole image is shown)."""
    return {"input_size": tuple(input_size), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "squash", "preprocessing": "vit-cls_emb"}


def resolve_preprocessing(model=None, data_config: dict | None = None, transform: Callable | None = None,
                          grid: tuple[int, int] | None = None, preprocessing: str = "timm"):
    """Pick the data config, image transform and token grid.

    `model` supplies `model.data_config` (a timm data-config dict) and `model.layout.grid` (tokens (h, w));
    explicit `data_config`, `transform` and `grid` win over the model's. `preprocessing="vit-cls_emb"` replaces
    the model's config with :func:`vit_cls_emb_config` at the model's input size. The data config also fixes
    the mask geometry; a bare `transform` without any data config is taken to show the whole image (no crop).
    Returns (data_config or None, transform, grid or None).
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; expected one of {PREPROCESSING}")
    if preprocessing != "timm":
        if data_config is not None or transform is not None:
            raise ValueError(f"preprocessing={preprocessing!r} sets the transform itself; drop data_config= and "
                             "transform=, or drop preprocessing=")
        if model is None:
            raise ValueError(f"preprocessing={preprocessing!r} resizes to the model's input size: pass model=")
        data_config = vit_cls_emb_config(model.data_config["input_size"])
    if model is not None:
        data_config = data_config if data_config is not None else model.data_config
        grid = grid if grid is not None else model.layout.grid
    if data_config is None and transform is None:
        data_config = default_data_config()
    if transform is None:
        transform = create_transform(**{k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config})
    return data_config, transform, (tuple(int(g) for g in grid) if grid is not None else None)


def imagenet_synsets() -> pd.DataFrame:
    """timm's ImageNet-1k classes: DataFrame with columns (wnid, name), row i = output index i."""
    info = ImageNetInfo()
    return pd.DataFrame({"wnid": info.label_names(),
                         "name": [info.index_to_description(i) for i in range(info.num_classes())]})


def class_images(folder: Path, expected: str, skip: frozenset[str] = frozenset()) -> dict[str, list[Path]]:
    """The image files of each class folder `folder/<class>/`, classes and files sorted by name, leaving out the
    classes in `skip`. No class folder, or a class folder without images, is an error (`expected` names the
    layout)."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{folder} has no class folders; expected {expected}")
    files = {d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
             for d in class_dirs if d.name not in skip}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise ValueError(f"class folders {empty[:5]} in {folder} hold no images; expected {expected} "
                         "with extensions such as .jpg, .png")
    return files


def first_per_class(chosen: pd.DataFrame, n_per_class: int | None, source: Path) -> pd.DataFrame:
    """The first `n_per_class` rows of each class (column "class"), dropping classes with fewer rows, as the
    seeds do; None keeps every row. An empty selection is an error naming `source`."""
    if n_per_class is not None:
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be at least 1 (got {n_per_class}); pass None to keep every image")
        counts = chosen["class"].map(chosen["class"].value_counts())
        chosen = chosen[counts >= n_per_class].groupby("class").head(n_per_class)
    if chosen.empty:
        fewer = f" with n_per_class={n_per_class} (every class has fewer images)" if n_per_class else ""
        raise ValueError(f"no images selected from {source}{fewer}; expected at least one image")
    return chosen


def load_rgb(path: Path | str) -> Image.Image:
    """Read an image as RGB (grayscale, palette and RGBA images are converted); a bad file names its path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}; expected a readable image file (JPEG, PNG, ...)") \
            from error


class ImageDataset(Dataset):
    """Items built from the rows of `self.samples` (columns `SAMPLE_COLUMNS`, one row per item, in order).

    An item is a dict: "image" float tensor (C, H, W) from the transform; "label" int (model output index);
    "sample_id" str; "index" int (position in the dataset); and, when the sample has a mask and a token grid is
    known, "token_mask" float tensor (grid_h, grid_w) of the object (see `masks.token_mask`). The mask follows
    the image's resize and crop (`masks.input_box` of the data config). All of it collates with the default
    DataLoader collate.
    """

    def __init__(self, samples: pd.DataFrame, classes: list[str], *, data_config: dict | None,
                 transform: Callable, grid: tuple[int, int] | None, mask_resize: str):
        if mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"unknown mask_resize {mask_resize!r}; expected one of {MASK_RESIZE_MODES}")
        self.samples = samples.reset_index(drop=True)[SAMPLE_COLUMNS]
        self.classes = classes
        self.data_config = data_config
        self.transform = transform
        self.grid = grid
        self.mask_resize = mask_resize
        self._rows = self.samples.to_dict("records")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]
        image = load_rgb(row["image_path"])
        pixels = self.transform(image)
        if not (isinstance(pixels, torch.Tensor) and pixels.ndim == 3 and pixels.is_floating_point()):
            raise TypeError("the transform must return a float tensor (C, H, W); "
                            f"got {type(pixels).__name__} {getattr(pixels, 'shape', '')}")
        item = {"image": pixels, "label": int(row["label"]), "sample_id": row["sample_id"], "index": index}
        if self.grid is not None and isinstance(row["mask_path"], str):
            ids = decode_segmentation(row["mask_path"])
            if ids.shape != (image.height, image.width):
                raise ValueError(f"segmentation mask {row['mask_path']} is {ids.shape[1]}x{ids.shape[0]} but its "
                                 f"image {row['image_path']} is {image.width}x{image.height}; expected equal sizes")
            item["token_mask"] = token_mask(ids, int(row["seg_id"]), self.grid, input_box(ids.shape, self.data_config),
                                            self.mask_resize)
        return item
