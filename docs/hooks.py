"""MkDocs hook: generates the parameter and CLI references from the code at build time, and renders
recorded benchmark figures into the pages that show them.

Registered under `hooks:` in mkdocs.yml. The parameter reference reads the pydantic models of
components/config.py (type, default, allowed values, `Field(description=...)`) and dvc.yaml (which
stage reads which section); the CLI reference reads the typer app of pipelines/cli.py. Nothing
generated is committed: the pages exist only in the built site. A line `<!-- bench: NAME -->` in a
page becomes the table of bench/results/NAME.json (written by the bench's `--record`), with its
commit, date, machine and command, and a warning when a file it measured has changed since.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS = "reference/parameters.md"
CLI = "reference/cli.md"


# ---- parameters ---------------------------------------------------------------------------------


def _is_section(annotation: Any) -> bool:
    from pydantic import BaseModel

    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _type_name(annotation: Any) -> str:
    """`int`, `float or null`, `list of str`, ...: the YAML-side reading of a type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = []
        for arg in args:
            name = "null" if arg is type(None) else _type_name(arg)
            if name not in names:
                names.append(name)
        return " or ".join(names)
    if origin is typing.Literal:
        return "str" if all(isinstance(a, str) for a in args) else "literal"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation, str(annotation))


def _bounds(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        if hasattr(item, "metadata"):  # a FieldInfo inside Annotated[...]
            out += _bounds(list(item.metadata))
            continue
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return out


def _allowed(annotation: Any, metadata: list[Any]) -> str:
    """Allowed values: the Literal choices and numeric bounds, from the field and inside its type."""
    parts = _bounds(metadata)
    stack = [annotation]
    while stack:
        item = stack.pop(0)
        origin, args = typing.get_origin(item), typing.get_args(item)
        if origin is typing.Literal:
            parts.extend(f"`{_yaml(a)}`" for a in args)
        elif origin is typing.Annotated:
            bounds = _bounds(list(args[1:]))
            parts.extend(f"{_type_name(args[0])} {b}" for b in bounds)
        elif origin in (typing.Union, types.UnionType):
            stack.extend(args)
    return ", ".join(parts)


def _yaml(value: Any) -> str:
    """A value as params.yaml writes it."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def _key(text: str) -> str:
    """A key or option name that never wraps (docs/stylesheets/extra.css)."""
    return f'<code class="vt-key">{text}</code>'


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _readers() -> dict[str, list[str]]:
    """Section (or section.key) → the dvc.yaml stages that declare it among their params."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for stage, spec in stages.items():
        for entry in spec.get("params", []):
            for key in entry if isinstance(entry, dict) else [entry]:
                out.setdefault(str(key), []).append(stage)
    return out


def _rows(model: type, prefix: str, nested: list[tuple[str, Any, str]]) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        if _is_section(field.annotation):
            nested.append((f"{prefix}.{key}", field.annotation, field.description or ""))
            cell = f"section: see [`{prefix}.{key}`](#{prefix.replace('.', '')}{key})"
            rows.append(f"| {_key(f'{prefix}.{key}')} | {cell} | | | {_cell(field.description or '')} |")
            continue
        default = _yaml(field.get_default(call_default_factory=True))
        allowed = _allowed(field.annotation, field.metadata)
        cells = [
            _key(f"{prefix}.{key}"),
            _type_name(field.annotation),
            f"`{_cell(default)}`",
            _cell(allowed),
            _cell(field.description or ""),
        ]
        rows.append(f"| {' | '.join(cells)} |")
    return rows


def parameters_markdown() -> str:
    """The parameter reference: one table per params.yaml section, from the typed config."""
    from visiontune.components.config import Params

    readers = _readers()
    lines = [
        "# Parameters",
        "",
        "Generated from the typed config (`components/config.py`) when the site is built: every key of",
        "`params.yaml` with its type, default, allowed values and meaning. The shipped `params.yaml`",
        "holds exactly these keys at these defaults (a test checks it).",
        "",
        "`params.yaml` has one section per stage. Each is parsed into a frozen typed model: an unknown",
        "key or an invalid value is an error that names it (`train.epochz: unknown key`). Override a key",
        "for one run with `visiontune <command> --set train.lr=3e-4` (or `-S`), or as a DVC experiment",
        "with `dvc exp run -S train.lr=3e-4`.",
        "",
    ]
    for name, field in Params.model_fields.items():
        section = field.alias or name
        lines += [f"## {section}", "", field.description or "", ""]
        read = [f"`{stage}`" for stage in readers.get(section, [])]
        for key, stages in readers.items():
            if key.startswith(f"{section}."):
                read += [f"`{stage}` (`{key}`)" for stage in stages]
        if read:
            lines += [f"Read in `dvc.yaml` by: {', '.join(read)}.", ""]
        nested: list[tuple[str, Any, str]] = []
        lines += _rows(field.annotation, section, nested)
        lines.append("")
        while nested:
            prefix, model, description = nested.pop(0)
            lines += [f"### {prefix}", "", description, ""]
            lines += _rows(model, prefix, nested)
            lines.append("")
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------


def _takes(param: Any) -> str:
    """What a parameter takes: typer's annotation (typer ≥ 0.2x) or click's type name (older typer)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is not None:
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        name = {Path: "path", str: "text", int: "integer", float: "number", bool: "flag"}.get(annotation, "")
        name = name or getattr(annotation, "__name__", str(annotation))
    else:
        name = param.type.name.lower()
    if getattr(param, "min", None) is not None:
        name += f" ≥ {param.min}"
    return name


def _option_row(param: Any) -> str:
    names = ", ".join(_key(n) for n in [*param.opts, *param.secondary_opts])
    kind = "flag" if param.is_flag else _takes(param)
    if param.multiple:
        kind += ", repeatable"
    default = param.default
    if default is None or (param.is_flag and default is False) or param.multiple:
        shown = ""
    else:
        shown = f"`{default}`"
    return f"| {names} | {kind} | {shown} | {_cell(getattr(param, 'help', None) or '')} |"


def cli_markdown() -> str:
    """The CLI reference: every `visiontune` command, its arguments and options, from the typer app."""
    import typer

    from visiontune.pipelines.cli import app

    group = typer.main.get_command(app)  # a click group (typer vendors click: duck-typed below)
    ctx = group.context_class(group, info_name="visiontune")
    lines = [
        "# Command line",
        "",
        "Generated from the typer app (`pipelines/cli.py`) when the site is built;",
        "`visiontune COMMAND --help` prints the same. A command that fails on bad input prints one",
        "line, `visiontune COMMAND: what is wrong and the fix`, and exits with code 1;",
        "[Troubleshooting](../troubleshooting.md) lists every such message.",
        "",
        group.help or "",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    names = group.list_commands(ctx)
    for name in names:
        command = group.get_command(ctx, name)
        lines.append(f"| [`{name}`](#{name}) | {_cell(command.get_short_help_str(limit=200))} |")
    lines.append("")
    for name in names:
        command = group.get_command(ctx, name)
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option"]
        usage = " ".join(
            ["[OPTIONS]"] * bool(options)
            + [p.name.upper() + ("..." if p.nargs == -1 else "") for p in arguments]
        )
        lines += [f"## {name}", "", "```text", f"visiontune {name} {usage}".rstrip(), "```", ""]
        lines += [inspect.cleandoc(command.help or ""), ""]
        if arguments:
            lines += ["| argument | help |", "|---|---|"]
            for p in arguments:
                many = " (one or more)" if p.nargs == -1 else ""
                lines.append(f"| `{p.name.upper()}`{many} | {_cell(getattr(p, 'help', None) or '')} |")
            lines.append("")
        if options:
            lines += ["| option | takes | default | help |", "|---|---|---|---|"]
            lines += [_option_row(p) for p in options]
            lines.append("")
    return "\n".join(lines)


# ---- recorded benchmark figures ------------------------------------------------------------------

BENCH_MARK = re.compile(r"^<!-- bench: ([\w-]+) -->$", re.MULTILINE)


def changed_since_recorded(record: dict, root: Path = ROOT) -> list[str]:
    """The measured files whose content differs from what they were when the figures were recorded."""
    changed = []
    for name, digest in record.get("files", {}).items():
        path = root / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            changed.append(name)
    return changed


def bench_markdown(name: str, root: Path = ROOT) -> str:
    """The figures of bench/results/<name>.json as a table, under where and how they were measured:
    checked figures (`figures`, by bench/check.py) or a bench's own table (`table`: columns, rows)."""
    path = root / "bench" / "results" / f"{name}.json"
    if not path.exists():
        return f'!!! warning "Not recorded"\n    `bench/results/{name}.json` does not exist yet.\n'
    record = json.loads(path.read_text())
    lines = _stale_warning(record, root)
    if "table" in record:
        columns, rows = record["table"]["columns"], record["table"]["rows"]
        lines += [_provenance_line(record), "", f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        if record.get("note"):
            lines += ["", f"{record['note'][0].upper()}{record['note'][1:]}."]
        return "\n".join(lines) + "\n"
    lines += [
        _provenance_line(record) + " `make bench-check` reruns them and fails on a regression.",
        "",
        "| figure | recorded | target | fails when |",
        "|---|---:|---:|---|",
    ]
    for figure in record["figures"].values():
        fmt = figure["fmt"]
        worse = "lower" if figure["better"] == "higher" else "higher"
        tolerance = f"{figure['tolerance']:.0%}" if figure["relative"] else f"{figure['tolerance']:g}"
        target = "" if figure["target"] is None else f"{figure['target']:g}"
        lines.append(
            f"| {figure['what']} | {figure['value']:{fmt}} | {target} | {tolerance} {worse} than recorded |"
        )
    return "\n".join(lines) + "\n"


def _stale_warning(record: dict, root: Path) -> list[str]:
    changed = changed_since_recorded(record, root)
    if not changed:
        return []
    shown = ", ".join(f"`{f}`" for f in changed[:8]) + (
        f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    )
    return [
        '!!! warning "Older than the code it measures"',
        f"    These figures were recorded before {shown} changed. Rerun `{record['command']}`.",
        "",
    ]


def _provenance_line(record: dict) -> str:
    dirty = " plus uncommitted changes" if record.get("uncommitted_changes") else ""
    return (
        f"Recorded by `{record['command']}` at commit `{record['commit'][:12]}`{dirty} on "
        f"{record['date'][:10]}, {record['machine']} (load average {record['load_average'][0]} at the "
        f"start), in {record['seconds']} s."
    )


# ---- MkDocs events --------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the site's files, before the nav is built from them."""
    from mkdocs.structure.files import File

    for path, render in ((PARAMETERS, parameters_markdown), (CLI, cli_markdown)):
        files.append(File.generated(config, path, content=render()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Each `<!-- bench: NAME -->` line rendered from bench/results/NAME.json."""
    return BENCH_MARK.sub(lambda m: bench_markdown(m.group(1)), markdown)
