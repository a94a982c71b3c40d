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


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_convert_as_the_float64_formula_did(mode):
    """16-bit, 32-bit and float images become 8 bits a band of rows at a time, with the very values
    the whole-image float64 conversion gave (x / 257 rounded; float min..max → 0..255)."""
    rng = np.random.default_rng(0)
    shape = (images._ROWS * 2 + 37, 61)  # more than one band, and a short last one
    if mode == "I;16":
        arr = rng.integers(0, 65536, shape, dtype=np.uint16)
        expected = (arr.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif mode == "I":
        arr = rng.integers(-5000, 70000, shape, dtype=np.int32)
        expected = (arr.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    else:
        arr = rng.normal(3.0, 7.0, shape).astype(np.float32)
        wide = arr.astype(np.float64)
        expected = ((wide - wide.min()) * (255.0 / (wide.max() - wide.min()))).astype(np.uint8)
    img = Image.fromarray(arr, mode=mode) if mode != "I;16" else Image.fromarray(arr)
    assert img.mode == mode
    assert np.array_equal(np.asarray(images._to_rgb(img))[..., 0], expected)


@pytest.mark.parametrize("fmt, suffix", [("EPS", ".eps"), ("GIF", ".gif"), ("PPM", ".ppm"), ("ICO", ".ico")])
def test_formats_outside_the_allowlist_are_refused_naming_the_format(tmp_path, fmt, suffix):
    """Only JPEG, PNG, WebP, BMP and TIFF reach a decoder: an EPS file never reaches Ghostscript."""
    img = Image.new("RGB", (16, 16), (10, 20, 30))
    path = tmp_path / f"picture{suffix}"
    if fmt == "EPS":  # written by hand: Pillow's EPS writer is fine, but keep the test free of it
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    else:
        img.save(path, format=fmt)
    for source in (path, path.read_bytes()):
        with pytest.raises(images.ImageFormatError) as err:
            images.load_image(source, name=path.name)
        assert str(err.value) == (
            f"{path.name}: {fmt} is not an accepted image format (JPEG, PNG, WEBP, BMP, TIFF); "
            "convert it to PNG or JPEG"
        )


def test_the_decode_budget_refuses_what_can_never_fit_and_queues_what_can(tmp_path):
    big = Image.fromarray(np.zeros((1500, 2000), dtype=np.uint16))  # 3 Mpx, 16-bit: 36 MB to decode
    path = _save(big, tmp_path / "deep.png")
    assert images.decode_bytes("I;16", 2000, 1500) == 3_000_000 * 12
    previous = images._budget
    try:
        images.set_decode_budget(32, "serve.max_decode_mb")
        with pytest.raises(images.ImageTooLargeError) as err:
            images.load_resized(path.read_bytes(), 32, name="deep.png")
        assert str(err.value) == (
            "deep.png: decoding it needs 34 MB (2000×1500 PNG I;16), more than the decode budget of 32 MB; "
            "send a smaller image or raise serve.max_decode_mb"
        )
        images.set_decode_budget(40, "serve.max_decode_mb")
        assert images.load_resized(path, 32).shape == (32, 32, 3)
        budget, order = images._budget, []
        with budget.hold(30 << 20, "a", ""):  # 30 of 40 MB held: a 20 MB decode waits for it
            waiter = __import__("threading").Thread(
                target=lambda: [
                    order.append("wait"),
                    budget.hold(20 << 20, "b", "").__enter__(),
                    order.append("b"),
                ]
            )
            waiter.start()
            waiter.join(0.3)
            assert order == ["wait"] and budget.held == 30 << 20
            order.append("released")
        waiter.join(5)
        assert order == ["wait", "released", "b"] and budget.held == 20 << 20
    finally:
        images._budget = previous


def test_a_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    """A JPEG whose short side is ≥ 4× the input size is decoded at 1/2..1/8 scale: pixels within a
    few levels of a full decode, and only the reduced image's bytes count against the budget."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((2048, 1536), Image.Resampling.BICUBIC)
    path = _save(photo, tmp_path / "phone.jpg", quality=90)
    drafted = images.load_resized(path, 64)  # 64 px: decoded at 1/8 (256×192), short side ≥ 2 × 64
    full = images.resize(images.load_image(path), 64)
    diff = np.abs(drafted.astype(int) - full.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8
    previous = images._budget
    try:  # 2048×1536 RGB needs 48 MB to decode in full; at 1/8 under 1 MB
        images.set_decode_budget(4, "serve.max_decode_mb")
        assert images.load_resized(path, 64).shape == (64, 64, 3)
        with pytest.raises(images.DecodeBudgetError):
            images.load_image(path)
    finally:
        images._budget = previous
