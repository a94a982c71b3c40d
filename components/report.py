"""Markdown rendering of the validation report, for people. Imported by validate; runs nothing."""

from __future__ import annotations

from . import manifest


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def validation_markdown(report: dict, max_rows: int = 50) -> str:
    """The validation report as Markdown: gate, balance, integrity, duplicates, label audit."""
    lines = ["# Validation report", "", f"**Gate: {'passed' if report['passed'] else 'FAILED'}**", ""]
    lines += [f"- ❌ {f}" for f in report["failures"]] + [f"- ⚠️ {w}" for w in report["warnings"]]

    balance = report["balance"]
    lines += ["", "## Balance", ""]
    lines.append(
        f"{report['n_images']} images in {balance['classes']} classes; imbalance ratio "
        f"{balance['imbalance_ratio']:g} (largest {balance['largest']['class']}: "
        f"{balance['largest']['images']}, smallest {balance['smallest']['class']}: "
        f"{balance['smallest']['images']}). Modes on disk: "
        + ", ".join(f"{m} {n}" for m, n in balance["modes"].items())
        + "."
    )
    lines.append("")
    rows = [
        [label, *(counts[s] for s in (*manifest.SPLITS, "total"))]
        for label, counts in report["class_counts"].items()
    ]
    lines += _table(["class", *manifest.SPLITS, "total"], rows)

    lines += ["", f"## Quarantined images ({len(report['quarantined'])})", ""]
    lines += [f"- `{q['path']}`: {q['reason']}" for q in report["quarantined"][:max_rows]] or ["None."]

    dups = report["duplicates"]
    lines += ["", f"## Duplicates ({len(dups)} groups) and leakage ({len(report['leakage'])} images)", ""]
    if dups:
        rows = [
            [
                d["kind"],
                "<br>".join(f"`{p}`" for p in d["paths"][:6]),
                ", ".join(d["labels"]) + (" ⚠️ conflicting" if d["conflicting_labels"] else ""),
                ", ".join(d["splits"]),
            ]
            for d in dups[:max_rows]
        ]
        lines += _table(["kind", "files", "labels", "splits"], rows)
    else:
        lines.append("None.")
    if report["leakage"]:
        lines += ["", "Val/test images that also appear in train:", ""]
        lines += [
            f"- `{leak['path']}` ({leak['split']}, {leak['kind']}) ~ `{leak['train_paths'][0]}`"
            for leak in report["leakage"][:max_rows]
        ]

    audit = report["label_audit"]
    lines += ["", "## Label audit (cleanlab)", ""]
    if audit["status"] != "ran":
        lines.append(f"Not run: {audit.get('reason') or 'validate.label_audit is off'}.")
    else:
        lines.append(
            f"{audit['flagged']} of {audit['images']} images ({audit['flagged_fraction']:.1%}) flagged. "
            f"Out-of-sample probabilities from a {audit['folds']}-fold cross-validated classifier on "
            f"pretrained features at {audit['image_size'] or 'native'} px; the classifier agreed with "
            f"{audit['cv_accuracy_vs_given_labels']:.1%} of the given labels. "
            "Score = label quality (low = likely wrong). Listed for review; nothing is changed."
        )
        if audit.get("thumbnails"):
            lines += ["", f"![top suspects]({audit['thumbnails']})"]
        if report["label_issues"]:
            lines.append("")
            rows = [
                [i + 1, f"`{x['path']}`", x["given_label"], x["suggested_label"], f"{x['score']:.3f}"]
                for i, x in enumerate(report["label_issues"][:max_rows])
            ]
            lines += _table(["rank", "file", "given", "suggested", "score"], rows)
        if audit["confused_pairs"]:
            lines += ["", "Most confused class pairs:", ""]
            rows = [
                [" ↔ ".join(p["classes"]), p["examples"], f"{p['joint_probability']:.4f}"]
                for p in audit["confused_pairs"]
            ]
            lines += _table(["classes", "overlapping examples", "joint probability"], rows)
        if audit.get("not_audited"):
            lines += [
                "",
                f"Not audited (fewer than {audit['folds']} images): {', '.join(audit['not_audited'])}.",
            ]

    lines += ["", f"## Schema errors ({len(report['schema_errors'])})", ""]
    lines += [
        f"- row {e['row']} `{e['path']}`: column {e['column']}: {e['check']} (value {e['value']!r})"
        for e in report["schema_errors"][:max_rows]
    ] or ["None."]
    return "\n".join(lines) + "\n"
