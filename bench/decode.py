"""Benchmark: decoding at the size the model needs, and decoding under a memory budget.

Run: `python bench/decode.py [--repeats 5]`. Prints figures; asserts nothing. About a minute.

1. Phone-sized JPEGs (scikit-image's colour photos enlarged to 4000×3000, quality 90) to a 224 px
   model input through `images.load_resized`, with JPEG draft decoding (the default) and without
   (DRAFT_MARGIN set out of reach): milliseconds per image, and how far the pixels move (mean and
   largest absolute difference of the uint8 inputs, 0..255).
2. The 9000×9000 16-bit grayscale PNG (about 157 KB): the peak memory a fresh process adds to
   decode it to a 224 px input (the pipeline's 2048 MB budget), and what the server's default
   budget (serve.max_decode_mb: 512) does with it, each in its own process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.components import images

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def phone_jpegs() -> list[tuple[str, bytes]]:
    from skimage import data

    out = []
    for name in PHOTOS:
        img = (
            Image.fromarray(getattr(data, name)())
            .convert("RGB")
            .resize((4000, 3000), Image.Resampling.BICUBIC)
        )
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue()))
    return out


def _ms(body: bytes, repeats: int) -> tuple[float, np.ndarray]:
    best, pixels = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        pixels = images.load_resized(body, 224)
        best = min(best, time.perf_counter() - started)
    return 1000 * best, pixels


def draft_part(repeats: int) -> None:
    print("1. 4000×3000 JPEG (quality 90) → 224 px input, best of", repeats)
    columns = ("bytes", 9), ("full ms", 8), ("draft ms", 9), ("speedup", 8), ("mean |Δ|", 9), ("max |Δ|", 8)
    print(f"   {'photo':<18} " + " ".join(f"{name:>{width}}" for name, width in columns))
    ratios = []
    for name, body in phone_jpegs():
        margin = images.DRAFT_MARGIN
        images.DRAFT_MARGIN = 10**6  # out of reach: decoded in full
        try:
            full_ms, full = _ms(body, repeats)
        finally:
            images.DRAFT_MARGIN = margin
        draft_ms, drafted = _ms(body, repeats)
        diff = np.abs(full.astype(np.int16) - drafted.astype(np.int16))
        ratios.append(full_ms / draft_ms)
        print(f"   {name:<18} {len(body):>9,} {full_ms:>8.1f} {draft_ms:>9.1f} {full_ms / draft_ms:>7.1f}× "
              f"{diff.mean():>9.2f} {diff.max():>8d}")  # fmt: skip
    print(f"   geometric mean speedup: {float(np.exp(np.mean(np.log(ratios)))):.1f}×")


CHILD = """
import json, resource, sys
from visiontune.components import images
path, budget = sys.argv[1], float(sys.argv[2])
images.set_decode_budget(budget, "serve.max_decode_mb")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    images.load_resized(open(path, "rb").read(), 224, name="deep.png")
    outcome = "decoded"
except images.ImageTooLargeError as exc:
    outcome = "refused: " + str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "added_mb": (after - before) / 1024}))
"""


def budget_part() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deep.png"
        Image.fromarray(np.zeros((9000, 9000), dtype=np.uint16)).save(path)
        kb = path.stat().st_size / 1024
        print(f"\n2. 9000×9000 16-bit PNG ({kb:.0f} KB), decoded to 224 px in a fresh process")
        print(f"   decode_bytes from its header: {images.decode_bytes('I;16', 9000, 9000) / 2**20:.0f} MB")
        for label, budget in (("pipeline budget, 2048 MB", 2048), ("serve default, 512 MB", 512)):
            run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            result = json.loads(run.stdout)
            print(f"   {label:<26} peak memory added {result['added_mb']:>6.0f} MB  {result['outcome']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    draft_part(args.repeats)
    budget_part()


if __name__ == "__main__":
    main()
