"""Shared by the training benchmarks: JPEG photos, and ImageFolder trees of a manifest's splits."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field")  # scikit-image's bundled photos: 4 classes


def photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEG photos of 256–1024 px, random crops of four photos (one class each), written by
    threads (Pillow releases the GIL while it resizes and encodes)."""
    from skimage import data

    rng0 = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        try:
            sources.append(np.asarray(getattr(data, name)())[..., :3])
        except Exception:  # a scikit-image without this photo bundled: smooth random colours instead
            small = rng0.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            sources.append(np.asarray(Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)))
        (root / name).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        side = int(rng.integers(256, 1025))
        crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((side, int(side * ch / cw)))
        crop.save(root / PHOTOS[i % len(sources)] / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n)))
    return root


def split_folders(prepared: Path, out: Path) -> dict[str, Path]:
    """ImageFolder trees (symlinks) of the manifest's splits, so that both loops see the same split."""
    from visiontune.components import manifest

    frame = manifest.read(prepared / "manifest.csv")
    for row in frame.itertuples():
        link = out / row.split / row.label / f"{row.Index:06d}{Path(row.path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(row.path).absolute())
    return {s: out / s for s in ("train", "val", "test")}
