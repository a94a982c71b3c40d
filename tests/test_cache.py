"""The decoded-image store: decode once per resolution, only new images, survive a cut."""

import numpy as np

from conftest import write_digits
from visiontune.components import images
from visiontune.components.cache import PIXELS, DecodedStore, decoded


def _files(root):
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return paths, [images.sha256_file(p) for p in paths]


def test_store_decodes_once_and_matches_the_shared_path(tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0, 1), per_class=5)
    paths, shas = _files(data)
    pixels, rows = decoded(tmp_path / "cache", 24, paths, shas)
    assert pixels.shape == (10, 24, 24, 3)
    np.testing.assert_array_equal(pixels[rows], images.load_batch(paths, 24))
    store = DecodedStore(tmp_path / "cache", 24)
    assert store.add(paths, shas) == 0  # nothing left to decode
    write_digits(data, classes=(2,), per_class=3)
    paths2, shas2 = _files(data)
    assert store.add(paths2, shas2) == 3  # only the new images
    assert DecodedStore(tmp_path / "cache", 32).add(paths, shas) == 10  # another resolution


def test_a_cut_short_store_is_rebuilt(tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0,), per_class=4)
    paths, shas = _files(data)
    decoded(tmp_path / "cache", 16, paths, shas)
    pixel_file = tmp_path / "cache" / f"16px-{images.RESIZE_ROUNDING}" / PIXELS
    pixel_file.write_bytes(pixel_file.read_bytes()[:100])  # killed mid-write
    pixels, rows = decoded(tmp_path / "cache", 16, paths, shas)
    np.testing.assert_array_equal(pixels[rows], images.load_batch(paths, 16))


def test_tensor_normalization_equals_the_numpy_path():
    import torch

    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = images.normalize(batch, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    got = images.normalize_tensor(torch.from_numpy(batch), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
