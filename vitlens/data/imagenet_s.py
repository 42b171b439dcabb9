"""ImageNet-S (LUSSeg/ImageNet-S) on disk, read the way vit-cls_emb reads it, but reproducibly.

Layout (the ImageNet-S repository's `data/` folder sits next to the `ImageNetS{N}` folders)::

    <root>/data/categories/ImageNetS_categories_im{N}.txt      class folder names, one a line; ImageNet-S id = row + 1
    <root>/ImageNetS{N}/LOC_synset_mapping.txt                 "wnid names" lines; row = model output index
    <root>/ImageNetS{N}/{split}/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG
    <root>/ImageNetS{N}/{split}-segmentation/<wnid>/ILSVRC2012_val_XXXXXXXX.png   id = R + 256*G
    <root>/ImageNetS{N}/{split}_stim_info.csv                  imagenet_id,index,cat,img_name,img_index

N is 919, 300 or 50 for ImageNet-S (10 for the bundled scenes). The categories file may also sit inside the
`ImageNetS{N}` folder. Without `LOC_synset_mapping.txt` the output indices are timm's ImageNet-1k order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pandas as pd

from .common import ImageDataset, class_images, first_per_class, imagenet_synsets, resolve_preprocessing

# vit-cls_emb leaves out the five classes ImageNet-S 919 merged into others, and their merge targets.
CATS_EXCLUDE_919 = frozenset({"n04356056", "n04355933", "n04493381", "n02808440", "n03642806",
                              "n03832673", "n04008634", "n03773504", "n03887697", "n15075141"})
STIM_INFO_COLUMNS = ["imagenet_id", "index", "cat", "img_name", "img_index"]
SEGMENTED_SPLITS = ("validation", "train-semi")
_VARIANT_FOLDER = re.compile(r"ImageNetS(\d+)")


def find_variant(path: Path | str, variant: int | None = None) -> tuple[Path, int]:
    """(dataset root, number of classes N) for a dataset root holding `ImageNetS{N}/`, or that folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"ImageNet-S root {path} does not exist; expected a folder holding ImageNetS919/, "
                                "ImageNetS300/ or ImageNetS50/")
    if match := _VARIANT_FOLDER.fullmatch(path.name):
        if variant not in (None, int(match.group(1))):
            raise ValueError(f"{path} is ImageNetS{match.group(1)}, not the requested variant {variant}")
        return path.parent, int(match.group(1))
    found = sorted(int(m.group(1)) for p in path.iterdir() if p.is_dir() and (m := _VARIANT_FOLDER.fullmatch(p.name)))
    if variant is not None and variant not in found:
        raise FileNotFoundError(f"{path / f'ImageNetS{variant}'} does not exist (found variants {found})")
    if variant is None and len(found) != 1:
        raise ValueError(f"{path} holds ImageNet-S variants {found}; expected exactly one, or pass variant=N")
    return path, variant if variant is not None else found[0]


def is_imagenet_s(path: Path | str) -> bool:
    """Whether `path` is an ImageNet-S root (holds an `ImageNetS{N}` folder) or an `ImageNetS{N}` folder."""
    path = Path(path)
    return path.is_dir() and (bool(_VARIANT_FOLDER.fullmatch(path.name)) or any(
        p.is_dir() and _VARIANT_FOLDER.fullmatch(p.name) for p in path.iterdir()))


def categories_path(root: Path, n_classes: int) -> Path:
    """The categories file of ImageNet-S{N}: `<root>/data/categories/...`, else inside `ImageNetS{N}/`."""
    name = f"ImageNetS_categories_im{n_classes}.txt"
    candidates = [root / "data" / "categories" / name, root / f"ImageNetS{n_classes}" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no categories file for ImageNetS{n_classes}: expected {candidates[0]} or "
                            f"{candidates[1]} (one class folder name per line, sorted; ImageNet-S id = row + 1)")


def read_synset_mapping(root: Path, n_classes: int) -> pd.DataFrame:
    """Model output index -> class: DataFrame with columns (wnid, name), row i = output index i.

    Read from `LOC_synset_mapping.txt` ("wnid name, name, ..." per line) in `ImageNetS{N}/` or the root, as
    vit-cls_emb does; without it, timm's ImageNet-1k synsets and descriptions (the same order)."""
    for path in (root / f"ImageNetS{n_classes}" / "LOC_synset_mapping.txt", root / "LOC_synset_mapping.txt"):
        if path.is_file():
            rows = [line.partition(" ")[::2] for line in path.read_text().splitlines() if line.strip()]
            return pd.DataFrame(rows, columns=["wnid", "name"])
    return imagenet_synsets()


class ImageNetS(ImageDataset):
    """An ImageNet-S split as a torch Dataset (items: see `common.ImageDataset`).

    Samples, in this order of preference:
      * a stimuli CSV: the path `stimuli`, or with `stimuli=True` (which requires it) or None (when it exists)
        the default `ImageNetS{N}/{split}_stim_info.csv`; its rows, sorted by class and img_index, with
        label = its `index` column (a row of the synset mapping); `stimuli=False` reads no CSV;
      * otherwise the class folders and image files sorted by name (vit-cls_emb used the unreproducible
        `iterdir` order). For ImageNetS919 the 10 classes of `CATS_EXCLUDE_919` are left out, as in the seeds.
    `n_per_class` keeps the first n images of each class and drops classes with fewer, as the seeds do (n=5).
    An empty selection is an error. `preprocessing`: "timm" (the model's eval transform) or "vit-cls_emb"
    (the study's resize with no crop, see `common.vit_cls_emb_config`).

    Labels are model output indices: the row of the class in `LOC_synset_mapping.txt`. The segmentation id of a
    class is its row in the categories file + 1. Splits `validation` and `train-semi` need a mask for every
    image (`{split}-segmentation/<class>/<stem>.png`); token masks come with the items when a grid is known.
    Images are read as RGB (grayscale is converted).

    Attributes: `samples` (DataFrame in item order: sample_id, label, class, name, image_path, mask_path,
    seg_id), `classes` (class folder names present, sorted), `label_names` (name of each output index),
    `categories` (the categories file's list), `stim_info` (the samples in the seeds' CSV format).
    """

    def __init__(self, root: Path | str, split: str = "validation", *, variant: int | None = None, model=None,
                 data_config: dict | None = None, transform: Callable | None = None,
                 grid: tuple[int, int] | None = None, mask_resize: str = "nearest", n_per_class: int | None = None,
                 stimuli: Path | str | bool | None = None, preprocessing: str = "timm"):
        self.root, self.n_classes = find_variant(Path(root).expanduser(), variant)
        self.variant_dir = self.root / f"ImageNetS{self.n_classes}"
        self.split = split
        self.split_dir = self.variant_dir / split
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"ImageNet-S split folder {self.split_dir} does not exist; expected "
                                    f"{self.variant_dir}/{split}/<class>/<image>")
        self.categories = categories_path(self.root, self.n_classes).read_text().split()
        self.synsets = read_synset_mapping(self.root, self.n_classes)
        self.label_names = self.synsets["name"].tolist()
        default_csv = self.variant_dir / f"{split}_stim_info.csv"
        if stimuli is None:
            stimuli = default_csv.is_file()
        if stimuli is False:
            chosen, source = self._scan_folders(), self.split_dir
        else:
            source = default_csv if stimuli is True else Path(stimuli).expanduser()
            chosen = self._read_stimuli(source)
        chosen = first_per_class(chosen, n_per_class, source)
        samples = self._describe(chosen.reset_index(drop=True))
        data_config, transform, grid = resolve_preprocessing(model, data_config, transform, grid, preprocessing)
        super().__init__(samples, sorted(samples["class"].unique()), data_config=data_config, transform=transform,
                         grid=grid, mask_resize=mask_resize)

    def _scan_folders(self) -> pd.DataFrame:
        """(class, img_name, label) for every image, sorted; unknown class folders are an error."""
        self._check_known([p.name for p in self.split_dir.iterdir() if p.is_dir()], self.split_dir)
        files = class_images(self.split_dir, f"{self.split_dir}/<class>/<image>",
                             CATS_EXCLUDE_919 if self.n_classes == 919 else frozenset())
        chosen = pd.DataFrame([(c, p.name) for c, paths in files.items() for p in paths],
                              columns=["class", "img_name"])
        labels = pd.Series(self.synsets.index, index=self.synsets["wnid"])
        missing = sorted(set(chosen["class"]) - set(labels.index))
        if missing:
            raise ValueError(f"classes {missing[:5]} in {self.split_dir} are not in the synset mapping (expected "
                             f"them in {self.variant_dir / 'LOC_synset_mapping.txt'} or timm's ImageNet-1k list)")
        return chosen.assign(label=labels[chosen["class"]].to_numpy())

    def _read_stimuli(self, path: Path) -> pd.DataFrame:
        """(class, img_name, label) from a stimuli CSV in the seeds' format."""
        if not path.is_file():
            raise FileNotFoundError(f"stimuli file {path} does not exist; expected a CSV with columns "
                                    f"{','.join(STIM_INFO_COLUMNS)} (`save_stim_info` writes one), or pass "
                                    "stimuli=False to use the class folders")
        table = pd.read_csv(path)
        if list(table.columns) != STIM_INFO_COLUMNS:
            raise ValueError(f"stimuli file {path} has columns {list(table.columns)}; expected {STIM_INFO_COLUMNS}")
        self._check_known(table["imagenet_id"].unique().tolist(), path)
        bad = table[~table["index"].between(0, len(self.synsets) - 1)]
        if len(bad):
            rows = list(bad[["img_name", "index"]].head(5).itertuples(index=False, name=None))
            raise ValueError(f"stimuli file {path} has rows (img_name, index) {rows} whose index is not a model "
                             f"output index; expected 0..{len(self.synsets) - 1}, a row of the synset mapping")
        table = table.sort_values(["imagenet_id", "img_index"], kind="stable")
        return pd.DataFrame({"class": table["imagenet_id"], "img_name": table["img_name"], "label": table["index"]})

    def _check_known(self, class_names: list[str], where: Path) -> None:
        unknown = sorted(set(class_names) - set(self.categories))
        if unknown:
            raise ValueError(f"unknown classes {unknown[:5]} in {where}: not in the categories file "
                             f"{categories_path(self.root, self.n_classes)}; expected ImageNetS{self.n_classes} "
                             "class folder names")

    def _describe(self, chosen: pd.DataFrame) -> pd.DataFrame:
        """The samples table; every image, and every mask of a segmented split, must exist."""
        stems = chosen["img_name"].map(lambda name: Path(name).stem)
        image_paths = [str(self.split_dir / c / n) for c, n in zip(chosen["class"], chosen["img_name"])]
        mask_dir = self.variant_dir / f"{self.split}-segmentation"
        mask_paths = ([str(mask_dir / c / f"{s}.png") for c, s in zip(chosen["class"], stems)]
                      if self.split in SEGMENTED_SPLITS else [None] * len(chosen))
        for kind, paths in (("image", image_paths), ("segmentation mask", mask_paths)):
            missing = [p for p in paths if p is not None and not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} {kind} file(s) missing, e.g. {missing[0]}; expected one "
                                        f"per image of {self.split_dir}")
        seg_ids = {name: i + 1 for i, name in enumerate(self.categories)}
        return pd.DataFrame({
            "sample_id": chosen["class"] + "/" + stems, "label": chosen["label"].astype(int),
            "class": chosen["class"], "name": self.synsets["name"].to_numpy()[chosen["label"].astype(int)],
            "image_path": image_paths, "mask_path": mask_paths, "seg_id": chosen["class"].map(seg_ids)})

    @property
    def stim_info(self) -> pd.DataFrame:
        """The samples in the seeds' stimuli-CSV format: imagenet_id, index, cat, img_name, img_index."""
        return pd.DataFrame({"imagenet_id": self.samples["class"], "index": self.samples["label"],
                             "cat": self.samples["name"],
                             "img_name": self.samples["image_path"].map(lambda p: Path(p).name),
                             "img_index": self.samples.groupby("class").cumcount()})

    def save_stim_info(self, path: Path | str | None = None) -> Path:
        """Write `stim_info` as CSV (default `ImageNetS{N}/{split}_stim_info.csv`); returns the path."""
        path = Path(path) if path is not None else self.variant_dir / f"{self.split}_stim_info.csv"
        self.stim_info.to_csv(path, index=False)
        return path
