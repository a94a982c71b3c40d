"""Train/val/test splits: stratified per class, with a floor for small classes, and kept.

prepare records the split of every image's content (sha256) in its output folder and reads it
back on the next run, so added images fill each class's quotas and no recorded image moves.
Imported by the prepare stage; runs nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .errors import VisiontuneError

SPLIT_RECORD = "splits.json"


@dataclass(frozen=True)
class SplitRule:
    """The settings a split is drawn with; a record drawn with other settings is set aside."""

    seed: int
    val_fraction: float
    test_fraction: float
    min_eval_per_class: int


def _draw(sha256: str, seed: int) -> float:
    """A uniform number in [0, 1) from the image's content and the seed: the order new images fill splits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sha256}".encode()).digest()[:8], "big") / 2**64


def quotas(n: int, rule: SplitRule) -> tuple[int, int]:
    """(test, val) images a class of n distinct images should hold.

    Each is its fraction of n rounded half up, raised to min(min_eval_per_class, n // 6): the floor
    gives small classes enough images to score, and n // 6 keeps val + test within a third of the
    class. A zero fraction means none; at least one image is left for training.
    """

    def quota(fraction: float) -> int:
        if fraction == 0:
            return 0
        return max(int(fraction * n + 0.5), min(rule.min_eval_per_class, n // 6))

    spare = max(n - 1, 0)
    test = min(quota(rule.test_fraction), spare)
    return test, min(quota(rule.val_fraction), spare - test)


def assign_splits(rows: pd.DataFrame, recorded: dict[str, str], rule: SplitRule) -> pd.Series:
    """The split of every row (path, label, sha256[, split given]), rows in path order.

    Decided once per content (sha256), so identical files share a split: a split given in the
    source wins, then the split recorded for that content, and the new contents of each class
    fill its quotas (see `quotas`) in the order of their seeded content hash: test first, then
    val, then train. A recorded image never moves; a class whose recorded images already exceed
    a quota gets no more there. A content under several labels counts toward its first label.
    A row keeps its own given split even where an identical file was given another.
    """
    given = rows["split"] if "split" in rows else pd.Series("", index=rows.index)
    decided: dict[str, str] = {}
    for sha, split in zip(rows["sha256"], given, strict=True):
        if split and sha not in decided:
            decided[sha] = split
    label_of = rows.drop_duplicates("sha256").set_index("sha256")["label"]
    decided |= {sha: recorded[sha] for sha in label_of.index if sha not in decided and sha in recorded}
    for _, members in label_of.groupby(label_of, sort=True):
        have = pd.Series([decided.get(sha) for sha in members.index]).value_counts()
        new = sorted((sha for sha in members.index if sha not in decided), key=lambda s: _draw(s, rule.seed))
        test, val = quotas(len(members), rule)
        n_test = min(max(test - have.get("test", 0), 0), len(new))
        n_val = min(max(val - have.get("val", 0), 0), len(new) - n_test)
        for i, sha in enumerate(new):
            decided[sha] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return pd.Series(
        [g or decided[sha] for g, sha in zip(given, rows["sha256"], strict=True)], index=rows.index
    )


def read_split_record(out: Path, rule: SplitRule) -> dict[str, str]:
    """The splits (sha256 → split) prepare recorded in out; empty when none was, or with another rule."""
    path = out / SPLIT_RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        same_rule = record["rule"] == asdict(rule)
        splits = dict(record["splits"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VisiontuneError(
            f"{path}: unreadable split record ({exc}); restore it (`dvc checkout` or `dvc pull` of "
            f"{out}) or delete it to draw every split anew"
        ) from None
    return splits if same_rule else {}


def write_split_record(out: Path, frame: pd.DataFrame, rule: SplitRule) -> None:
    """Record the split of every content in frame, written whole under a temporary name, then renamed."""
    first = frame.drop_duplicates("sha256")  # the row whose split a content without a given one took
    splits = dict(sorted(zip(first["sha256"], first["split"], strict=True)))
    tmp = out / f".{SPLIT_RECORD}.tmp"
    tmp.write_text(json.dumps({"rule": asdict(rule), "splits": splits}, indent=0))
    tmp.replace(out / SPLIT_RECORD)
