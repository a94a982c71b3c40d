"""Markdown rendering of the validation report, for people. Imported by validate; runs nothing."""

from __future__ import annotations

from . import manifest, metrics


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

    lines += _duplicates_markdown(report, max_rows)

    lines += _audit_markdown(report["label_audit"], report["label_issues"], max_rows)

    lines += ["", f"## Schema errors ({len(report['schema_errors'])})", ""]
    lines += [
        f"- row {e['row']} `{e['path']}`: column {e['column']}: {e['check']} (value {e['value']!r})"
        for e in report["schema_errors"][:max_rows]
    ] or ["None."]
    return "\n".join(lines) + "\n"


def _duplicates_markdown(report: dict, max_rows: int) -> list[str]:
    """Duplicates (exact, confirmed near), leakage, and the similar pairs that were not confirmed."""
    dups, similar, thumbs = report["duplicates"], report["similar_pairs"], report["duplicate_thumbnails"]
    lines = ["", f"## Duplicates ({len(dups)} groups) and leakage ({len(report['leakage'])} images)", ""]
    from .duplicates import (
        ALIGN_MIN_SIDE,
        CROP_DISTANCE,
        DETAIL,
        DETAIL_CELL,
        DETAIL_DISTANCE,
        NOISE_QUALITY,
        NOISE_RATIO,
        RESIZE_MAX_SIDE,
    )

    lines.append(
        "Exact: same SHA-256. Near: perceptual hashes within "
        f"{report['thresholds']['near_duplicate_distance']} bits ({CROP_DISTANCE} for images of "
        f"{ALIGN_MIN_SIDE} px or more, and for pairs of different sizes up to {RESIZE_MAX_SIDE} px; "
        f"images up to {RESIZE_MAX_SIDE} px are also paired by their nearest thumbnails), "
        f"confirmed by a pixel distance ≤ {report['thresholds']['near_duplicate_pixel_distance']:g} "
        "(validate.near_duplicate_pixel_distance) or, for a crop, by an aligned comparison, or, for a "
        "resize, by a resampled one; raw brightness and contrast must agree too, and so must the colour "
        "of each quarter of the two images. Pairs of images up "
        f"to {RESIZE_MAX_SIDE} px must also differ at their own resolution by at most {NOISE_RATIO:g} "
        f"times what a JPEG re-encoding at quality {NOISE_QUALITY} changes (the noise ratio); pairs of "
        f"larger images, in {DETAIL}×{DETAIL} views once aligned, by at most {DETAIL_DISTANCE:g} in any "
        f"{DETAIL_CELL}×{DETAIL_CELL} px cell (the detail distance), so variants of one drawing that "
        "differ in a small part are not confirmed. Each group stays in one split where prepare draws the "
        "splits; one across splits had them given in the source, or recorded before it was found."
    )
    lines.append("")
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
    if thumbs.get("near"):
        lines += ["", f"![near duplicates]({thumbs['near']})"]
    if report["leakage"]:
        lines += ["", "Val/test images that also appear in train:", ""]
        lines += [
            f"- `{leak['path']}` ({leak['split']}, {leak['kind']}) ~ `{leak['train_paths'][0]}`"
            for leak in report["leakage"][:max_rows]
        ]
    lines += ["", f"### Similar pairs, not duplicates ({len(similar)})", ""]
    if not similar:
        return [*lines, "None."]
    lines.append(
        "Their hashes matched but their pixels differ by more than the confirmation cuts (the pixel "
        "distance, or for small images the noise ratio), their colours differ (a colour distance is "
        "listed where the gray levels matched), or a part of them differs (a detail distance is listed "
        "where the colours matched), so they count neither as duplicates nor as leakage. "
        "Listed closest first, for a person to check."
    )
    if thumbs.get("similar"):
        lines += ["", f"![similar pairs]({thumbs['similar']})"]
    lines.append("")
    rows = [
        [
            " ↔ ".join(f"`{p}`" for p in pair["paths"]),
            " / ".join(pair["labels"]) + (" ⚠️" if d["conflicting_labels"] else ""),
            " / ".join(pair["splits"]),
            pair["phash_distance"],
            f"{pair['pixel_distance']:.3f}",
            "—" if pair.get("noise_ratio") is None else f"{pair['noise_ratio']:.2f}",
            "—" if pair.get("colour_distance") is None else f"{pair['colour_distance']:.3f}",
            "—" if pair.get("detail_distance") is None else f"{pair['detail_distance']:.3f}",
            pair.get("unconfirmed_by") or "—",
        ]
        for d in similar[:max_rows]
        for pair in d["pairs"]
    ]
    header = ["files", "labels", "splits", "hash bits", "pixel distance"]
    return lines + _table(
        [*header, "noise ratio", "colour distance", "detail distance", "failed check"], rows
    )


def _audit_markdown(audit: dict, issues: list[dict], max_rows: int) -> list[str]:
    """The label-audit section of the validation report."""
    lines: list[str] = []
    lines += ["", "## Label audit", ""]
    if audit["status"] != "ran":
        lines.append(f"Not run: {audit.get('reason') or 'validate.label_audit is off'}.")
        return lines
    refits = (
        f", fitted {audit['fits']} times, each refit with the images flagged before left out of training"
        if audit.get("fits", 1) > 1
        else ""
    )
    ambiguity = (
        f" and by a share of ambiguous images whose label may be any of the classes ranked highest "
        f"({audit['estimated_ambiguity']:.1%})"
        if audit.get("estimated_ambiguity")
        else ""
    )
    lines.append(
        f"{audit['flagged']} of {audit['images']} images ({audit['flagged_fraction']:.1%}) flagged. "
        f"Out-of-sample probabilities from a {audit['folds']}-fold cross-validated classifier on "
        f"pretrained features at {audit['image_size'] or 'native'} px{refits}; the classifier agreed with "
        f"{audit['cv_accuracy_vs_given_labels']:.1%} of the given labels. A noise model fitted to them "
        f"estimates that {audit['estimated_noise_rate']:.1%} of the labels "
        f"(about {audit['estimated_label_errors']:.0f} images) were flipped to another class; classes "
        "that overlap are told apart from wrong labels by a calibration temperature "
        f"({audit['temperature']:.2f}){ambiguity}."
    )
    if audit["flagged"]:
        lines += [
            "",
            f"**Expected precision {audit['expected_precision']:.0%}**: about "
            f"{audit['expected_precision'] * audit['flagged']:.0f} of the {audit['flagged']} flagged labels "
            f"should be wrong, and they should hold {audit['expected_recall']:.0%} of the estimated wrong "
            "labels (both from the fitted error probabilities, which take a label the classifier "
            "confidently contradicts for a wrong one: where classes are conventions rather than looks, "
            "expect fewer). Listed for review; nothing is changed.",
        ]
    if audit.get("thumbnails"):
        lines += ["", f"![top suspects]({audit['thumbnails']})"]
    if issues:
        lines.append("")
        rows = [
            [i + 1, f"`{x['path']}`", x["given_label"], x["suggested_label"], f"{x['error_probability']:.2f}"]
            for i, x in enumerate(issues[:max_rows])
        ]
        lines += _table(["rank", "file", "given", "suggested", "P(label wrong)"], rows)
    if audit["confused_pairs"]:
        lines += ["", "Most confused class pairs:", ""]
        rows = [
            [" ↔ ".join(p["classes"]), p["examples"], f"{p['joint_probability']:.4f}"]
            for p in audit["confused_pairs"]
        ]
        lines += _table(["classes", "overlapping examples", "joint probability"], rows)
    if audit.get("not_audited"):
        lines += ["", f"Not audited (fewer than {audit['folds']} images): {', '.join(audit['not_audited'])}."]
    return lines


def _img(path) -> str:
    import base64
    from pathlib import Path

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{Path(path).stem}">'


def _html_table(header: list[str], rows: list[list]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def evaluation_html(
    flat: dict,
    per_class: dict,
    figures: dict,
    meta: dict,
    validation: dict | None,
    mistakes: list[dict],
    history: list[dict],
) -> str:
    """One self-contained page (images inlined): validation summary, metrics, plots, mistakes."""
    from html import escape

    test = {k.removeprefix("test_"): v for k, v in flat.items() if k.startswith("test_")}
    val = {k.removeprefix("val_"): v for k, v in flat.items() if k.startswith("val_")}

    def shown(value) -> str:  # counts stay whole numbers
        return str(value) if isinstance(value, int) else f"{value:.4f}"

    metric_rows = [[k, shown(test[k]), shown(val[k]) if k in val else "–"] for k in test]
    unscored = [c for c in meta["class_names"] if c not in per_class]
    class_rows = [
        [name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
        for name, c in sorted(per_class.items(), key=lambda kv: kv[1]["f1"])
    ]
    train_cfg = meta.get("config", {}).get("train", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>visiontune evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".fail{color:#b00}.warn{color:#a60}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p>Model <b>{escape(meta['architecture'])}</b>, "
        f"method <b>{escape(str(train_cfg.get('method')))}</b>, "
        f"{len(meta['class_names'])} classes, {meta['preprocessing']['size']} px, best epoch "
        f"{meta.get('best_epoch')} of {len(history)}. "
        f"Test accuracy <b>{escape(metrics.accuracy_text(flat))}</b>, "
        f"macro F1 <b>{test.get('macro_f1', 0):.4f}</b>, ECE {test.get('ece', 0):.4f}.</p>",
    ]
    if validation is not None:
        audit = validation.get("label_audit", {})
        parts.append("<h2>Data validation</h2>")
        parts.append(
            f"<p>Gate <b>{'passed' if validation['passed'] else 'FAILED'}</b>; "
            f"{validation['n_images']} images, "
            f"{len(validation.get('quarantined', []))} quarantined, {len(validation.get('duplicates', []))} "
            f"duplicate groups, {len(validation.get('leakage', []))} leaked into val/test, "
            f"{len(validation.get('label_issues', []))} suspected label errors"
            + (f" ({audit.get('flagged_fraction', 0):.1%})" if audit.get("status") == "ran" else "")
            + ".</p>"
        )
        parts += [f"<p class='fail'>✗ {escape(f)}</p>" for f in validation.get("failures", [])]
        parts += [f"<p class='warn'>⚠ {escape(w)}</p>" for w in validation.get("warnings", [])]
        if validation.get("label_issues"):
            rows = [[x["path"], x["given_label"], x["suggested_label"], f"{x['score']:.3f}"]
                    for x in validation["label_issues"][:10]]  # fmt: skip
            parts.append(_html_table(["suspect", "given", "suggested", "score"], rows))
    parts += ["<h2>Metrics</h2>", _html_table(["metric", "test", "val"], metric_rows)]
    if "curves" in figures:
        parts += ["<h2>Training curves</h2>", _img(figures["curves"])]
    parts += ["<h2>Confusion matrix</h2>", _img(figures["confusion"])]
    parts += ["<h2>Per class (test, worst F1 first)</h2>", _img(figures["per_class_f1"])]
    parts.append(_html_table(["class", "precision", "recall", "F1", "support"], class_rows))
    if unscored:
        names = escape(", ".join(unscored))
        parts.append(f"<p class='warn'>⚠ No test images, not scored and not averaged: {names}.</p>")
    parts += ["<h2>Calibration</h2>", _img(figures["reliability"])]
    parts.append(f"<h2>Misclassified test images ({len(mistakes)} shown, most confident first)</h2>")
    if "mistakes" in figures:
        parts.append(_img(figures["mistakes"]))
        rows = [[m["path"], m["label"], m["predicted"], f"{m['confidence']:.3f}"] for m in mistakes]
        parts.append(_html_table(["file", "true", "predicted", "confidence"], rows))
    else:
        parts.append("<p>None: every test image was classified correctly.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
