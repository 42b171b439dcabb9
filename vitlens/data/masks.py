"""ImageNet-S segmentation masks: decoding, where the model input lies in the source image (so that masks follow
the same resize and crop as the images), and resizing to a ViT's token grid."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.constants import DEFAULT_CROP_PCT

IGNORE_ID = 1000
MASK_RESIZE_MODES = ("nearest", "area")

Box = tuple[float, float, float, float]
"""(top, left, height, width) in source pixels: the part of the source image the model input shows."""


def decode_segmentation(path: Path | str) -> np.ndarray:
    """Read an ImageNet-S mask PNG as class ids (H, W) int64: id = R + 256·G (0 other/background, 1..N the
    ImageNet-S class, 1000 ignore). A missing or unreadable file raises an error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation mask {path} does not exist; expected an RGB PNG with id = R + 256*G")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except OSError as error:
        raise ValueError(f"cannot read segmentation mask {path}: {error}; expected an RGB PNG") from error
    return rgb[..., 0] + 256 * rgb[..., 1]


def encode_segmentation(ids: np.ndarray) -> Image.Image:
    """Inverse of `decode_segmentation`: ids (H, W) in 0..65535 -> RGB image (id % 256, id // 256, 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and not 0 <= ids.min() <= ids.max() <= 65535:
        raise ValueError(f"segmentation ids {ids.min()}..{ids.max()} do not fit R + 256*G; expected ids in 0..65535")
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def token_mask(ids: np.ndarray, class_id: int, grid: tuple[int, int], box: Box | None = None,
               mode: str = "nearest") -> torch.Tensor:
    """The object `class_id` on a token grid: float tensor (grid_h, grid_w).

    ids: class ids (H, W) from `decode_segmentation`. box: (top, left, height, width) of the source region that
    the model input shows (`input_box`); default the whole image, as in vit-cls_emb.
    mode "nearest": 1.0 where the sampled pixel is the object, with cv2 INTER_NEAREST semantics (token i samples
    row floor(top + i * height / grid_h)); with the whole-image box this equals
    `cv2.resize(mask, (grid_w, grid_h), interpolation=cv2.INTER_NEAREST)`. Ignore pixels count as non-object.
    mode "area": the fraction of each token's area that is the object, leaving out ignore (1000) pixels; a token
    made only of ignore pixels gets 0. Parts of the box outside the image (padding) are background.
    """
    height, width = ids.shape
    grid_h, grid_w = grid
    top, left, box_h, box_w = box if box is not None else (0.0, 0.0, float(height), float(width))
    is_object = ids == class_id
    if mode == "nearest":
        rows, cols = _nearest_indices(top, box_h, grid_h), _nearest_indices(left, box_w, grid_w)
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
        sampled = is_object[np.clip(rows, 0, height - 1)][:, np.clip(cols, 0, width - 1)]
        return torch.from_numpy((sampled & inside).astype(np.float32))
    if mode == "area":
        row_weights = _overlap_weights(top, box_h, grid_h, height)
        col_weights = _overlap_weights(left, box_w, grid_w, width)
        object_area = row_weights @ is_object @ col_weights.T
        valid_area = box_h / grid_h * box_w / grid_w - row_weights @ (ids == IGNORE_ID) @ col_weights.T
        fraction = np.divide(object_area, valid_area, out=np.zeros_like(object_area), where=valid_area > 1e-9)
        return torch.from_numpy(np.clip(fraction, 0.0, 1.0).astype(np.float32))
    raise ValueError(f"unknown mask_resize {mode!r}; expected one of {MASK_RESIZE_MODES}")


def input_box(source_hw: tuple[int, int], data_config: dict | None) -> Box:
    """The region of a source image of size (H, W) that timm's eval transform for `data_config` maps onto the
    model input, as (top, left, height, width) in source pixels.

    Mirrors `timm.data.transforms_imagenet_eval`: scale = floor(input / crop_pct); 'center' resizes the shorter
    side (torchvision `Resize(int)`, or timm `ResizeKeepRatio` for non-square inputs), 'squash' resizes both
    sides, 'border' fits the longer side; then a centre crop (padding when the crop is larger, which gives a
    box reaching outside the image). With no data config the whole image is shown.
    """
    src_h, src_w = source_hw
    if data_config is None:
        return 0.0, 0.0, float(src_h), float(src_w)
    _, out_h, out_w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or "center"
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if crop_mode == "squash":
        resized_h, resized_w = scale_h, scale_w
    elif crop_mode == "center" and scale_h == scale_w:
        short, long = sorted((src_h, src_w))
        new_long = int(scale_h * long / short)
        resized_h, resized_w = (new_long, scale_w) if src_w <= src_h else (scale_h, new_long)
    elif crop_mode in ("center", "border"):
        ratio_h, ratio_w = src_h / scale_h, src_w / scale_w
        ratio = max(ratio_h, ratio_w) if crop_mode == "border" else min(ratio_h, ratio_w)
        resized_h, resized_w = round(src_h / ratio), round(src_w / ratio)
    else:
        raise ValueError(f"unknown crop_mode {crop_mode!r} in data config; expected 'center', 'squash' or 'border'")
    step_h, step_w = src_h / resized_h, src_w / resized_w
    return (_crop_offset(resized_h, out_h) * step_h, _crop_offset(resized_w, out_w) * step_w,
            out_h * src_h / resized_h, out_w * src_w / resized_w)  # exactly the source size when uncropped


def _crop_offset(size: int, crop: int) -> int:
    """Start of a torchvision centre crop of length `crop` in `size` pixels (negative when it pads)."""
    return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))


def _nearest_indices(start: float, length: float, cells: int) -> np.ndarray:
    """cv2 INTER_NEAREST source indices for `cells` cells over [start, start + length): floor(start + i * length /
    cells). With start 0 and length = the source size this is exactly cv2's floor(i * src / dst)."""
    return np.floor(start + np.arange(cells) * length / cells).astype(np.int64)


def _overlap_weights(start: float, length: float, cells: int, pixels: int) -> np.ndarray:
    """(cells, pixels) overlap lengths between cell i = [start + i*length/cells, start + (i+1)*length/cells) and
    pixel p = [p, p + 1)."""
    edges = start + np.arange(cells + 1) * length / cells
    lower = np.maximum.outer(edges[:-1], np.arange(pixels))
    upper = np.minimum.outer(edges[1:], np.arange(pixels) + 1)
    return np.clip(upper - lower, 0.0, None)
