"""The one preprocessing path: decode, orientation and mode handling, resize, normalize.

prepare, train, evaluate, export and predict all call these functions, so an image is turned
into model input the same way everywhere. Imported, never run.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .errors import VisiontuneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # the decoders Pillow may use, here and everywhere:
# others (EPS hands the file to Ghostscript; dozens of rarely used parsers) never see the bytes


class ImageDecodeError(VisiontuneError, ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than the limit, or whose decode needs more memory than the decode
    budget (a decompression bomb, or a limit set too low)."""


class DecodeBudgetError(ImageTooLargeError):
    """An image whose decode alone needs more memory than the whole decode budget."""


class ImageFormatError(ImageDecodeError):
    """A file in a format outside FORMATS (named when Pillow knows it)."""


def decode_threads() -> int:
    """Threads that decode images at once: two per core (PIL releases the GIL while it decodes),
    at most 32."""
    return min(32, 2 * (os.cpu_count() or 1))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_ROWS = 512  # rows converted at a time: a wide image's temporaries stay a few MB


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale (full range → 8 bits, as x / 257 rounded) and float
    (its min..max → 0..255), converted a band of rows at a time: no whole-image float64 copies."""
    arr = np.asarray(img)  # the decoded samples, once
    out = np.empty(arr.shape, dtype=np.uint8)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
    for top in range(0, arr.shape[0], _ROWS):
        band = arr[top : top + _ROWS].astype(np.float64)
        if img.mode == "F":
            out[top : top + _ROWS] = (band - lo) * scale
        else:
            out[top : top + _ROWS] = np.clip(np.round(band / 257.0), 0, 255)
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":  # palette: expand, keeping transparency so it is composited below
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):  # transparent pixels over white, as viewers show them
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak bytes of decoding an image of this header to RGB, read before any pixel is decoded:
    Pillow keeps 1 (L, P, 1), 2 (16-bit) or 4 bytes per pixel (everything else); the decoded image
    and its EXIF-rotated copy, then at most two 4-byte RGB(A) images while converting."""
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (2 * per_pixel + 8)


class DecodeBudget:
    """The bytes this process's decodes may hold at once (decode_bytes of each image in flight).
    A decode waits for its share; one that needs more than the whole budget is refused. Like
    Pillow's pixel limit, it is one per process: the server sets it from serve.max_decode_mb."""

    def __init__(self, total: int, key: str):
        self.total, self.key, self.held = total, key, 0
        self._cond = threading.Condition()

    def hold(self, need: int, label: str, header: str):
        if need > self.total:
            raise DecodeBudgetError(
                f"{label}: decoding it needs {need / 2**20:.0f} MB ({header}), more than the decode budget "
                f"of {self.total / 2**20:.0f} MB; send a smaller image or raise {self.key}"
            )
        return _Held(self, need)


class _Held:
    def __init__(self, budget: DecodeBudget, need: int):
        self.budget, self.need = budget, need

    def __enter__(self):
        with self.budget._cond:
            self.budget._cond.wait_for(lambda: self.budget.held + self.need <= self.budget.total)
            self.budget.held += self.need

    def __exit__(self, *exc):
        with self.budget._cond:
            self.budget.held -= self.need
            self.budget._cond.notify_all()


DEFAULT_DECODE_MB = 2048  # above what any image within validate.max_pixels needs: in the pipeline the
# budget bounds how much the decode threads hold together, and refuses only exotic giants
_budget = DecodeBudget(DEFAULT_DECODE_MB << 20, "validate.max_pixels")


def set_decode_budget(megabytes: float, key: str) -> None:
    """This process's decode budget (the server: serve.max_decode_mb); `key` is named on refusals."""
    global _budget
    _budget = DecodeBudget(int(megabytes * 2**20), key)


_PIL_LIMIT_LOCK = threading.Lock()  # Pillow's pixel limit is a process-wide global
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default


ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO


def _open(source: Path | BinaryIO, max_pixels: int, label: str) -> Image.Image:
    """Open (header only) with our pixel limit in place of Pillow's global one, and only FORMATS."""
    with _PIL_LIMIT_LOCK:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(source, formats=FORMATS)
        except Image.UnidentifiedImageError:
            known = _sniff(source)
            if known:
                raise ImageFormatError(
                    f"{label}: {known} is not an accepted image format ({', '.join(FORMATS)}); convert it "
                    "to PNG or JPEG"
                ) from None
            raise
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if img.width * img.height > max_pixels:
        img.close()
        raise Image.DecompressionBombError(
            f"{img.width}×{img.height} = {img.width * img.height} pixels > {max_pixels}"
        )
    return img


def _sniff(source: Path | BinaryIO) -> str | None:
    """The format Pillow would call a file outside FORMATS, from its first bytes (each plugin's own
    signature test; no parser runs), or None."""
    if hasattr(source, "read"):
        source.seek(0)
        prefix = source.read(16)
    else:
        with open(source, "rb") as fh:
            prefix = fh.read(16)
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a signature test that trips on short input: not this format
            continue
    return None


def _stream_size(stream: BinaryIO) -> int:
    try:
        return stream.seek(0, io.SEEK_END)
    except (OSError, ValueError):
        return -1


def load_image(
    source: ImageSource, max_pixels: int | None = None, name: str | None = None, then: Callable | None = None
):
    """Decode an image fully as RGB, EXIF orientation applied; raise ImageDecodeError if unusable.

    `source` is a file path, the encoded bytes, or a binary stream (an upload); `name` is what
    error messages call it (default: the path, or "image"). With `then`, return then(image),
    computed while the decode's bytes are still held against the decode budget (the full-size
    image is not kept beyond it).
    """
    return _decode(source, max_pixels, name, None, then)


def _decode(
    source: ImageSource,
    max_pixels: int | None,
    name: str | None,
    size: int | None,
    then: Callable | None = None,
):
    """The header read and checked (format, pixels, the bytes its decode needs against the decode
    budget), then the decode to RGB, with `size` the resize, and `then`, while its bytes are held."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    path = None if hasattr(source, "read") else Path(source)
    label = name or (str(path) if path is not None else "image")
    try:
        with _open(path or source, max_pixels or DEFAULT_MAX_PIXELS, label) as img:
            if size is not None:
                _draft(img, size)
            header = f"{img.width}×{img.height} {img.format} {img.mode}"
            with _budget.hold(decode_bytes(img.mode, img.width, img.height), label, header):
                img.load()  # forces a full decode: truncated files fail here, not later
                out = _to_rgb(ImageOps.exif_transpose(img))
                if size is not None:
                    out = resize(out, size)
                return out if then is None else then(out)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{label}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: too many pixels ({exc}); raise validate.max_pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if path is not None:
            size_ = path.stat().st_size if path.exists() else 0
        else:
            size_ = _stream_size(source)
        if isinstance(exc, Image.UnidentifiedImageError):  # its message holds a repr, not the name
            exc = f"not an image in an accepted format ({', '.join(FORMATS)})"
        reason = "empty file" if size_ == 0 else f"cannot decode: {exc}"
        raise ImageDecodeError(f"{label}: {reason}") from None


DRAFT_MARGIN = 2  # a JPEG's short side stays at least this many times the size the model needs


def _draft(img: Image.Image, size: int) -> None:
    """A JPEG far larger than `size` is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled
    DCT, Pillow's `draft`), the largest reduction that keeps its short side ≥ DRAFT_MARGIN × size;
    the antialiased resize takes it the rest of the way. A 4000×3000 photo for 224 px decodes at
    1000×750: a sixteenth of the pixels to decode and hold."""
    short = min(img.size)
    if img.format not in ("JPEG", "MPO") or short < 2 * DRAFT_MARGIN * size:
        return
    keep = DRAFT_MARGIN * size / short
    img.draft(None, (max(1, math.ceil(img.width * keep)), max(1, math.ceil(img.height * keep))))


def source_mode(path: str | Path) -> str:
    """The mode the file stores its pixels in (L, RGB, I;16, ...), from the header alone."""
    with _open(Path(path), DEFAULT_MAX_PIXELS, str(path)) as img:
        return img.mode


RESIZE_ROUNDING = "tv-draft2"  # resize's rounding (torchvision's) and DRAFT_MARGIN: stores of decoded
# pixels are kept per value


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic, antialiased), centre crop to size×size; uint8 HWC.

    Rounded as torchvision's Resize(size) and CenterCrop(size) round (the long side truncated,
    the crop offset rounded), so timm's and transformers' eval transforms of the exported Hub
    folder (components/hub.py) see exactly these pixels.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    long = int(size * long / short)
    new_w, new_h = (size, long) if w <= h else (long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_resized(
    source: ImageSource, size: int, max_pixels: int | None = None, name: str | None = None
) -> np.ndarray:
    """Decode and resize one image (a file, bytes or a stream): uint8 HWC, size×size×3."""
    return _decode(source, max_pixels, name, size)


def load_batch(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Decode and resize many image files into one uint8 NHWC array (threads: PIL drops the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = load_resized(paths[i], size)

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        list(pool.map(fill, range(len(paths))))
    return out


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC → float32 NCHW, scaled to [0, 1] then standardized by mean and std."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def unit_tensor(batch):
    """torch uint8 NHWC → float NCHW in [0, 1] (training augments at this point)."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def standardize_tensor(x, mean: Sequence[float], std: Sequence[float]):
    """(x - mean) / std per channel for a float NCHW tensor in [0, 1]."""
    import torch

    # made on the host and sent without blocking: creating them on a GPU would wait for its queue
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return (x - m) / s


def normalize_tensor(batch, mean: Sequence[float], std: Sequence[float]):
    """The same as `normalize`, for a torch uint8 NHWC batch already on its device."""
    return standardize_tensor(unit_tensor(batch), mean, std)
