"""vitlens.data: ImageNet-S reading (layout, labels, masks on the token grid, stimuli CSV), image folders, the
bundled scene set, and the errors on bad input. Offline; the ImageNet-S fixture is built in the real layout."""
import filecmp
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from vitlens.data import (IGNORE_ID, ImageFolderDataset, ImageNetS, decode_segmentation, encode_segmentation,
                          ensure_scenes, input_box, load_dataset, token_mask, train_scenes)
from vitlens.data.scenes import CLASS_NAMES, SCENES_PER_CLASS, digit_split

# Real wnids and their ImageNet-1k indices. (The spec calls n07747607 "lemon"; it is orange, so lemon is n07749582.)
IMAGENET_INDEX = {"n01443537": 1, "n01531178": 11, "n02123597": 284, "n07749582": 951, "n04355933": 836}
IMAGES_PER_CLASS = {"n01443537": 3, "n01531178": 3, "n02123597": 3, "n07749582": 2, "n04355933": 3}
HEIGHT, WIDTH = 96, 128


def _ellipse_scene(rng: np.random.Generator, class_id: int) -> tuple[Image.Image, np.ndarray]:
    """96x128 noise with a tinted ellipse; ids: class_id on the ellipse, a 2-px ring of 1000, 0 elsewhere."""
    top, left = rng.integers(5, 40), rng.integers(5, 60)
    box = (left, top, left + rng.integers(30, 60), top + rng.integers(25, 50))
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    outer, inner = Image.new("L", (WIDTH, HEIGHT)), Image.new("L", (WIDTH, HEIGHT))
    ImageDraw.Draw(outer).ellipse((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=1)
    ImageDraw.Draw(inner).ellipse(box, fill=1)
    ids = np.where(np.asarray(outer) > 0, IGNORE_ID, 0)
    ids[np.asarray(inner) > 0] = class_id
    return image, ids


def build_imagenet_s(root: Path, stim_csv: bool = True) -> Path:
    """The spec's C.4 fixture: ImageNetS919 layout, a sorted category subset, LOC from timm's synsets + lemmas."""
    variant = root / "ImageNetS919"
    categories = sorted(IMAGES_PER_CLASS)
    (root / "data" / "categories").mkdir(parents=True)
    (root / "data" / "categories" / "ImageNetS_categories_im919.txt").write_text("\n".join(categories) + "\n")
    info_dir = Path(timm.__file__).parent / "data" / "_info"
    lemmas = dict(line.split("\t", 1) for line in (info_dir / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    synsets = (info_dir / "imagenet_synsets.txt").read_text().split()
    variant.mkdir(parents=True)
    (variant / "LOC_synset_mapping.txt").write_text("".join(f"{w} {lemmas[w]}\n" for w in synsets))
    rng = np.random.default_rng(0)
    rows, number = [], 0
    for wnid in categories:
        (variant / "validation" / wnid).mkdir(parents=True)
        (variant / "validation-segmentation" / wnid).mkdir(parents=True)
        for k in range(IMAGES_PER_CLASS[wnid]):
            number += 1
            stem = f"ILSVRC2012_val_{number:08d}"
            image, ids = _ellipse_scene(rng, categories.index(wnid) + 1)
            image.save(variant / "validation" / wnid / f"{stem}.JPEG", quality=90)
            encode_segmentation(ids).save(variant / "validation-segmentation" / wnid / f"{stem}.png")
            rows.append((wnid, IMAGENET_INDEX[wnid], lemmas[wnid], f"{stem}.JPEG", k))
    if stim_csv:
        pd.DataFrame(rows, columns=["imagenet_id", "index", "cat", "img_name", "img_index"]).to_csv(
            variant / "validation_stim_info.csv", index=False)
    return root


@pytest.fixture
def imagenet_s(tmp_path) -> Path:
    return build_imagenet_s(tmp_path / "imagenet-s", stim_csv=False)


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    return ensure_scenes(tmp_path_factory.mktemp("cache-a"), seed=0)


def test_labels_are_loc_rows_and_seg_ids_are_category_rows(imagenet_s):
    ds = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)
    kept = [w for w in sorted(IMAGES_PER_CLASS) if w != "n04355933"]  # sunglass is in the 919 exclusion list
    assert ds.classes == kept
    assert len(ds) == sum(IMAGES_PER_CLASS[w] for w in kept)
    loc = (imagenet_s / "ImageNetS919" / "LOC_synset_mapping.txt").read_text().splitlines()
    for row in ds.samples.itertuples():
        assert row.label == IMAGENET_INDEX[row._3] == next(i for i, line in enumerate(loc) if line.startswith(row._3))
        assert row.seg_id == sorted(IMAGES_PER_CLASS).index(row._3) + 1
    assert ds.samples.loc[0, "sample_id"] == "n01443537/ILSVRC2012_val_00000001"
    assert ds.samples.loc[0, "name"] == "goldfish, Carassius auratus"
    assert ds.label_names[284] == "Siamese cat, Siamese"
    item = ds[4]
    assert item["label"] == ds.samples.loc[4, "label"] and item["index"] == 4
    assert item["sample_id"] == ds.samples.loc[4, "sample_id"] and "token_mask" not in item  # no grid given


def test_without_loc_file_labels_come_from_timm(imagenet_s):
    (imagenet_s / "ImageNetS919" / "LOC_synset_mapping.txt").unlink()
    ds = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)
    assert dict(zip(ds.samples["class"], ds.samples["label"])) == {w: IMAGENET_INDEX[w] for w in ds.classes}


def test_masks_decode_to_background_class_and_ignore(imagenet_s):
    ds = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)
    for row in ds.samples.itertuples():
        ids = decode_segmentation(row.mask_path)
        assert ids.shape == (HEIGHT, WIDTH)
        assert set(np.unique(ids)) == {0, row.seg_id, IGNORE_ID}


def test_token_masks_match_hand_computed_nearest_and_area(imagenet_s):
    ds = ImageNetS(imagenet_s, transform=ToTensor(), grid=(4, 4), stimuli=False)
    ds_area = ImageNetS(imagenet_s, transform=ToTensor(), grid=(4, 4), mask_resize="area", stimuli=False)
    for index, row in enumerate(ds.samples.itertuples()):
        ids = decode_segmentation(row.mask_path)
        # cv2 INTER_NEAREST: token (r, c) samples pixel (floor(r * 96 / 4), floor(c * 128 / 4)) = (24 r, 32 c).
        nearest = [[float(ids[24 * r, 32 * c] == row.seg_id) for c in range(4)] for r in range(4)]
        assert ds[index]["token_mask"].tolist() == nearest
        blocks = ids.reshape(4, 24, 4, 32).transpose(0, 2, 1, 3).reshape(4, 4, -1)
        fraction = (blocks == row.seg_id).sum(-1) / (blocks != IGNORE_ID).sum(-1)
        area = ds_area[index]["token_mask"]
        np.testing.assert_allclose(area.numpy(), fraction, atol=1e-6)
        assert 0 < area.max() <= 1 and area.min() == 0


def test_area_fraction_with_partial_pixels():
    """3x3 ids on a 2x2 grid: each token covers 1.5 x 1.5 pixels, so pixels on the middle row/column are split."""
    ids = np.array([[5, 5, 0],
                    [0, IGNORE_ID, 0],
                    [0, 0, 5]])
    got = token_mask(ids, 5, (2, 2), mode="area").numpy()
    # token (0, 0): object 1 + 0.5 (pixel (0,1)); ignore 0.25 (centre); area 2.25 -> 1.5 / 2.0
    # token (0, 1): object 0.5 (pixel (0,1)); ignore 0.25 -> 0.5 / 2.0; token (1, 1): object 1 -> 1 / 2.0
    np.testing.assert_allclose(got, [[0.75, 0.25], [0.0, 0.5]], atol=1e-6)
    # nearest samples pixels (0, 0), (0, 1), (1, 0), (1, 1): object, object, background, ignore
    assert token_mask(ids, 5, (2, 2)).tolist() == [[1.0, 1.0], [0.0, 0.0]]


@pytest.mark.parametrize("input_size, crop_pct, crop_mode", [
    ((3, 32, 32), 0.875, "center"), ((3, 32, 40), 0.9, "center"), ((3, 32, 32), 0.9, "squash"),
    ((3, 40, 32), 1.0, "border"), ((3, 48, 48), 1.0, "center")])
def test_mask_geometry_follows_timm_transform(input_size, crop_pct, crop_mode):
    """Feed timm's eval transform (nearest) an image whose pixels hold their own coordinates + 1; the source pixel
    behind each output pixel must be the one `input_box` predicts (0 where the transform pads)."""
    rows, cols = np.mgrid[0:90, 0:120]
    coords = np.stack([cols + 1, rows + 1, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    transform = create_transform(input_size=input_size, interpolation="nearest", crop_pct=crop_pct,
                                 crop_mode=crop_mode, mean=(0, 0, 0), std=(1, 1, 1))
    seen = (transform(Image.fromarray(coords)) * 255).round().long()
    top, left, height, width = input_box((90, 120), {"input_size": input_size, "crop_pct": crop_pct,
                                                      "crop_mode": crop_mode})
    src_rows = np.floor(top + (np.arange(input_size[1]) + 0.5) * height / input_size[1]).astype(int)
    src_cols = np.floor(left + (np.arange(input_size[2]) + 0.5) * width / input_size[2]).astype(int)
    expected_cols = np.where((src_cols >= 0) & (src_cols < 120), src_cols + 1, 0)
    expected_rows = np.where((src_rows >= 0) & (src_rows < 90), src_rows + 1, 0)
    inside = (expected_rows > 0)[:, None] & (expected_cols > 0)[None, :]
    for seen_coords, expected in ((seen[0], np.where(inside, expected_cols[None, :], 0)),
                                  (seen[1], np.where(inside, expected_rows[:, None], 0))):
        # PIL's fixed-point nearest rounds a few boundary rows differently; a misplaced box would be off by >= 2
        difference = np.abs(seen_coords.numpy() - expected)
        assert difference.max() <= 1 and (difference == 0).mean() > 0.9


def test_token_mask_follows_centre_crop(imagenet_s):
    """With crop_pct 0.875 the token mask is taken from the cropped region, not the whole image."""
    config = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875, "crop_mode": "center"}
    model = SimpleNamespace(data_config=config, layout=SimpleNamespace(grid=(4, 4)))
    ds = load_dataset(imagenet_s, model=model, stimuli=False)
    row = ds.samples.iloc[0]
    ids = decode_segmentation(row.mask_path)
    # resize shorter side 96 -> 73 (width 128 -> int(73 * 128 / 96) = 97), crop 64: offsets 4 and 16 px.
    step = 96 / 73
    top, left = 4 * step, 16 * step
    nearest = [[float(ids[int(np.floor(top + r * 16 * step)), int(np.floor(left + c * 16 * step))] == row.seg_id)
                for c in range(4)] for r in range(4)]
    item = ds[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["token_mask"].tolist() == nearest
    assert item["token_mask"].tolist() != token_mask(ids, int(row.seg_id), (4, 4)).tolist()  # uncropped differs


def test_stimuli_csv_honoured_and_built_sorted(imagenet_s):
    variant = imagenet_s / "ImageNetS919"
    built = ImageNetS(imagenet_s, transform=ToTensor(), n_per_class=3)
    # the seeds' rules: first n sorted files, classes with fewer than n (lemon: 2) and CATS_EXCLUDE left out
    assert built.classes == ["n01443537", "n01531178", "n02123597"]
    assert built.stim_info["img_name"].tolist()[:3] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    assert built.stim_info["img_index"].tolist() == [0, 1, 2] * 3
    path = built.save_stim_info()
    assert path == variant / "validation_stim_info.csv"
    assert pd.read_csv(path).columns.tolist() == ["imagenet_id", "index", "cat", "img_name", "img_index"]
    custom = pd.DataFrame({"imagenet_id": ["n07749582", "n01443537"], "index": [951, 1], "cat": ["lemon", "goldfish"],
                           "img_name": ["ILSVRC2012_val_00000013.JPEG", "ILSVRC2012_val_00000003.JPEG"],
                           "img_index": [0, 0]})
    custom.to_csv(path, index=False)
    honoured = ImageNetS(imagenet_s, transform=ToTensor())
    assert honoured.samples["sample_id"].tolist() == ["n01443537/ILSVRC2012_val_00000003",
                                                       "n07749582/ILSVRC2012_val_00000013"]
    assert honoured.samples["label"].tolist() == [1, 951]
    assert len(ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)) == 11


def test_items_collate_and_variant_folder_path(imagenet_s):
    ds = load_dataset(imagenet_s / "ImageNetS919", grid=(7, 7), stimuli=False)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["token_mask"].shape == (4, 7, 7)
    assert batch["label"].tolist() == [1, 1, 1, 11] and batch["index"].tolist() == [0, 1, 2, 3]


def test_missing_segmentation_file_is_an_error(imagenet_s):
    mask = imagenet_s / "ImageNetS919" / "validation-segmentation" / "n01531178" / "ILSVRC2012_val_00000005.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_00000005.png"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)


def test_unknown_class_folder_is_an_error(imagenet_s):
    (imagenet_s / "ImageNetS919" / "validation" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999.*ImageNetS_categories_im919.txt"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)


def test_empty_class_folder_is_an_error(imagenet_s):
    folder = imagenet_s / "ImageNetS919" / "validation" / "n02123597"
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="n02123597.*hold no images"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)


def test_corrupt_image_is_an_error_naming_it(imagenet_s):
    path = imagenet_s / "ImageNetS919" / "validation" / "n01443537" / "ILSVRC2012_val_00000002.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    ds = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)
    ds[0]
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000002.JPEG"):
        ds[1]


def test_grayscale_image_becomes_rgb(imagenet_s):
    path = imagenet_s / "ImageNetS919" / "validation" / "n01443537" / "ILSVRC2012_val_00000002.JPEG"
    Image.open(path).convert("L").save(path)
    assert Image.open(path).mode == "L"
    image = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)[1]["image"]
    assert image.shape == (3, HEIGHT, WIDTH)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_missing_root_and_bad_categories_are_errors(tmp_path, imagenet_s):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    (imagenet_s / "data" / "categories" / "ImageNetS_categories_im919.txt").rename(tmp_path / "moved.txt")
    with pytest.raises(FileNotFoundError, match="ImageNetS_categories_im919.txt"):
        ImageNetS(imagenet_s)
    (tmp_path / "moved.txt").rename(imagenet_s / "ImageNetS919" / "ImageNetS_categories_im919.txt")
    assert len(ImageNetS(imagenet_s, stimuli=False)) == 11  # also accepted inside the ImageNetS919 folder


def test_image_folder_labels(tmp_path):
    for name in ("n01531178", "n01443537"):
        (tmp_path / "wnids" / name).mkdir(parents=True)
        Image.new("RGB", (20, 30), (10, 200, 30)).save(tmp_path / "wnids" / name / "b.png")
        Image.new("L", (20, 30), 99).save(tmp_path / "wnids" / name / "a.jpg")
    ds = load_dataset(tmp_path / "wnids", transform=ToTensor())
    assert isinstance(ds, ImageFolderDataset)
    assert ds.samples["sample_id"].tolist() == ["n01443537/a", "n01443537/b", "n01531178/a", "n01531178/b"]
    assert ds.samples["label"].tolist() == [1, 1, 11, 11]  # ImageNet-1k indices for wnid folders
    assert ds[0]["image"].shape == (3, 30, 20) and "token_mask" not in ds[0]
    (tmp_path / "plain" / "cats").mkdir(parents=True)
    (tmp_path / "plain" / "ants").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "cats" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "ants" / "y.png")
    assert load_dataset(tmp_path / "plain").samples["label"].tolist() == [0, 1]
    (tmp_path / "plain" / "bees").mkdir()
    with pytest.raises(ValueError, match="bees"):
        load_dataset(tmp_path / "plain")


def test_scene_set_layout_and_masks(scenes_root):
    ds = load_dataset("scenes", root=scenes_root.parent)
    assert len(ds) == 10 * SCENES_PER_CLASS and ds.classes == list(CLASS_NAMES)
    assert (scenes_root / "data" / "categories" / "ImageNetS_categories_im10.txt").read_text().split() == \
        list(CLASS_NAMES)
    loc = (scenes_root / "ImageNetS10" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert loc[3] == "digit3 three"
    assert (ds.samples["label"] == ds.samples["class"].str[-1].astype(int)).all()
    assert (ds.samples["seg_id"] == ds.samples["label"] + 1).all()
    stim = pd.read_csv(scenes_root / "ImageNetS10" / "validation_stim_info.csv")
    assert stim.equals(stim.sort_values(["imagenet_id", "img_name"]).reset_index(drop=True))
    masks = torch.stack([ds[i]["token_mask"] for i in range(0, len(ds), 5)])
    assert masks.shape == (100, 6, 6)
    object_tokens = masks.sum((1, 2))
    assert (object_tokens >= 1).all() and (object_tokens <= 35).all()  # object and context tokens in every image
    for row in ds.samples.iloc[::50].itertuples():
        assert set(np.unique(decode_segmentation(row.mask_path))) == {0, row.seg_id, IGNORE_ID}
    assert ds[0]["image"].shape == (3, 48, 48) and -1 <= ds[0]["image"].min() < ds[0]["image"].max() <= 1


def test_scene_set_bytes_are_reproducible(scenes_root, tmp_path):
    again = ensure_scenes(tmp_path / "cache-b", seed=0)
    files = sorted(str(p.relative_to(scenes_root)) for p in scenes_root.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert len(files) == 2 * 10 * SCENES_PER_CLASS + 3
    match, mismatch, errors = filecmp.cmpfiles(scenes_root, again, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    assert os.listdir(tmp_path / "cache-b") == ["scenes-v1-seed0"]  # no staging folder left behind
    other = ensure_scenes(tmp_path / "cache-b", seed=1)
    image = "ImageNetS10/validation/digit0/ILSVRC2012_val_00000001.JPEG"
    assert (other / image).read_bytes() != (scenes_root / image).read_bytes()


def test_existing_scene_set_is_reused(scenes_root):
    marker = scenes_root / "ImageNetS10" / "validation_stim_info.csv"
    before = marker.stat().st_mtime_ns
    assert ensure_scenes(scenes_root.parent, seed=0) == scenes_root
    assert marker.stat().st_mtime_ns == before


def test_training_scenes_are_deterministic_and_use_only_training_digits():
    first = next(train_scenes(3, seed=0, batch_size=16))
    again = next(train_scenes(3, seed=0, batch_size=16))
    other = next(train_scenes(4, seed=0, batch_size=16))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (16, 3, 48, 48) and first[0].dtype == torch.float32 and first[1].dtype == torch.int64
    train_digits, train_labels, held_out, held_labels = digit_split()
    assert len(train_digits) == 4000 and len(held_out) == 1000
    assert np.bincount(train_labels, minlength=10).min() > 300 and np.bincount(held_labels).min() >= SCENES_PER_CLASS
    assert not {d.tobytes() for d in train_digits} & {d.tobytes() for d in held_out}


def test_stimuli_true_reads_the_default_csv(imagenet_s):
    with pytest.raises(FileNotFoundError, match="validation_stim_info.csv does not exist.*stimuli=False"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=True)
    ImageNetS(imagenet_s, transform=ToTensor(), n_per_class=3).save_stim_info()
    assert len(ImageNetS(imagenet_s, transform=ToTensor(), stimuli=True)) == 9


@pytest.mark.parametrize("n_per_class", [0, -1])
def test_n_per_class_below_one_is_an_error(imagenet_s, n_per_class):
    with pytest.raises(ValueError, match=f"n_per_class must be at least 1 \\(got {n_per_class}\\)"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False, n_per_class=n_per_class)


def test_empty_selection_is_an_error_naming_the_folder(imagenet_s):
    split = imagenet_s / "ImageNetS919" / "validation"
    with pytest.raises(ValueError, match=f"no images selected from {split} with n_per_class=4"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False, n_per_class=4)
    for folder in split.iterdir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    with pytest.raises(ValueError, match=f"{split} has no class folders"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False)


@pytest.mark.parametrize("index", [-1, 1000])
def test_stimuli_index_out_of_range_is_an_error(imagenet_s, index):
    path = imagenet_s / "stim.csv"
    pd.DataFrame({"imagenet_id": ["n01443537", "n01531178"], "index": [1, index], "cat": ["goldfish", "finch"],
                  "img_name": ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG"],
                  "img_index": [0, 0]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=f"\\('ILSVRC2012_val_00000004.JPEG', {index}\\).*expected 0..999"):
        ImageNetS(imagenet_s, transform=ToTensor(), stimuli=path)


def test_image_folder_takes_n_per_class_and_refuses_imagenet_s_options(tmp_path):
    for name in ("ants", "bees"):
        (tmp_path / name).mkdir()
        for stem in ("a", "b"):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{stem}.png")
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    ds = load_dataset(tmp_path, transform=ToTensor(), n_per_class=2)
    assert ds.samples["sample_id"].tolist() == ["ants/a", "ants/b", "bees/a", "bees/b"]
    assert ds.samples["label"].tolist() == [0, 0, 1, 1]
    assert len(load_dataset(tmp_path, transform=ToTensor(), stimuli=False)) == 5  # defaults are fine
    with pytest.raises(ValueError, match="split, grid do not apply to the image folder"):
        load_dataset(tmp_path, "train", grid=(4, 4))


def test_encode_segmentation_refuses_ids_it_cannot_store():
    assert np.asarray(encode_segmentation(np.array([[65535]]))).tolist() == [[[255, 255, 0]]]
    for ids in ([[0, 65536]], [[-1, 3]]):
        with pytest.raises(ValueError, match="expected ids in 0..65535"):
            encode_segmentation(np.array(ids))


def test_hand_made_mask_png_decodes_as_r_plus_256_g(tmp_path):
    """Fails if encode and decode were both swapped to G + 256 R (a round trip alone would not notice)."""
    pixels = np.zeros((4, 5, 3), dtype=np.uint8)
    pixels[1, 2] = (232, 3, 0)  # 232 + 256 * 3 = 1000, the ignore id
    pixels[3, 4] = (7, 0, 0)  # class 7
    Image.fromarray(pixels, "RGB").save(tmp_path / "mask.png")
    ids = decode_segmentation(tmp_path / "mask.png")
    assert ids[1, 2] == IGNORE_ID == 1000 and ids[3, 4] == 7 and ids.sum() == 1007
    encoded = np.asarray(encode_segmentation(np.array([[1000, 7]])))
    assert encoded.tolist() == [[[232, 3, 0], [7, 0, 0]]]


def test_stimuli_csv_order_is_img_index_not_file_name(imagenet_s):
    variant = imagenet_s / "ImageNetS919"
    files = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]  # goldfish, sorted by name
    rows = pd.DataFrame({"imagenet_id": ["n01531178", "n01443537", "n01443537", "n01443537"],
                         "index": [11, 1, 1, 1], "cat": ["brambling", "goldfish", "goldfish", "goldfish"],
                         "img_name": ["ILSVRC2012_val_00000005.JPEG", *files], "img_index": [0, 2, 0, 1]})
    rows.to_csv(variant / "validation_stim_info.csv", index=False)
    ds = ImageNetS(imagenet_s, transform=ToTensor())
    assert ds.samples["sample_id"].tolist() == ["n01443537/ILSVRC2012_val_00000002",
                                                "n01443537/ILSVRC2012_val_00000003",
                                                "n01443537/ILSVRC2012_val_00000001",
                                                "n01531178/ILSVRC2012_val_00000005"]
    first = ToTensor()(Image.open(variant / "validation" / "n01443537" / files[1]).convert("RGB"))
    assert torch.equal(ds[0]["image"], first)
    two = ImageNetS(imagenet_s, transform=ToTensor(), n_per_class=1)
    assert two.samples["sample_id"].tolist() == ["n01443537/ILSVRC2012_val_00000002",
                                                 "n01531178/ILSVRC2012_val_00000005"]


def test_vit_cls_emb_preprocessing_is_a_plain_resize_with_nearest_masks(imagenet_s):
    """specs §A2: PIL bilinear resize of the whole image (no crop, aspect not kept), x/255, (x - 0.5)/0.5, and
    masks by cv2 INTER_NEAREST from the full-resolution mask. 47 x 49 px makes 47 * (96 / 47) round below 96."""
    height, width, grid = 47, 49, (4, 4)
    model = SimpleNamespace(data_config={"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9,
                                         "crop_mode": "center", "mean": (0.485, 0.456, 0.406),
                                         "std": (0.229, 0.224, 0.225)},
                            layout=SimpleNamespace(grid=grid))
    model.data_config["input_size"] = (3, height, width)
    ds = load_dataset(imagenet_s, model=model, preprocessing="vit-cls_emb", stimuli=False)
    timm_ds = load_dataset(imagenet_s, model=model, stimuli=False)
    assert input_box((96, 128), ds.data_config) == (0.0, 0.0, 96.0, 128.0)  # exactly the whole image
    for index in (0, 5):
        row = ds.samples.loc[index]
        source = Image.open(row.image_path).convert("RGB")
        plain = np.asarray(source.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        expected = torch.from_numpy((plain - 0.5) / 0.5).permute(2, 0, 1)
        item = ds[index]
        torch.testing.assert_close(item["image"], expected, atol=1e-6, rtol=0)
        assert not torch.allclose(timm_ds[index]["image"], expected, atol=0.1)  # timm's default crops and differs
        ids = decode_segmentation(row.mask_path)  # 96 x 128: token (r, c) samples pixel (24 r, 32 c)
        nearest = [[float(ids[24 * r, 32 * c] == row.seg_id) for c in range(4)] for r in range(4)]
        assert item["token_mask"].tolist() == nearest
    with pytest.raises(ValueError, match="unknown preprocessing 'hf'"):
        load_dataset(imagenet_s, model=model, preprocessing="hf", stimuli=False)
    with pytest.raises(ValueError, match="drop data_config="):
        load_dataset(imagenet_s, model=model, preprocessing="vit-cls_emb", data_config=model.data_config)


def test_vit_cls_emb_preprocessing_of_the_scenes_needs_a_model(scenes_root):
    """The scenes' default config stands in for a model only under timm preprocessing: the study's resize asks for
    the model (not to drop a data_config= the caller never passed)."""
    with pytest.raises(ValueError, match="resizes to the model's input size: pass model="):
        load_dataset("scenes", root=scenes_root.parent, preprocessing="vit-cls_emb")


def test_home_directory_paths_are_expanded(imagenet_s, monkeypatch):
    monkeypatch.setenv("HOME", str(imagenet_s.parent))
    ds = load_dataset(f"~/{imagenet_s.name}", transform=ToTensor(), stimuli=False)
    assert len(ds) == 11 and ds.samples.loc[0, "image_path"].startswith(str(imagenet_s))
    saved = ImageNetS(imagenet_s, transform=ToTensor(), stimuli=False).save_stim_info(imagenet_s.parent / "s.csv")
    assert len(load_dataset(imagenet_s, transform=ToTensor(), stimuli=f"~/{saved.name}")) == 11
