"""Train/val/test splits: stratified per class, with a floor for small classes, and kept.

Identical files and confirmed near duplicates (duplicates.py) share a split, so none leaks from
train into val or test. prepare records the split of every image's content (sha256) in its output
folder and reads it back on the next run, so added images fill each class's quotas and no
recorded image moves. Imported by the prepare stage; runs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
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


def assign_splits(
    rows: pd.DataFrame, recorded: dict[str, str], rule: SplitRule, near: Sequence[Sequence[str]] = ()
) -> pd.Series:
    """The split of every row (path, label, sha256[, split given]), rows in path order.

    Decided once per content (sha256), so identical files share a split, and once per group of
    near-duplicate contents (`near`: lists of sha256, disjoint), so that no copy leaks from train
    into val or test. A split given in the source wins, then the split recorded for that content;
    the undecided contents of a group that has some decided join them (train where those differ:
    a copy in train adds no leaking image). The groups left, wholly new, fill the quotas of their
    class (see `quotas`) in the order of their seeded content hash: test first, then val, each
    taking a group only while it fits, then train. A recorded image never moves; a class whose
    recorded images already exceed a quota gets no more there. A content under several labels,
    and a group, count toward the label of their first content. A row keeps its own given split
    even where an identical file was given another.
    """
    given = rows["split"] if "split" in rows else pd.Series("", index=rows.index)
    decided: dict[str, str] = {}
    for sha, split in zip(rows["sha256"], given, strict=True):
        if split and sha not in decided:
            decided[sha] = split
    label_of = rows.drop_duplicates("sha256").set_index("sha256")["label"]
    decided |= {sha: recorded[sha] for sha in label_of.index if sha not in decided and sha in recorded}
    units = _units(label_of.index, near)
    for unit in units:
        splits = {decided[sha] for sha in unit if sha in decided}
        if splits:
            joined = splits.pop() if len(splits) == 1 else "train"
            decided |= {sha: joined for sha in unit if sha not in decided}
    unit_label = pd.Series([label_of[unit[0]] for unit in units])
    for _, members in unit_label.groupby(unit_label, sort=True):
        mine = [units[i] for i in members.index]
        _fill_quotas(mine, decided, rule)
    return pd.Series(
        [g or decided[sha] for g, sha in zip(given, rows["sha256"], strict=True)], index=rows.index
    )


def _units(contents: pd.Index, near: Sequence[Sequence[str]]) -> list[list[str]]:
    """Every content once: in its near group (members in `contents` order), or alone."""
    position = {sha: i for i, sha in enumerate(contents)}
    grouped = [sorted((sha for sha in group if sha in position), key=position.get) for group in near]
    grouped = [unit for unit in grouped if unit]
    taken = {sha for unit in grouped for sha in unit}
    units = grouped + [[sha] for sha in contents if sha not in taken]
    return sorted(units, key=lambda unit: position[unit[0]])


def _fill_quotas(units: list[list[str]], decided: dict[str, str], rule: SplitRule) -> None:
    """Decide the wholly undecided units of one class (in place): test, then val, while each fits."""
    have = pd.Series([decided.get(sha) for unit in units for sha in unit]).value_counts()
    test, val = quotas(sum(map(len, units)), rule)
    room = {"test": test - have.get("test", 0), "val": val - have.get("val", 0)}
    new = [unit for unit in units if unit[0] not in decided]
    for unit in sorted(new, key=lambda unit: min(_draw(sha, rule.seed) for sha in unit)):
        split = next((s for s in ("test", "val") if len(unit) <= room[s]), "train")
        if split != "train":
            room[split] -= len(unit)
        decided |= {sha: split for sha in unit}


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
