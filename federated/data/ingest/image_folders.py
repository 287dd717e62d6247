"""`image_folders`: one folder per class of JPEG/PNG images (OCT, MRI, pathology, X-ray).

    - adapter: image_folders
      task: brain_tumor_classification
      path: data/mri                 # data/mri/<class folder>/<image>
      classes: {glioma_tumor: glioma, no_tumor: no_tumor}   # folder -> task class (default: same name)
      modality: mri                  # default: the task's first image input
      origin_site: hospital_a        # default: the folder's name

Each image is converted to the modality's channels (1: grey, 3: RGB), resized to the modality's
declared shape (the catalogue's 32x32, or what the spec's `modalities:` block or the source's
`shape:` sets, e.g. [1, 128, 128]) and standardised per image (mean 0, sd 1), so scanners'
intensity scales do not leak in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.targets import IMAGE
from federated.data.ingest.core import (
    Problems,
    SampleSet,
    adapter,
    check_classes,
    class_folders,
    error_reason,
    filled_modality,
    kept_inside,
    resolve,
)

EXTENSIONS = {".png", ".jpg", ".jpeg"}
IMAGE_CHANNELS = (1, 3)  # grey or RGB: what a JPEG/PNG converts to without inventing channels


def load_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    with Image.open(path) as opened:
        opened.load()  # decode now: a truncated or corrupt file fails here, not later
        img = opened.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
    x = x[None] if channels == 1 else x.transpose(2, 0, 1)
    return (x - x.mean()) / (x.std() + 1e-6)


def image_modality(task: Task, schema: CorpusSchema, params: dict[str, Any]) -> str:
    """The `modality` key, or the task's first image input; its channels must be grey or RGB."""
    name = filled_modality(task, schema, IMAGE, params)
    channels = schema.modality(name).shape[0]
    if channels not in IMAGE_CHANNELS:
        raise ValueError(f"modality {name} has {channels} channels; images are read as 1 (grey) or 3 (RGB) channels")
    return name


@adapter("image_folders", keys={"path", "classes", "modality", "origin_site"}, fills=IMAGE)
def image_folders(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    task = schema.task(params["task"])
    modality = image_modality(task, schema, params)
    root = resolve(base, params)
    samples = SampleSet(task.name, schema)
    if not root.is_dir():
        problems.report(root, "image folder does not exist")
        return samples
    mapping = dict(params.get("classes") or {})
    site = str(params.get("origin_site") or root.name)
    shape = schema.modality(modality).shape
    for folder, label in class_folders(root, mapping, task.name, task.classes, problems, data_root=base):
        files = kept_inside(sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS), base, problems)
        if not files:
            problems.report(folder, "no .png/.jpg/.jpeg images in this class folder")
        for f in files:
            try:
                x = load_image(f, shape)
            except Exception as e:  # PIL raises many types for bad files
                problems.report(f, f"unreadable or corrupt image ({error_reason(e)})")
                continue
            if not np.isfinite(x).all():
                problems.report(f, "image has NaN or infinite values")
                continue
            samples.add({modality: x}, label, site, f"{folder.name}/{f.stem}", f"image_folders:{root.name}")
    check_classes(samples, {str(v) for v in mapping.values()}, str(root), problems)
    return samples
