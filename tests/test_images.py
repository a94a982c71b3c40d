"""The shared preprocessing path: every mode and orientation becomes the same RGB input."""

import io

import numpy as np
import pytest
from PIL import Image

from visiontune.components import images


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_grayscale_palette_rgba_cmyk_and_16bit_become_rgb(tmp_path):
    gray = _save(Image.new("L", (10, 8), 40), tmp_path / "g.png")
    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))  # fully transparent red
    rgba_path = _save(rgba, tmp_path / "a.png")
    pal = Image.new("P", (10, 8), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal_path = _save(pal, tmp_path / "p.png", transparency=0)
    cmyk = _save(Image.new("CMYK", (10, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")
    deep = Image.fromarray(np.full((8, 10), 65535 // 2, dtype=np.uint16))
    deep_path = _save(deep, tmp_path / "d.png")
    for path in (gray, rgba_path, pal_path, cmyk, deep_path):
        img = images.load_image(path)
        assert img.mode == "RGB" and img.size == (10, 8), path
    assert images.load_image(rgba_path).getpixel((0, 0)) == (255, 255, 255)  # over white
    assert images.load_image(pal_path).getpixel((0, 0)) == (255, 255, 255)
    r, g, b = images.load_image(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert 120 <= images.load_image(deep_path).getpixel((0, 0))[0] <= 135


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    shown = images.load_image(path)
    assert shown.size == (10, 20)
    assert shown.getpixel((5, 2))[0] > 200  # the white half is now on top


def test_truncated_empty_and_fake_images_fail_naming_the_file(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(buf.getvalue()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    for path, reason in ((truncated, ""), (empty, "empty file"), (fake, "cannot decode")):
        with pytest.raises(images.ImageDecodeError, match=str(path.name)) as err:
            images.load_image(path)
        assert reason in str(err.value)


def test_decompression_bomb_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(images.ImageDecodeError, match="max_pixels"):
        images.load_image(path, max_pixels=100)


def test_resize_center_crops_to_square_and_normalize():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    arr = images.resize(img, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    x = images.normalize(arr[None], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1], -1.0)
