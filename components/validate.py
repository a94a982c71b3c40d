"""validate stage: the data gate between prepare and train.

Checks the manifest against its pandera schema (every error at once), lists the quarantined
images, counts classes per split, and fails when a class is too small. Run as
`visiontune validate` or called by the flow and tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandera.errors

from . import manifest
from .config import ValidateConfig
from .errors import VisiontuneError


class GateFailed(VisiontuneError, RuntimeError):
    """The data failed a validation check; the message names the check, figure and threshold."""


@dataclass(frozen=True)
class ValidateResult:
    passed: bool
    failures: list[str]
    report: str


def _schema_errors(frame, manifest_path: Path) -> list[dict]:
    try:
        manifest.schema().validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        errors = []
        for _, case in cases.iterrows():
            index = case.get("index")
            row = int(index) if index is not None and str(index) != "nan" else None
            path = frame.at[row, "path"] if row is not None and "path" in frame else None
            errors.append(
                {
                    "manifest": str(manifest_path),
                    "row": row,
                    "path": path,
                    "column": case.get("column"),
                    "check": str(case.get("check")),
                    "value": None if case.get("failure_case") is None else str(case["failure_case"]),
                }
            )
        return errors
    return []


def _markdown(report: dict) -> str:
    lines = [
        "# Validation report",
        "",
        f"**Gate: {'passed' if report['passed'] else 'FAILED'}**",
        "",
    ]
    for failure in report["failures"]:
        lines.append(f"- {failure}")
    lines += ["", "## Images per class and split", "", "| class | train | val | test | total |"]
    lines.append("|---|---:|---:|---:|---:|")
    for label, counts in report["class_counts"].items():
        row = [str(counts.get(s, 0)) for s in (*manifest.SPLITS, "total")]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", f"## Quarantined images ({len(report['quarantined'])})", ""]
    lines += [f"- `{q['path']}`: {q['reason']}" for q in report["quarantined"]] or ["None."]
    lines += ["", f"## Schema errors ({len(report['schema_errors'])})", ""]
    lines += [
        f"- row {e['row']} `{e['path']}`: column {e['column']}: {e['check']} (value {e['value']!r})"
        for e in report["schema_errors"]
    ] or ["None."]
    return "\n".join(lines) + "\n"


def validate(cfg: ValidateConfig, prepared: Path, out: Path) -> ValidateResult:
    """Validate prepared/manifest.csv; write out/report.json and out/report.md; apply the gate."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = prepared / "manifest.csv"
    frame = manifest.read(manifest_path)
    quarantine_path = prepared / "quarantine.json"
    quarantined = json.loads(quarantine_path.read_text()) if quarantine_path.exists() else []
    schema_errors = _schema_errors(frame, manifest_path)

    counts = frame.groupby(["label", "split"]).size().unstack(fill_value=0)
    class_counts = {
        str(label): {**{s: int(row.get(s, 0)) for s in manifest.SPLITS}, "total": int(row.sum())}
        for label, row in counts.iterrows()
    }
    failures = []
    if schema_errors:
        failures.append(f"schema: {len(schema_errors)} error(s) in {manifest_path}")
    small = {k: v["total"] for k, v in class_counts.items() if v["total"] < cfg.min_per_class}
    if small:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(small.items()))
        failures.append(
            f"min_per_class: {len(small)} class(es) below validate.min_per_class="
            f"{cfg.min_per_class}: {listed}; add images or lower the threshold"
        )
    if len(class_counts) < 2:
        failures.append(f"classes: found {len(class_counts)} class; a classifier needs at least 2")
    if not (frame["split"] == "train").any() or not (frame["split"] == "val").any():
        failures.append("splits: the train and val splits must both hold images")

    report = {
        "passed": not failures,
        "failures": failures,
        "n_images": int(len(frame)),
        "class_counts": class_counts,
        "quarantined": quarantined,
        "schema_errors": schema_errors,
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    result = ValidateResult(passed=not failures, failures=failures, report=str(report_path))
    if failures and cfg.on_fail == "error":
        raise GateFailed(
            "validation gate failed:\n  " + "\n  ".join(failures) + f"\n  report: {out / 'report.md'}"
        )
    (out / "validate.json").write_text(json.dumps(asdict(result), indent=2))
    return result
