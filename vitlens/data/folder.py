"""A plain labelled image folder, `root/<class>/<image>`, as a torch Dataset (no masks)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
from timm.data import ImageNetInfo

from .common import IMAGE_EXTENSIONS, ImageDataset, resolve_preprocessing


class ImageFolderDataset(ImageDataset):
    """Images under `root/<class>/`, sorted by class and file name (items: see `common.ImageDataset`).

    Labels: `class_to_label` when given; otherwise, when every class folder is an ImageNet-1k wnid, its
    ImageNet-1k output index (so a pretrained model's outputs line up), else the position of the class in the
    sorted folder names. Images are read as RGB (grayscale is converted). A class folder without images, or
    a root without class folders, is an error.
    """

    def __init__(self, root: Path | str, *, model=None, data_config: dict | None = None,
                 transform: Callable | None = None, class_to_label: dict[str, int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; expected root/<class>/<image>")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not class_dirs:
            raise ValueError(f"{self.root} has no class folders; expected root/<class>/<image>")
        files = {d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
                 for d in class_dirs}
        empty = [name for name, paths in files.items() if not paths]
        if empty:
            raise ValueError(f"class folders {empty[:5]} in {self.root} hold no images; expected root/<class>/<image> "
                             f"with extensions such as .jpg, .png")
        classes = list(files)
        names = dict(zip(classes, classes))
        if class_to_label is None:
            info = ImageNetInfo()
            wnid_index = {wnid: i for i, wnid in enumerate(info.label_names())}
            if all(name in wnid_index for name in classes):
                class_to_label = {name: wnid_index[name] for name in classes}
                names = {name: info.index_to_description(wnid_index[name]) for name in classes}
            else:
                class_to_label = {name: i for i, name in enumerate(classes)}
        unlabelled = [name for name in classes if name not in class_to_label]
        if unlabelled:
            raise ValueError(f"class folders {unlabelled[:5]} in {self.root} have no entry in class_to_label")
        samples = pd.DataFrame([{"sample_id": f"{name}/{path.stem}", "label": class_to_label[name], "class": name,
                                 "name": names[name], "image_path": str(path), "mask_path": None, "seg_id": 0}
                                for name in classes for path in files[name]])
        data_config, transform, _ = resolve_preprocessing(model, data_config, transform)
        super().__init__(samples, classes, data_config=data_config, transform=transform, grid=None,
                         mask_resize="nearest")
