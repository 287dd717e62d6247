"""`image_folders`: one folder per class of JPEG/PNG images (OCT, MRI, pathology, X-ray).

    - adapter: image_folders
      task: brain_tumor_classification
      path: data/mri                 # data/mri/<class folder>/<image>
      classes: {glioma_tumor: glioma, no_tumor: no_tumor}   # folder -> task class (default: same name)
      modality: mri                  # default: the task's first image input
      origin_site: hospital_a        # default: the folder's name

Each image is converted to the modality's channels (grey or RGB), resized to its 32x32 corpus
shape and standardised per image (mean 0, sd 1), so scanners' intensity scales do not leak in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from federated.core.multimed import IMAGE, MODALITIES, TASKS, Task
from federated.data.ingest.core import Problems, SampleSet, adapter, check_classes, class_folders, resolve

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def load_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    with Image.open(path) as opened:
        opened.load()  # decode now: a truncated or corrupt file fails here, not later
        img = opened.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
    x = x[None] if channels == 1 else x.transpose(2, 0, 1)
    return (x - x.mean()) / (x.std() + 1e-6)


def image_modality(task: Task, params: dict[str, Any]) -> str:
    """The `modality` key, or the task's first image input."""
    images = [m for m in task.inputs if MODALITIES.get(m).kind == IMAGE]
    name = params.get("modality") or (images[0] if images else None)
    if name not in images:
        raise ValueError(f"task {task.name} has no image input {name!r} (its image inputs: {images})")
    return str(name)


@adapter("image_folders", keys={"path", "classes", "modality", "origin_site"})
def image_folders(params: dict[str, Any], base: Path, problems: Problems) -> SampleSet:
    task = TASKS.get(params["task"])
    modality = image_modality(task, params)
    root = resolve(base, params)
    if not root.is_dir():
        problems.report(root, "image folder does not exist")
        return SampleSet(task.name)
    mapping = dict(params.get("classes") or {})
    site = str(params.get("origin_site") or root.name)
    shape = MODALITIES.get(modality).shape
    samples = SampleSet(task.name)
    for folder, label in class_folders(root, mapping, task.name, task.classes, problems):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            problems.report(folder, "no .png/.jpg/.jpeg images in this class folder")
        for f in files:
            try:
                x = load_image(f, shape)
            except Exception as e:  # PIL raises many types for bad files
                problems.report(f, f"unreadable or corrupt image ({type(e).__name__}: {e})")
                continue
            if not np.isfinite(x).all():
                problems.report(f, "image has NaN or infinite values")
                continue
            samples.add({modality: x}, label, site, f"{folder.name}/{f.stem}", f"image_folders:{root.name}")
    check_classes(samples, {str(v) for v in mapping.values()}, str(root), problems)
    return samples
