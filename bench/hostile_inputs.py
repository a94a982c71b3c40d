"""Benchmark: hostile and broken image files fed to prepare, predict and serve.

Run: `python bench/hostile_inputs.py [--per-category 60] [--clients 32]`. Prints figures; asserts
nothing. About 3 minutes on 2 CPU cores with the defaults (600 files).

Files are generated (seeded) in categories: truncations at random offsets and bit flips of valid
images in every accepted format; tiny files declaring huge sizes; deep and unusual modes (16-bit,
32-bit, float, CMYK, palette with and without transparency, LA, 1-bit); animated and multi-page
files; every EXIF orientation and bogus ones; polyglots; formats outside the allowlist; garbage.

Each goes to
- prepare: an image folder of them beside 60 good digits; per file, accepted (a manifest row) or
  refused (quarantined or skipped, with its reason); a crash is the stage raising;
- predict: `visiontune predict FOLDER --model model.onnx` in a process; per file, a label or an
  `error`; a crash is a non-zero exit or a traceback;
- serve: `visiontune serve` on 127.0.0.1, 32 clients posting every file at once; 200 is accepted,
  a 4xx with `{"error", "detail"}` is refused with a clear message, a 5xx, a dropped connection or
  a body without them is a crash.
It prints, per category and consumer: files, refused, accepted, crashed; and the peak memory
(VmHWM) of each process, the server's beside its memory when idle and its decode budget.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

EXE = str(Path(sys.executable).with_name("visiontune"))
ACCEPTED_FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif"))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(rng: random.Random, size: int = 48) -> Image.Image:
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int, depth: int = 16, color: int = 0, rows: int = 4) -> bytes:
    """A PNG declaring width×height whose data holds only a few zero rows (compresses to bytes)."""
    bpp = {(16, 0): 2, (8, 0): 1, (8, 2): 3, (8, 6): 4}[(depth, color)]
    raw = (b"\x00" + bytes(width * bpp)) * rows
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + \
        _png_chunk(b"IEND", b"")  # fmt: skip


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose SOF marker claims width×height (its scan is for 16×16)."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            break
    return bytes(data)


def truncated(rng: random.Random, n: int):
    for i in range(n):
        fmt, ext = ACCEPTED_FORMATS[i % len(ACCEPTED_FORMATS)]
        body = _encode(_photo(rng), fmt)
        yield f"trunc{i}{ext}", body[: rng.randrange(1, len(body))]


def bitflips(rng: random.Random, n: int):
    for i in range(n):
        fmt, ext = ACCEPTED_FORMATS[i % len(ACCEPTED_FORMATS)]
        body = bytearray(_encode(_photo(rng), fmt))
        for _ in range(rng.randint(1, 12)):
            at = rng.randrange(len(body))
            body[at] ^= 1 << rng.randrange(8)
        yield f"flip{i}{ext}", bytes(body)


def huge_headers(rng: random.Random, n: int):
    makers = [
        lambda: ("png", _png_header_only(9000, 9000, 16)),  # 81 Mpx, 16-bit: within max_pixels
        lambda: ("png", _png_header_only(30000, 30000, 8)),  # 900 Mpx: over max_pixels
        lambda: ("png", _png_header_only(rng.randint(5000, 9400), rng.randint(5000, 9400), 8, 6)),
        lambda: ("jpg", _jpeg_declaring(65000, 65000)),
        lambda: ("jpg", _jpeg_declaring(rng.randint(4000, 9000), rng.randint(4000, 9000))),
        lambda: (
            "bmp",
            b"BM"
            + struct.pack("<IHHI", 0, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, 40000, 40000, 1, 24, 0, 0, 0, 0, 0, 0)
            + bytes(64),
        ),  # fmt: skip
        lambda: ("tif", _encode(Image.new("L", (8, 8)), "TIFF")[:8] + bytes(200)),
        lambda: ("png", _png_header_only(9000, 9000, 16, rows=9000)),  # the whole 9000×9000, zero
    ]
    for i in range(n):
        ext, body = makers[i % len(makers)]()
        yield f"huge{i}.{ext}", body


def modes(rng: random.Random, n: int):
    deep = np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40
    wide = deep.astype(np.int32) * 7
    real = np.random.default_rng(1).normal(size=(40, 40)).astype(np.float32)
    makers = [
        lambda: ("png", _encode(Image.fromarray(deep), "PNG")),
        lambda: ("tif", _encode(Image.fromarray(real, "F"), "TIFF")),
        lambda: ("tif", _encode(Image.fromarray(wide, "I"), "TIFF")),
        lambda: ("jpg", _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")),
        lambda: ("png", _encode(_photo(rng).convert("P"), "PNG")),
        lambda: ("png", _encode(_photo(rng).convert("P"), "PNG", transparency=0)),
        lambda: ("png", _encode(_photo(rng).convert("LA"), "PNG")),
        lambda: ("png", _encode(_photo(rng).convert("RGBA"), "PNG")),
        lambda: ("png", _encode(_photo(rng).convert("1"), "PNG")),
        lambda: ("webp", _encode(_photo(rng).convert("RGBA"), "WEBP", lossless=True)),
        lambda: ("tif", _encode(_photo(rng).convert("CMYK"), "TIFF")),
        lambda: ("bmp", _encode(_photo(rng).convert("P"), "BMP")),
    ]  # fmt: skip
    for i in range(n):
        ext, body = makers[i % len(makers)]()
        yield f"mode{i}.{ext}", body


def animated(rng: random.Random, n: int):
    for i in range(n):
        frames = [_photo(rng, 32) for _ in range(rng.randint(2, 6))]
        fmt, ext = [("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")][i % 3]
        yield f"anim{i}.{ext}", _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def exif(rng: random.Random, n: int):
    for i in range(n):
        tags = Image.Exif()
        tags[0x0112] = [1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 65535][i % 11]
        yield f"exif{i}.jpg", _encode(_photo(rng), "JPEG", exif=tags.tobytes())


def polyglots(rng: random.Random, n: int):
    tails = [
        b"PK\x03\x04" + os.urandom(200),
        b"<html><script>alert(1)</script></html>",
        b"%PDF-1.4\n" + bytes(100),
    ]
    for i in range(n):
        fmt, ext = ACCEPTED_FORMATS[i % len(ACCEPTED_FORMATS)]
        body = _encode(_photo(rng), fmt)
        if i % 4 == 3:  # a PNG's signature on a JPEG's body
            body = b"\x89PNG\r\n\x1a\n" + _encode(_photo(rng), "JPEG")[2:]
        yield f"poly{i}{ext}", body + tails[i % len(tails)]


def other_formats(rng: random.Random, n: int):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n(/etc/passwd) (r) file\nshowpage\n%%EOF\n"
    makers = [
        lambda: eps,
        lambda: _encode(_photo(rng), "GIF"),
        lambda: _encode(_photo(rng), "ICO"),
        lambda: _encode(_photo(rng), "PPM"),
        lambda: _encode(_photo(rng), "TGA"),
        lambda: _encode(_photo(rng), "PCX"),
        lambda: _encode(_photo(rng), "SGI"),
        lambda: _encode(_photo(rng).convert("1"), "XBM"),
        lambda: _encode(_photo(rng), "IM"),
        lambda: _encode(_photo(rng), "DDS") if "DDS" in Image.SAVE else eps,
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    ]
    for i in range(n):
        yield f"other{i}.png", makers[i % len(makers)]()  # an accepted extension: the bytes decide


def garbage(rng: random.Random, n: int):
    for i in range(n):
        size = [0, 1, 7, 64, 4096][i % 5]
        yield f"junk{i}.jpg", bytes(rng.randrange(256) for _ in range(size))


CATEGORIES = {
    "truncated": truncated, "bit flips": bitflips, "huge headers": huge_headers, "modes": modes,
    "animated": animated, "exif": exif, "polyglots": polyglots, "other formats": other_formats,
    "garbage": garbage,
}  # fmt: skip


def generate(per_category: int, seed: int = 0) -> dict[str, list[tuple[str, bytes]]]:
    """Per category, `per_category` (name, bytes) files; names are unique across categories."""
    rng = random.Random(seed)
    return {cat: list(make(rng, per_category)) for cat, make in CATEGORIES.items()}


# ---- the consumers -------------------------------------------------------------------------


def _peak_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def _run_measured(command: list[str], cwd: Path) -> tuple[int, str, float]:
    """(exit code, output, peak RSS in MB) of a command: reaped with wait4, which returns its rusage."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), usage.ru_maxrss / 1024


def _write(files: dict[str, list[tuple[str, bytes]]], folder: Path) -> dict[str, str]:
    """Every file under folder/hostile/; name → category."""
    (folder / "hostile").mkdir(parents=True)
    where = {}
    for category, items in files.items():
        for name, body in items:
            (folder / "hostile" / name).write_bytes(body)
            where[name] = category
    return where


def prepare_part(files, work: Path) -> tuple[dict[str, Counter], float]:
    from sklearn.datasets import load_digits

    data = work / "dataset"
    category = _write(files, data)
    digits = load_digits()
    for i in range(60):  # a second class of good images beside the hostile folder
        (data / "digits").mkdir(exist_ok=True)
        Image.fromarray((255 - digits.images[i] * 15).astype(np.uint8)).save(data / "digits" / f"{i}.png")
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from visiontune.components.config import load_params\n"
        "from visiontune.pipelines import stages\n"
        f"p = load_params('none.yaml', {{'data.source': {str(data)!r}}}, missing_ok=True)\n"
        f"r = stages.prepare(p, stages.Layout(Path({str(work / 'prepared')!r})))\n"
        "print('SKIPPED ' + json.dumps(r.skipped))\n"
    )
    code, out, peak = _run_measured([sys.executable, "-c", script], work)
    counts = {cat: Counter() for cat in files}
    if code != 0:
        for cat in category.values():
            counts[cat]["crashed"] += 1
        print(out[-3000:])
        return counts, peak
    rows = set(Path(p).name for p in _manifest_paths(work / "prepared" / "prepare" / "manifest.csv"))
    quarantined = {
        Path(q["path"]).name: q["reason"]
        for q in json.loads((work / "prepared" / "prepare" / "quarantine.json").read_text())
    }
    for name, cat in category.items():
        if name in rows:
            counts[cat]["accepted"] += 1
        elif quarantined.get(name, "").strip():
            counts[cat]["refused"] += 1
        else:
            counts[cat]["lost"] += 1  # neither a row nor a reason: the silent drop this bench exists for
    return counts, peak


def _manifest_paths(path: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(path)["path"].tolist()


def predict_part(files, work: Path, model: Path) -> tuple[dict[str, Counter], float]:
    category = _write(files, work / "predict")
    code, out, peak = _run_measured(
        [EXE, "predict", str(work / "predict" / "hostile"), "--model", str(model)], work
    )
    counts = {cat: Counter() for cat in files}
    try:
        results = json.loads(out[out.index("[") :]) if code == 0 and "Traceback" not in out else None
    except ValueError:
        results = None
    if results is None:
        print(out[-3000:])
        for cat in category.values():
            counts[cat]["crashed"] += 1
        return counts, peak
    seen = set()
    for result in results:
        name = Path(result["path"]).name
        seen.add(name)
        counts[category[name]]["refused" if result.get("error") else "accepted"] += 1
    for name in set(category) - seen:
        counts[category[name]]["lost"] += 1
    return counts, peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_part(files, work: Path, model: Path, clients: int) -> tuple[dict[str, Counter], dict]:
    import httpx

    port = _free_port()
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([EXE, "serve", "--model", str(model), "--port", str(port)], cwd=work,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    counts = {cat: Counter() for cat in files}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        idle = _peak_mb(proc.pid)
        items = [(cat, name, body) for cat, batch in files.items() for name, body in batch]

        def post(item):
            cat, name, body = item
            try:
                with httpx.Client(timeout=120) as client:
                    r = client.post(
                        f"{url}/v1/predict", files=[("file", (name, body, "application/octet-stream"))]
                    )
                if r.status_code == 200:
                    return cat, "accepted"
                ok = 400 <= r.status_code < 500 and {"error", "detail"} <= set(r.json())
                return cat, "refused" if ok else "crashed"
            except (httpx.HTTPError, ValueError):
                return cat, "crashed"

        with ThreadPoolExecutor(clients) as pool:
            for cat, outcome in pool.map(post, items):
                counts[cat][outcome] += 1
        alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        memory = {"idle_mb": idle, "peak_mb": _peak_mb(proc.pid), "answers_after": alive}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    return counts, memory


def _model(work: Path) -> Path:
    """A small Lite0 trained one epoch on 60 digits at 32 px and exported (about a minute)."""
    from sklearn.datasets import load_digits

    from visiontune.components.config import load_params
    from visiontune.pipelines import stages

    data = work / "model-data"
    digits = load_digits()
    for i in range(90):
        folder = data / str(digits.target[i] % 3)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((255 - digits.images[i] * 15).astype(np.uint8)).save(folder / f"{i}.png")
    overrides = {
        "data.source": str(data), "model.image_size": 32, "train.epochs": 1, "validate.on_fail": "warn",
        "validate.label_audit": False, "validate.min_per_class": 3,
    }  # fmt: skip
    params = load_params("none.yaml", overrides, missing_ok=True)
    layout = stages.Layout(work / "model")
    for stage in ("prepare", "validate", "train", "evaluate", "export"):
        stages.STAGES[stage](params, layout)
    return layout.export / "model.onnx"


def _table(title: str, counts: dict[str, Counter]) -> None:
    print(f"\n{title}")
    print(f"   {'category':<14} {'files':>6} {'refused':>8} {'accepted':>9} {'crashed':>8} {'lost':>5}")
    total = Counter()
    for cat, c in counts.items():
        files = sum(c.values())
        total += c
        print(
            f"   {cat:<14} {files:>6} {c['refused']:>8} {c['accepted']:>9} {c['crashed']:>8} {c['lost']:>5}"
        )
    print(f"   {'all':<14} {sum(total.values()):>6} {total['refused']:>8} {total['accepted']:>9} "
          f"{total['crashed']:>8} {total['lost']:>5}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = generate(args.per_category, args.seed)
    print(f"{sum(map(len, files.values()))} files in {len(files)} categories (seed {args.seed})")
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = Path(tmp)
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            model = _model(work)
        counts, peak = prepare_part(files, work)
        _table(f"prepare (one process, peak memory {peak:.0f} MB)", counts)
        counts, peak = predict_part(files, work, model)
        _table(f"predict (one process, peak memory {peak:.0f} MB)", counts)
        counts, memory = serve_part(files, work, model, args.clients)
        _table(
            f"serve, {args.clients} concurrent clients (memory {memory['idle_mb']:.0f} MB when ready, peak "
            f"{memory['peak_mb']:.0f} MB; decode budget serve.max_decode_mb = 512; answers /healthz after: "
            f"{memory['answers_after']})",
            counts,
        )


if __name__ == "__main__":
    main()
