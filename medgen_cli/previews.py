"""PNG previews of slices and volumes (Pillow). Arrays are in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def triplanar(vol: np.ndarray) -> np.ndarray:
    """(D, H, W) volume -> one image: axial | coronal | sagittal middle slices, side by side."""
    d, h, w = vol.shape
    views = [vol[d // 2], vol[:, h // 2, :][::-1], vol[:, :, w // 2][::-1]]  # (H,W), (D,W), (D,H)
    rows = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, rows - v.shape[0]), (0, 2))) for v in views]
    return np.concatenate(padded, axis=1)


def grid(images: list[np.ndarray], cols: int = 8) -> np.ndarray:
    """Tile same-sized 2D images into rows of `cols` with a 2-pixel gap."""
    h, w = images[0].shape
    rows = (len(images) + cols - 1) // cols
    cols = min(cols, len(images))
    out = np.zeros((rows * (h + 2), cols * (w + 2)), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = im
    return out


def view(arr: np.ndarray) -> np.ndarray:
    """A 2D picture of one sample: the slice itself, or the tri-planar view of a volume."""
    return triplanar(arr) if arr.ndim == 3 else arr


def save_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img)).save(path)
    return path
