"""Decode once: images decoded and resized to one resolution, kept in a memory-mapped uint8 store.

The store is keyed by resolution (one folder per size and resize rounding) and by content (each
image's sha256), so renamed or re-listed files are not decoded again and adding images decodes only
the new ones.
Training epochs and the label audit read pixels from it and decode nothing. Imported by train and
validate; runs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import images

PIXELS = "pixels.u8"
INDEX = "index.json"


class DecodedStore:
    """Rows of size×size×3 uint8 pixels, looked up by content hash."""

    def __init__(self, root: Path, size: int):
        self.folder = root / f"{size}px-{images.RESIZE_ROUNDING}"  # pixels of another resize: not reused
        self.size = size
        self.row_bytes = size * size * 3
        index_path = self.folder / INDEX
        self.index: dict[str, int] = json.loads(index_path.read_text()) if index_path.exists() else {}
        pixels = self.folder / PIXELS
        # a store cut short (killed while appending) keeps only the rows its index vouches for
        if pixels.exists() and pixels.stat().st_size < len(self.index) * self.row_bytes:
            self.index = {}

    def add(
        self,
        paths: list[str],
        shas: list[str],
        batch: int = 256,
        shard: tuple[int, int] = (0, 1),
        barrier=lambda: None,
    ) -> int:
        """Decode the images not yet stored; returns how many were decoded.

        With shard=(i, n) (the processes of one machine, all calling add with the same list), each
        decodes its own interleaved chunks straight into their rows of one preallocated file; the
        first writes the index once all are done (`barrier` waits for all of them).
        """
        todo = {}
        for path, sha in zip(paths, shas, strict=True):
            if sha not in self.index and sha not in todo:
                todo[sha] = path
        if not todo:
            return 0
        items = list(todo.items())
        base = len(self.index)
        rank, world = shard
        pixels = self.folder / PIXELS
        barrier()  # every process has read the index before the first one changes the store
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(pixels, "r+b" if pixels.exists() else "wb") as fh:
                fh.truncate(base * self.row_bytes)  # rows past the index are a cut-short write
                fh.truncate((base + len(items)) * self.row_bytes)
        barrier()
        with open(pixels, "r+b") as fh:
            for start in range(rank * batch, len(items), world * batch):
                chunk = items[start : start + batch]
                fh.seek((base + start) * self.row_bytes)
                fh.write(images.load_batch([p for _, p in chunk], self.size).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        for i, (sha, _) in enumerate(items):
            self.index[sha] = base + i
        barrier()  # all rows are on disk
        if rank == 0:
            tmp = self.folder / (INDEX + ".tmp")
            tmp.write_text(json.dumps(self.index))
            tmp.replace(self.folder / INDEX)  # the index is written last: it vouches for the rows
        barrier()
        return len(items)

    def rows(self, shas: list[str]) -> np.ndarray:
        """Row numbers of the given images in the store."""
        return np.fromiter((self.index[s] for s in shas), dtype=np.int64, count=len(shas))

    def pixels(self) -> np.ndarray:
        """The whole store as a read-only memory map, N×size×size×3 uint8."""
        n = len(self.index)
        if n == 0:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r", shape=(n, self.size, self.size, 3))


def decoded(
    root: Path, size: int, paths: list[str], shas: list[str], shard: tuple[int, int] = (0, 1), barrier=None
) -> tuple[np.ndarray, np.ndarray]:
    """(memory-mapped pixels, row of each image): decoding only what the store lacks, in shards."""
    store = DecodedStore(root, size)
    store.add(paths, shas, shard=shard, barrier=barrier or (lambda: None))
    return store.pixels(), store.rows(shas)
