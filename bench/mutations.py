"""Mutation check: flip the key comparison of each decision function in a scratch copy of the
project and run the tests that guard it. A mutation no test catches is a hole in the suite.

    python bench/mutations.py            # every mutation (about 40 minutes on 2 cores)
    python bench/mutations.py promote    # those whose name contains "promote"
    python bench/mutations.py --list

The project itself is never edited: each mutation is applied to a copy of the tracked files in a
temporary folder, imported ahead of the installed package (a `visiontune` package there points at
the copy's components/ and pipelines/), and the copy is deleted afterwards. Prints one line per
mutation: caught (with the first failing test) or MISSED, and exits 1 if any was missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that should catch it


MUTATIONS = [
    Mutation(
        "promote: the comparison's sign flipped",
        "components/tracking.py",
        "sign = 1 if cfg.greater_is_better else -1",
        "sign = -1 if cfg.greater_is_better else 1",
        ("tests/test_registry.py::test_the_better_version_is_promoted_in_either_order",),
    ),
    Mutation(
        "promote: min_improvement needs a strict win (>= became >)",
        "components/tracking.py",
        "promoted = gain > 0 and gain >= cfg.min_improvement",
        "promoted = gain > 0 and gain > cfg.min_improvement",
        ("tests/test_registry.py::test_floors_min_improvement_and_direction_bite_at_their_boundary",),
    ),
    Mutation(
        "promote: a floor needs a strict win (>= became >)",
        "components/tracking.py",
        'if not candidate.metrics.get(k, float("-inf")) >= v]',
        'if not candidate.metrics.get(k, float("-inf")) > v]',
        ("tests/test_registry.py::test_floors_min_improvement_and_direction_bite_at_their_boundary",),
    ),
    Mutation(
        "promote: the logged metrics decide, not the re-scored artifact",
        "components/tracking.py",
        "    return {**logged, **scored}",
        "    return {**scored, **logged}",
        ("tests/test_registry.py::test_a_champion_scored_on_other_data_is_re_evaluated_and_that_decides",),
    ),
    Mutation(
        "promote: the artifact's integrity not checked",
        "components/tracking.py",
        'if version.tags.get("manifest_sha256") == on_disk:',
        "if False:",
        ("tests/test_registry.py::test_an_artifact_that_does_not_score_what_was_logged_is_refused",),
    ),
    Mutation(
        "promote: an exact tie promotes the challenger",
        "components/tracking.py",
        "promoted = gain > 0 and gain >= cfg.min_improvement",
        "promoted = gain >= cfg.min_improvement",
        ("tests/test_registry.py::test_an_exact_tie_keeps_the_champion",),
    ),
    Mutation(
        "promote: any registry error read as 'no such alias'",
        "components/tracking.py",
        "    except RegistryError as exc:\n        if exc.error_code == ",
        "    except RegistryError as exc:\n        return None\n        if exc.error_code == ",
        ("tests/test_registry.py::test_a_registry_error_during_promotion_is_an_error_and_moves_nothing",),
    ),
    Mutation(
        "gate: leakage ignored",
        "components/validate.py",
        'if report["leakage"] and not cfg.allow_leakage:',
        "if False:",
        ("tests/test_validate.py",),
    ),
    Mutation(
        "gate: the imbalance limit itself fails (> became >=)",
        "components/validate.py",
        'if balance["imbalance_ratio"] > cfg.max_imbalance_ratio:',
        'if balance["imbalance_ratio"] >= cfg.max_imbalance_ratio:',
        ("tests/test_validate.py",),
    ),
    Mutation(
        "gate: a class at min_per_class fails (< became <=)",
        "components/validate.py",
        "if n < cfg.min_per_class)",
        "if n <= cfg.min_per_class)",
        ("tests/test_validate.py",),
    ),
    Mutation(
        "gate: the label-issue limit itself fails (> became >=)",
        "components/validate.py",
        'audit["flagged_fraction"] > cfg.max_label_issue_fraction',
        'audit["flagged_fraction"] >= cfg.max_label_issue_fraction',
        ("tests/test_validate.py",),
    ),
    Mutation(
        "early stopping: a tie counts as an improvement (< became <=)",
        "components/train.py",
        'if val_loss < progress.best["val_loss"] - run.cfg.min_delta:',
        'if val_loss <= progress.best["val_loss"] - run.cfg.min_delta:',
        ("tests/test_train.py",),
    ),
    Mutation(
        "early stopping: patience off by one (>= became >)",
        "components/train.py",
        "patience_spent = progress.bad_epochs >= cfg.patience",
        "patience_spent = progress.bad_epochs > cfg.patience",
        ("tests/test_train.py",),
    ),
    Mutation(
        "duplicates: the pixel confirmation accepts anything",
        "components/duplicates.py",
        "ok = (dist <= threshold) & ",
        "ok = (dist <= threshold + 10) & ",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the pixel confirmation ignores brightness and contrast",
        "components/duplicates.py",
        "        toned = tones_agree(tones[row[a]], tones[row[b]])\n",
        "        toned = np.ones(len(pairs), dtype=bool)\n",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the crop check's gain test dropped",
        "components/duplicates.py",
        "& (aligned <= ALIGN_GAIN * plain)",
        "& (aligned <= 10 * plain)",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the resampled comparison accepts anything",
        "components/duplicates.py",
        "resize = resampled <= RESAMPLED_DISTANCE",
        "resize = resampled <= RESAMPLED_DISTANCE + 10",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: small images of different sizes not given the resampled comparison",
        "components/duplicates.py",
        "try_small = ~ok & (bits <= crop_distance) & small &",
        "try_small = ~ok & (bits <= max_distance) & small &",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: small images not compared at their own resolution",
        "components/duplicates.py",
        "ok &= ~small | (ratio <= NOISE_RATIO)",
        "ok &= ~small | (ratio <= NOISE_RATIO + 100)",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the native crop search accepts anything",
        "components/duplicates.py",
        "    ok = resize | ((ratio <= NOISE_RATIO) & (dist <= threshold))",
        "    ok = resize | ((ratio <= NOISE_RATIO + 100) & (dist <= threshold + 100))",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: a small crop confirmed by its noise ratio alone",
        "components/duplicates.py",
        "    ok = resize | ((ratio <= NOISE_RATIO) & (dist <= threshold))",
        "    ok = resize | (ratio <= NOISE_RATIO)",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: small crops beyond the hash search not looked for",
        "components/duplicates.py",
        "    far = _thumbnail_candidates(hashes, paths, sizes, crop_distance, threshold, max_pixels, "
        "thumbs, row)",
        "    far = (np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32))",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the native crop search ignores brightness and contrast",
        "components/duplicates.py",
        "    agree = np.flatnonzero(tones_agree(tone(_unit(views)), tone(_unit(target))))",
        "    agree = np.arange(len(views))",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "duplicates: the resampled comparison ignores brightness and contrast",
        "components/duplicates.py",
        "            if tones_agree(seen_tone, tone(made)):",
        "            if True:",
        ("tests/test_duplicates.py",),
    ),
    Mutation(
        "splits: the small-class floor dropped",
        "components/splits.py",
        "return max(int(fraction * n + 0.5), min(rule.min_eval_per_class, n // 6))",
        "return int(fraction * n + 0.5)",
        ("tests/test_splits.py",),
    ),
    Mutation(
        "splits: new images ignore the recorded quota",
        "components/splits.py",
        'room = {"test": test - have.get("test", 0), "val": val - have.get("val", 0)}',
        'room = {"test": test, "val": val}',
        ("tests/test_splits.py",),
    ),
    Mutation(
        "splits: near-duplicate groups drawn one image at a time",
        "components/splits.py",
        "    units = _units(label_of.index, near)",
        "    units = _units(label_of.index, ())",
        ("tests/test_splits.py", "tests/test_validate.py"),
    ),
    Mutation(
        "splits: a copy added later ignores its original's recorded split",
        "components/splits.py",
        "        if splits:\n            joined",
        "        if False:\n            joined",
        ("tests/test_splits.py",),
    ),
    Mutation(
        "duplicates: validate ignores prepare's record",
        "components/validate.py",
        "found = place(found, frame) if found is not None else",
        "found = place(found, frame) if False else",
        ("tests/test_validate.py",),
    ),
    Mutation(
        "audit: no ambiguity share in the noise model",
        "components/audit.py",
        "    if k < 2:\n        return None",
        "    if True:\n        return None",
        ("tests/test_audit.py",),
    ),
    Mutation(
        "audit: no refit without the flagged images",
        "components/audit.py",
        "for fits in range(1, AUDIT_ROUNDS + 1):",
        "for fits in range(1, 2):",
        ("tests/test_audit.py::test_refitting_without_the_flagged_images_finds_flips_a_single_fit_misses",),
    ),
    Mutation(
        "audit: a refit's temperature free to soften",
        "components/audit.py",
        "max_temperature=first_temperature or MAX_TEMPERATURE",
        "max_temperature=MAX_TEMPERATURE",
        ("tests/test_audit.py::test_a_refit_keeps_the_first_fits_temperature_as_its_softest",),
    ),
    Mutation(
        "audit: only the estimated count flagged (the flag bar ignored)",
        "components/audit.py",
        "int((error >= flag_probability).sum())",
        "0",
        ("tests/test_audit.py",),
    ),
    Mutation(
        "calibration: the temperature multiplies the logits instead of dividing them",
        "components/train.py",
        "models.scale_logits(model, 1.0 / temperature)",
        "models.scale_logits(model, temperature)",
        (
            "tests/test_train.py::test_the_checkpoint_is_the_trained_model_with_its_logits_divided_by_the_fitted_temperature",
        ),
    ),
    Mutation(
        "calibration: no cap on sharpening",
        "components/metrics.py",
        "if best < 0 and excess(best) > 0:",
        "if False:",
        ("tests/test_metrics.py::test_temperature_sharpens_only_up_to_the_rule_of_succession_accuracy",),
    ),
    Mutation(
        "duplicates: images of one size paired by thumbnails ignore brightness and contrast",
        "components/duplicates.py",
        "        if one_size and not tones_agree(tone(raw[0]), tone(raw[1])):",
        "        if False:",
        ("tests/test_duplicates.py::test_reencoded_symmetric_drawings_are_found_beyond_the_hash_search",),
    ),
    Mutation(
        "duplicates: images of one size not paired by thumbnails",
        "components/duplicates.py",
        "            & (shapes[None] - shapes[:, None] <= CROP_FRACTION * shapes[None]).all(-1)\n",
        "            & (shapes[None] - shapes[:, None] <= CROP_FRACTION * shapes[None]).all(-1)\n"
        "            & (shapes[:, None] != shapes[None]).any(-1)\n",
        ("tests/test_duplicates.py::test_reencoded_symmetric_drawings_are_found_beyond_the_hash_search",),
    ),
    Mutation(
        "duplicates: colour is not checked",
        "components/duplicates.py",
        "    coloured = colours_agree(a, b)\n",
        "    coloured = np.ones(len(pairs), dtype=bool)\n",
        (
            "tests/test_duplicates.py::test_pictures_alike_in_gray_but_not_in_colour_are_similar_not_duplicates",
        ),
    ),
    Mutation(
        "duplicates: no brightness allowance in the colour check",
        "components/duplicates.py",
        "COLOUR_TOLERANCE + COLOUR_GAIN * np.maximum(np.abs(a), np.abs(b))",
        "COLOUR_TOLERANCE",
        ("tests/test_duplicates.py::test_colour_pictures_edited_as_duplicates_are_still_confirmed",),
    ),
    Mutation(
        "duplicates: detail is not checked",
        "components/duplicates.py",
        "    ok = coloured & ~(detail > DETAIL_DISTANCE)\n",
        "    ok = coloured\n",
        ("tests/test_duplicates.py::test_variants_of_one_template_are_similar_pairs_failed_on_detail",),
    ),
    Mutation(
        "duplicates: detail views are not aligned",
        "components/duplicates.py",
        "        return min(float(found[k]), *both_ways)\n",
        "        return float(found[k])\n",
        ("tests/test_duplicates.py::test_edited_copies_of_a_line_drawing_pass_the_detail_check",),
    ),
    Mutation(
        "serve: an unparseable host name counted as loopback (no token needed)",
        "pipelines/serve.py",
        "    except ValueError:  # a host name: it may resolve to anything\n        return False",
        "    except ValueError:  # a host name: it may resolve to anything\n        return True",
        ("tests/test_serve.py::test_only_a_loopback_address_serves_without_a_token",),
    ),
    Mutation(
        "serve: /v1/drift open without the token",
        "pipelines/serve.py",
        'OPEN_PATHS = ("/healthz", "/readyz",',
        'OPEN_PATHS = ("/v1/drift", "/healthz", "/readyz",',
        ("tests/test_serve.py::test_a_token_guards_the_api_and_a_refused_request_never_reaches_the_model",),
    ),
    Mutation(
        "serve: the token compared with startswith (an empty bearer or half the token passes)",
        "pipelines/serve.py",
        "hmac.compare_digest(given.strip(), self.token)",
        "self.token.startswith(given.strip())",
        ("tests/test_serve.py::test_a_token_guards_the_api_and_a_refused_request_never_reaches_the_model",),
    ),
    Mutation(
        "serve: any scheme accepted beside the token (Basic <token>)",
        "pipelines/serve.py",
        'if scheme.lower() == b"bearer" and hmac',
        "if hmac",
        ("tests/test_serve.py::test_a_token_guards_the_api_and_a_refused_request_never_reaches_the_model",),
    ),
    Mutation(
        "serve: the drift monitor ignores drift.alpha and drift.permutations",
        "pipelines/drift_monitor.py",
        "drift.check(self.reference, embeddings, probs, self.cfg.alpha, self.cfg.permutations)",
        "drift.check(self.reference, embeddings, probs)",
        (
            "tests/test_drift_command.py::test_the_serve_monitor_checks_full_windows_and_a_swapped_out_one_takes_nothing",
        ),
    ),
    Mutation(
        "export: parity passes when a top-1 answer changes within atol",
        "components/export.py",
        "if max_diff > allowed or agreement < 1.0:",
        "if max_diff > allowed:",
        ("tests/test_export.py::test_a_changed_top1_answer_fails_parity_even_within_atol",),
    ),
    Mutation(
        "export: mean and std swapped in the ONNX metadata",
        "components/export.py",
        '        "mean": json.dumps(list(prep.mean)),\n        "std": json.dumps(list(prep.std)),',
        '        "mean": json.dumps(list(prep.std)),\n        "std": json.dumps(list(prep.mean)),',
        ("tests/test_export.py::test_the_metadata_carries_a_per_channel_mean_and_std_the_right_way_round",),
    ),
    Mutation(
        "predict and serve: mean and std swapped when read from the ONNX metadata",
        "components/predict.py",
        'self.mean, self.std = json.loads(meta["mean"]), json.loads(meta["std"])',
        'self.std, self.mean = json.loads(meta["mean"]), json.loads(meta["std"])',
        (
            "tests/test_predict.py::test_predictions_equal_pytorch_on_the_test_split",
            "tests/test_serve.py::test_a_per_channel_mean_and_std_serve_pytorchs_probabilities",
        ),
    ),
    Mutation(
        "hub: mean and std swapped in the Hub folder's config",
        "components/hub.py",
        '        "mean": tuple(prep.mean),\n        "std": tuple(prep.std),',
        '        "mean": tuple(prep.std),\n        "std": tuple(prep.mean),',
        ("tests/test_hub.py::test_a_per_channel_mean_and_std_reach_timm_the_right_way_round",),
    ),
    Mutation(
        "hf_source: ClassLabel names ignored (the index becomes the label)",
        "components/hf_source.py",
        "        return names[value]",
        "        return str(value)",
        ("tests/test_hf_source.py::test_a_saved_dataset_gives_the_folders_manifest_and_is_left_untouched",),
    ),
    Mutation(
        "flow: the cache key ignores the tracking URI for register",
        "pipelines/flow.py",
        'stage("register", extra=tracking_uri())',
        'stage("register")',
        ("tests/test_flow.py::test_a_rerun_skips_unchanged_stages_and_reruns_what_changed",),
    ),
    Mutation(
        "flow: the cache key ignores the code (pipelines/ and components/)",
        "pipelines/caching.py",
        '        "code": code_version(stage),\n',
        "",
        ("tests/test_codedeps.py", "tests/test_caching.py"),
    ),
    Mutation(
        "flow: the cache key ignores the stage's files under pipelines/",
        "pipelines/caching.py",
        "    for relative in codedeps.stage_code(stage):",
        '    for relative in [r for r in codedeps.stage_code(stage) if not r.startswith("pipelines/")]:',
        ("tests/test_codedeps.py",),
    ),
    Mutation(
        "codedeps: imports inside functions not followed (lazy imports missed)",
        "pipelines/codedeps.py",
        "tree = _module_level(relative) if relative == WIRING else _tree(relative)",
        "tree = _module_level(relative)",
        ("tests/test_codedeps.py",),
    ),
    Mutation(
        "codedeps: the stage's wiring module left out of its deps",
        "pipelines/codedeps.py",
        "    return tuple(sorted(_closure(start)))",
        "    return tuple(sorted(_closure(start) - {WIRING}))",
        ("tests/test_codedeps.py",),
    ),
]


def scratch_copy(dest: Path) -> None:
    """The tracked files (as they are in the working tree) and a `visiontune` package over them."""
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src, dst = ROOT / name, dest / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    package = dest / "_import" / "visiontune"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for sub in ("components", "pipelines"):
        (package / sub).symlink_to(dest / sub, target_is_directory=True)


def run(mutation: Mutation, timeout: float) -> tuple[str, float]:
    """('caught: <test>' | 'MISSED' | 'not applied: ...', seconds) for one mutation."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        target = copy / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return f"not applied: the snippet occurs {text.count(mutation.old)} times in {mutation.file}", 0.0
        target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(copy / "_import"), "OMP_NUM_THREADS": "1"}
        where = subprocess.run(
            [sys.executable, "-c", "import visiontune.components as c; print(c.__file__)"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        if not where.startswith(str(copy)):
            return f"not applied: visiontune imports from {where.strip()}, not the copy", 0.0
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
             *mutation.tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        seconds = time.perf_counter() - started
    if done.returncode == 0:
        return "MISSED", seconds
    failed = [line.split(" ", 2)[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    if not failed:  # collection or usage errors are not a catch
        return f"not run (pytest exit {done.returncode}): {done.stdout[-300:]}", seconds
    return f"caught: {failed[0]}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run the mutations whose name contains any of these")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}; {' '.join(m.tests)}]")
        return 0
    missed = 0
    for m in chosen:
        outcome, seconds = run(m, args.timeout)
        missed += not outcome.startswith("caught")
        print(f"{m.name:64s} {outcome}  ({seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
