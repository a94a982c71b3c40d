"""validate stage: the data gate between prepare and train.

Checks the manifest against its pandera schema (every error at once), lists quarantined images,
measures class balance, finds exact and confirmed near duplicates and train/test leakage, and
audits the labels (components/audit.py); then applies the thresholds in params.yaml. Run as
`visiontune validate` (and `visiontune audit` on any folder or CSV), or called by the flow and tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pandera.errors

from . import manifest
from .config import ValidateConfig
from .duplicates import find_duplicates, leakage, pair_thumbnails, place, read_record
from .errors import VisiontuneError
from .images import sha256_file


class GateFailed(VisiontuneError, RuntimeError):
    """The data failed a validation check; the message names the check, figure and threshold."""


@dataclass(frozen=True)
class ValidateResult:
    passed: bool
    failures: list[str]
    warnings: list[str]
    report: str
    n_images: int
    n_quarantined: int
    n_duplicate_groups: int  # exact and confirmed near groups
    n_similar_pairs: int  # hash candidates the pixel check did not confirm
    n_leaked: int
    n_label_issues: int


def _schema_errors(frame: pd.DataFrame, manifest_path: Path, classes: list[str] | None) -> list[dict]:
    try:
        manifest.schema(classes).validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        errors = []
        for _, case in exc.failure_cases.iterrows():
            index = case.get("index")
            row = None if index is None or pd.isna(index) else int(index)
            errors.append(
                {
                    "manifest": str(manifest_path),
                    "row": row,
                    "path": frame.at[row, "path"] if row is not None and "path" in frame else None,
                    "column": case.get("column"),
                    "check": str(case.get("check")),
                    "value": None if case.get("failure_case") is None else str(case["failure_case"]),
                }
            )
        return errors
    return []


def _balance(frame: pd.DataFrame, cfg: ValidateConfig) -> tuple[dict, dict]:
    counts = frame.groupby(["label", "split"]).size().unstack(fill_value=0)
    class_counts = {
        str(label): {**{s: int(row.get(s, 0)) for s in manifest.SPLITS}, "total": int(row.sum())}
        for label, row in counts.iterrows()
    }
    totals = {k: v["total"] for k, v in class_counts.items()}
    largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
    balance = {
        "classes": len(totals),
        "largest": {"class": largest, "images": totals[largest]},
        "smallest": {"class": smallest, "images": totals[smallest]},
        "imbalance_ratio": round(totals[largest] / totals[smallest], 3),
        "below_min_per_class": sorted(k for k, n in totals.items() if n < cfg.min_per_class),
        "missing_from_val": sorted(k for k, v in class_counts.items() if v["val"] == 0),
        "missing_from_test": sorted(k for k, v in class_counts.items() if v["test"] == 0),
        "modes": {str(k): int(v) for k, v in frame["mode"].value_counts().items()},
    }
    return class_counts, balance


def _duplicates(frame: pd.DataFrame, cfg: ValidateConfig, out: Path, prepared: Path) -> dict:
    """The report's duplicate sections: exact and confirmed near groups, similar (unconfirmed)
    pairs, the val/test images leaked from train, and side-by-side thumbnails of each kind.

    prepare's search is reused when it was made on this manifest with these settings; otherwise
    (an older prepare folder, a manifest edited by hand, changed settings) the search runs here."""
    settings = cfg.duplicate_search()
    found = read_record(prepared, settings, sha256_file(prepared / "manifest.csv"))
    found = place(found, frame) if found is not None else find_duplicates(frame, **settings)
    duplicates = [d for d in found if d["kind"] != "similar"]
    similar = [d for d in found if d["kind"] == "similar"]  # a person looks; the gate does not count them
    for stale in ("near_duplicates.png", "similar_pairs.png"):  # a rerun may find none of a kind
        (out / stale).unlink(missing_ok=True)
    thumbnails = {
        "near": pair_thumbnails(duplicates, out / "near_duplicates.png", "Near duplicates (confirmed)"),
        "similar": pair_thumbnails(similar, out / "similar_pairs.png", "Similar pairs (not duplicates)"),
    }
    return {
        "duplicates": duplicates,
        "similar_pairs": similar,
        "duplicate_thumbnails": {kind: path.name if path else None for kind, path in thumbnails.items()},
        "leakage": leakage(duplicates, frame),
    }


def _gate(cfg: ValidateConfig, report: dict, frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(failures, warnings): each failure names the check, its figure and its threshold."""
    failures, warnings = [], []
    balance = report["balance"]
    if report["schema_errors"]:
        failures.append(f"schema: {len(report['schema_errors'])} error(s) in the manifest")
    if balance["classes"] < 2:
        failures.append(f"classes: found {balance['classes']}; a classifier needs at least 2")
    if not (frame["split"] == "train").any() or not (frame["split"] == "val").any():
        failures.append("splits: the train and val splits must both hold images")
    small = balance["below_min_per_class"]
    if small:
        listed = ", ".join(f"{k} ({report['class_counts'][k]['total']})" for k in small)
        failures.append(
            f"min_per_class: {len(small)} class(es) below validate.min_per_class={cfg.min_per_class}: "
            f"{listed}; add images or lower the threshold"
        )
    if balance["imbalance_ratio"] > cfg.max_imbalance_ratio:
        failures.append(
            f"imbalance: largest/smallest class = {balance['imbalance_ratio']:.1f} "
            f"({balance['largest']['class']}: {balance['largest']['images']}, "
            f"{balance['smallest']['class']}: {balance['smallest']['images']}) > "
            f"validate.max_imbalance_ratio={cfg.max_imbalance_ratio:g}; add images to the small classes, "
            "or set train.imbalance (weights or sampler) and raise the threshold"
        )
    if report["leakage"] and not cfg.allow_leakage:
        failures.append(
            f"leakage: {len(report['leakage'])} val/test image(s) have a duplicate in train "
            f"(validate.allow_leakage=false); remove or relabel them"
        )
    audit = report["label_audit"]
    if audit["status"] == "ran" and audit["flagged_fraction"] > cfg.max_label_issue_fraction:
        failures.append(
            f"label_issues: {audit['flagged']} of {audit['images']} images "
            f"({audit['flagged_fraction']:.1%}) look mislabeled > "
            f"validate.max_label_issue_fraction={cfg.max_label_issue_fraction:g}"
        )
    if report["quarantined"]:
        large = sum(q.get("kind") == "too large" for q in report["quarantined"])
        warnings.append(
            f"integrity: {len(report['quarantined'])} image(s) quarantined "
            f"({len(report['quarantined']) - large} unreadable, {large} over validate.max_pixels)"
        )
    for kind, what in (("exact", "identical files"), ("near", "near-identical images")):
        conflicts = [d for d in report["duplicates"] if d["kind"] == kind and d["conflicting_labels"]]
        if conflicts:
            warnings.append(f"duplicates: {len(conflicts)} group(s) of {what} carry different labels")
    unsure = [d for d in report["similar_pairs"] if d["conflicting_labels"]]
    if unsure:
        warnings.append(
            f"duplicates: {len(unsure)} similar pair(s) under different labels (hashes matched, "
            "pixels or colours differ: not counted as duplicates); check them in similar_pairs.png"
        )
    for split, consequence in (("val", "early stopping cannot see them"), ("test", "they are not scored")):
        missing = balance[f"missing_from_{split}"]
        if missing:
            warnings.append(
                f"balance: class(es) {', '.join(missing)} have no {split} images, so {consequence}; "
                f"add images (a class of 6 × data.min_eval_per_class gets that many {split} images) "
                f"or give this class {split} rows in a CSV source's split column"
            )
    if audit["status"] != "ran" and audit.get("reason"):
        warnings.append(f"label audit skipped: {audit['reason']}")
    return failures, warnings


def validate(
    cfg: ValidateConfig,
    prepared: Path,
    out: Path,
    audit_size: int | None = None,
    seed: int = 0,
    store: Path | None = None,
) -> ValidateResult:
    """Validate prepared/manifest.csv; write out/report.json and out/report.md; apply the gate."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = prepared / "manifest.csv"
    frame = manifest.read(manifest_path)
    quarantine_path = prepared / "quarantine.json"
    quarantined = json.loads(quarantine_path.read_text()) if quarantine_path.exists() else []
    schema_errors = _schema_errors(frame, manifest_path, cfg.classes)
    class_counts, balance = _balance(frame, cfg)
    dups = _duplicates(frame, cfg, out, prepared)
    if cfg.label_audit:
        from .audit import label_audit

        store = store or prepared.parent / "cache"
        audit = label_audit(frame, audit_size, cfg.audit_folds, seed, out, store, cfg.audit_flag_probability)
    else:
        audit = {"section": {"status": "off", "reason": None}, "issues": []}

    report = {
        "manifest": str(manifest_path),
        "n_images": int(len(frame)),
        "class_counts": class_counts,
        "balance": balance,
        "quarantined": quarantined,
        "schema_errors": schema_errors,
        **dups,
        "label_audit": audit["section"],
        "label_issues": audit["issues"],
        "thresholds": cfg.model_dump(),
    }
    failures, warnings = _gate(cfg, report, frame)
    report = {"passed": not failures, "failures": failures, "warnings": warnings, **report}
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    from .report import validation_markdown

    (out / "report.md").write_text(validation_markdown(report))
    result = ValidateResult(
        passed=not failures,
        failures=failures,
        warnings=warnings,
        report=str(report_path),
        n_images=len(frame),
        n_quarantined=len(quarantined),
        n_duplicate_groups=len(dups["duplicates"]),
        n_similar_pairs=len(dups["similar_pairs"]),
        n_leaked=len(dups["leakage"]),
        n_label_issues=len(audit["issues"]),
    )
    if failures and cfg.on_fail == "error":
        raise GateFailed(
            "validation gate failed:\n  " + "\n  ".join(failures) + f"\n  report: {out / 'report.md'}"
        )
    (out / "validate.json").write_text(json.dumps(asdict(result), indent=2))
    return result
