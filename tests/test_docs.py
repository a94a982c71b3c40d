"""The docs hold what the code says: params.yaml ↔ typed config, every user-facing error message in
Troubleshooting, a home in the site for every topic the long README had, and a short README."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from visiontune.components.config import Params

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
MIN_FRAGMENT = 12  # characters: shorter constant text only wraps another message (e.g. "{}: {}")


# ---- params.yaml and the typed config --------------------------------------------------------------


def _is_section(annotation) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """'section.key' → default, through nested sections (train.lora, flow.timeout_minutes)."""
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if _is_section(field.annotation):
            out.update(_defaults(field.annotation, f"{key}."))
        else:
            out[key] = field.get_default(call_default_factory=True)
    return out


def _shipped(raw: dict, model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """'section.key' → value in params.yaml, descending where the typed config has a section."""
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    out: dict[str, object] = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is not None and _is_section(field.annotation) and isinstance(value, dict):
            out.update(_shipped(value, field.annotation, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_params_yaml_holds_exactly_the_typed_config_keys_at_their_defaults():
    shipped = _shipped(yaml.safe_load((ROOT / "params.yaml").read_text()), Params)
    defaults = _defaults(Params)
    assert sorted(set(shipped) - set(defaults)) == [], "in params.yaml, not in components/config.py"
    assert sorted(set(defaults) - set(shipped)) == [], "in components/config.py, not in params.yaml"
    differ = {k: (shipped[k], defaults[k]) for k in defaults if shipped[k] != defaults[k]}
    assert differ == {}, "params.yaml value vs typed default"


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if _is_section(field.annotation):
            yield from _sections(field.annotation)


def test_every_key_and_section_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in _sections(Params)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == [], "add Field(description=...): the parameter reference is generated from it"


def test_params_yaml_comments_do_not_describe_keys_again():
    """One description per key, in the typed config: params.yaml keeps short pointers only."""
    text = (ROOT / "params.yaml").read_text()
    trailing = [line for line in text.splitlines() if re.match(r"\s*[\w-]+:.*\S\s+#", line)]
    assert trailing == []


# ---- generated references --------------------------------------------------------------------------


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_list_every_key_and_command():
    hooks = _hooks()
    parameters, cli = hooks.parameters_markdown(), hooks.cli_markdown()
    assert [k for k in _defaults(Params) if f">{k}</code>" not in parameters] == []
    import typer

    from visiontune.pipelines.cli import app

    group = typer.main.get_command(app)
    names = group.list_commands(group.context_class(group, info_name="visiontune"))
    assert len(names) > 10
    assert [n for n in names if f"\n## {n}\n" not in cli] == []


# ---- error messages in troubleshooting ---------------------------------------------------------------


def _text(node: ast.AST) -> str | None:
    """A message's text with "\0" for each placeholder; None when it is not a string expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return (left or "\0") + (right or "\0")
    return None


def _fragment(text: str) -> str:
    """The longest constant piece between placeholders, whitespace-normalized and trimmed."""
    pieces = (" ".join(p.split()).strip(" :;,.()'\"") for p in text.split("\0"))
    return max(pieces, key=len)


def _called(func: ast.AST) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _sources() -> dict[Path, ast.Module]:
    files = sorted([*(ROOT / "components").glob("*.py"), *(ROOT / "pipelines").glob("*.py")])
    return {f: ast.parse(f.read_text()) for f in files}


def _user_errors(trees: dict[Path, ast.Module]) -> set[str]:
    """VisiontuneError and every class derived from it, in any module."""
    names, grew = {"VisiontuneError"}, True
    while grew:
        grew = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names:
                    if any(_called(base) in names for base in node.bases):
                        names.add(node.name)
                        grew = True
    return names


def user_messages() -> list[tuple[str, str]]:
    """(where, fragment) for every message a user can meet:
    - the first argument of `raise X(...)` for X a VisiontuneError (what the CLI prints), typer's
      BadParameter, and the ValueErrors of config validators (they become ConfigError lines);
    - the gate's failure and warning lines (components/validate.py);
    - the HTTP error codes of `visiontune serve` (ServeError's second argument)."""
    trees = _sources()
    errors = _user_errors(trees) | {"BadParameter"}
    found = []
    for path, tree in trees.items():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                name = _called(node.exc.func)
                if name in errors or (name == "ValueError" and path.name == "config.py"):
                    text = _text(node.exc.args[0])
                    if text is not None:
                        found.append((f"{rel}:{node.lineno}", _fragment(text)))
                elif name == "ServeError" and len(node.exc.args) > 1:
                    code = _text(node.exc.args[1])
                    if code:
                        found.append((f"{rel}:{node.lineno}", code))
            if (
                path.name == "validate.py"
                and isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "append"
                and _called(node.func.value) in ("failures", "warnings")
                and node.args
            ):
                text = _text(node.args[0])
                if text is not None:
                    found.append((f"{rel}:{node.lineno}", _fragment(text)))
    return [(where, text) for where, text in found if len(text) >= MIN_FRAGMENT or "_" in text]


def test_the_collector_finds_the_messages():
    messages = dict(user_messages())
    assert len(messages) > 60
    fragments = set(messages.values())
    assert "not found; run from the project root or pass --params" in fragments
    assert "undecodable_image" in fragments
    assert "splits: the train and val splits must both hold images" in fragments


def test_every_user_facing_error_message_is_in_troubleshooting():
    page = " ".join(TROUBLESHOOTING.read_text().split())
    missing = [f"{where}: {fragment}" for where, fragment in user_messages() if fragment not in page]
    assert missing == [], "add these messages, what they mean and the fix, to docs/troubleshooting.md"


# ---- nothing of the long README lost ----------------------------------------------------------------

# Every `##`/`###` heading of the README before the site existed, the page that now holds that topic,
# and a distinctive phrase of its content that must be on that page.
README_TOPICS = {
    "Quickstart": ("getting-started.md", "0.9925 on average over `base.seed` 0, 1, 2"),
    "Bring your own data": ("data.md", "8×8 digit scans train at 64 px, 96 px crops at 96"),
    "What prepare does with your images": ("data.md", "a sixth of the class, so a class of 30 splits"),
    "The validation gate": ("validation.md", "Three numbers are then fitted to the given labels by maximum"),
    "Audit a dataset before training": ("validation.md", "visiontune audit path/to/folder_or.csv"),
    "Parameters": ("reference/parameters.md", "`train.epochz: unknown key`"),
    "Models and weights": ("training.md", "classify a real photo of a cat as a cat"),
    "Training": ("training.md", "the idea of Head2Toe, Evci et al. 2022"),
    "Several processes, GPUs or machines (DDP)": ("training.md", "NCCL_SOCKET_IFNAME"),
    "Stages and outputs": ("getting-started.md", "`stopped_early` — true only when training ended"),
    "Evaluation": ("evaluation-export.md", "the overfitting point (the first epoch after the best"),
    "Export and prediction": ("evaluation-export.md", "per-channel\nint8 weights"),
    "Experiments with DVC": ("getting-started.md", "dvc exp run -S train.lr=3e-4"),
    "Tracking and the model registry (MLflow)": ("tracking.md", "no half-registered version is left"),
    "Promotion and rollback": ("tracking.md", "Promotion never guesses."),
    "Prefect": ("prefect.md", "prints `prepare: cached, inputs unchanged`"),
    "Scheduled retraining": ("prefect.md", "AwaitingConcurrencySlot"),
    "Beyond one machine: data and tracking": ("beyond-one-machine.md", "the engines teams already run"),
    "Data in a DVC remote": ("beyond-one-machine.md", "the bucket holds the 25 content-addressed"),
    "A shared tracking server and registry": ("beyond-one-machine.md", "MLFLOW_SERVER_ALLOWED_HOSTS"),
    "Benchmarks": ("benchmarks.md", "Hash search on random hashes"),
    "Serving": ("serving.md", "the fragment never leaves\nthe browser"),
    "Dataset shift (drift)": ("drift.md", "black-box shift detection"),
    "Development": ("design.md", "`make lint` runs ruff"),
    "Running the tests on a GPU machine": ("design.md", "python -m pytest -m gpu -rs"),
    "Dependency floors": ("design.md", "psycopg2-binary 2.9.5 is the first with"),
    "Known limitations": ("troubleshooting.md", "so that level counts twice in the probe's input"),
}

# One figure of every benchmark table and measured paragraph the README held.
BENCHMARK_FIGURES = {
    "benchmarks.md": [
        "0.90 / 0.97 (0.94)",  # label audit
        "0.72 / 0.80 (0.74)",
        "20,000 112.1 s (53.7 s)",  # validate speed
        "| digits (8 px) | 1,797 | 1.000 | 0.967 |",  # near duplicates
        "| 100,000 | 0.45 | 3.00 | 15.8 |",  # hash search
        "<!-- bench: defaults -->",  # defaults: rendered from bench/results/defaults.json
        "0.8599 ± 0.0586",  # defaults on older code
        "57.6 (43.4–58.2)",  # train throughput
        "120.4 s and 166.4 s",  # time to 0.99
        "<!-- bench: check -->",  # methods and time to 0.99: rendered from bench/results/check.json
        "stage ÷ synthetic ≥ 0.9",  # gpu throughput
        "7.93 ms (2.16×)",  # onnx latency
        "int8: 3.98 MB",
        "39.8 (38.2–52.2)",  # serving
        "30.4 (14.8–35.1)",  # batching
        "574 requests, 0 failed",  # swap
        "106.5 vs 105.7 images/s",  # drift cost
        "| blur 5 | 0.20 / 0.91 / 1.00 |",  # drift detection
    ],
    "training.md": ["**4,472**", "10,671 images/s"],  # device policy (H100)
}


def _page(name: str) -> str:
    if name.startswith("reference/"):
        hooks = _hooks()
        return hooks.parameters_markdown() if name.endswith("parameters.md") else hooks.cli_markdown()
    return (DOCS / name).read_text()


@pytest.mark.parametrize("heading", sorted(README_TOPICS))
def test_every_topic_of_the_old_readme_has_a_home(heading):
    page, phrase = README_TOPICS[heading]
    assert " ".join(phrase.split()) in " ".join(_page(page).split()), f"{heading!r} → docs/{page}"


def test_every_benchmark_figure_is_kept():
    missing = [
        f"{page}: {figure}"
        for page, figures in BENCHMARK_FIGURES.items()
        for figure in figures
        if " ".join(figure.split()) not in " ".join(_page(page).split())
    ]
    assert missing == []


# ---- the README ------------------------------------------------------------------------------------


def test_readme_is_short_names_the_two_commands_and_links_into_the_site():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    assert "make run" in text and "make test" in text
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert [t for t in local if not (ROOT / t).exists()] == [], "README links to missing files"
    assert any(t.startswith("docs/") and t.endswith(".md") for t in local)
    assert [t for t in local if t.endswith(".png") and not t.startswith("docs/images/")] == []


def test_every_page_of_the_nav_is_in_docs_or_generated():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python/name:", ""))

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    generated = {_hooks().PARAMETERS, _hooks().CLI}
    listed = set(pages(config["nav"]))
    owned_elsewhere = {"share.md"}  # written beside this site; mkdocs build --strict checks it exists
    assert [p for p in listed - generated - owned_elsewhere if not (DOCS / p).is_file()] == []
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert sorted(on_disk - listed) == [], "pages in docs/ missing from the nav"
