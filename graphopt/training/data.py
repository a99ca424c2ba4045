"""Input data: image folders with documented preprocessing, and .npy calibration arrays.

Image preprocessing (the ImageNet convention, and what the shared EfficientNet-Lite0 uses):
1. decode to RGB;
2. resize so the *short* side is ``resize`` pixels (bilinear);
3. center-crop ``crop`` x ``crop``;
4. scale to [0, 1], then ``(x - mean) / std`` per channel;
5. layout NCHW, float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from graphopt.errors import GraphOptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def preprocess_image(path: str | os.PathLike, resize: int = 256, crop: int = 224,
                     mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)
                     ) -> np.ndarray:
    """One image -> float32 [3, crop, crop] (see module doc for the steps)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, Image.DecompressionBombError) as e:  # also bombs: PIL refuses > ~179 Mpixel images
        raise GraphOptError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, searched recursively (the class-per-folder layout),
    in a stable order: sorted by path relative to the folder, compared as strings."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraphOptError(f"image folder not found: {folder}")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise GraphOptError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} or its subfolders")
    return files


def load_image_batch(files: Sequence[str | os.PathLike], **kw) -> np.ndarray:
    return np.stack([preprocess_image(f, **kw) for f in files])
