"""A plain labelled image folder, `root/<class>/<image>`, as a torch Dataset (no masks)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from .common import ImageDataset, class_images, first_per_class, imagenet_synsets, resolve_preprocessing


class ImageFolderDataset(ImageDataset):
    """Images under `root/<class>/`, sorted by class and file name (items: see `common.ImageDataset`).

    Labels: `class_to_label` when given; otherwise, when every class folder is an ImageNet-1k wnid, its
    ImageNet-1k output index (so a pretrained model's outputs line up), else the position of the class in the
    sorted folder names. `n_per_class` keeps the first n images of each class and drops classes with fewer
    (`classes` still lists every folder). Images are read as RGB (grayscale is converted). A class folder
    without images, a root without class folders, or an empty selection is an error. `preprocessing`: see
    `common.resolve_preprocessing`.
    """

    def __init__(self, root: Path | str, *, model=None, data_config: dict | None = None,
                 transform: Callable | None = None, class_to_label: dict[str, int] | None = None,
                 n_per_class: int | None = None, preprocessing: str = "timm"):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; expected root/<class>/<image>")
        files = class_images(self.root, "root/<class>/<image>")
        classes = list(files)
        names = dict(zip(classes, classes))
        if class_to_label is None:
            synsets = imagenet_synsets()
            wnid_index = {wnid: i for i, wnid in enumerate(synsets["wnid"])}
            if all(name in wnid_index for name in classes):
                class_to_label = {name: wnid_index[name] for name in classes}
                names = {name: synsets["name"][wnid_index[name]] for name in classes}
            else:
                class_to_label = {name: i for i, name in enumerate(classes)}
        unlabelled = [name for name in classes if name not in class_to_label]
        if unlabelled:
            raise ValueError(f"class folders {unlabelled[:5]} in {self.root} have no entry in class_to_label")
        samples = pd.DataFrame([{"sample_id": f"{name}/{path.stem}", "label": class_to_label[name], "class": name,
                                 "name": names[name], "image_path": str(path), "mask_path": None, "seg_id": 0}
                                for name in classes for path in files[name]])
        samples = first_per_class(samples, n_per_class, self.root)
        data_config, transform, _ = resolve_preprocessing(model, data_config, transform, preprocessing=preprocessing)
        super().__init__(samples, classes, data_config=data_config, transform=transform, grid=None,
                         mask_resize="nearest")
