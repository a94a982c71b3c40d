"""The source files each stage runs, derived from the imports in the code (no list kept by hand).

A stage's code is its wiring function in `pipelines/stages.py` (and the helpers there it calls),
the project modules those import, and everything they import in turn, at module level or inside
a function: a lazy import runs too. Third-party packages are not followed. Both runners use it:
dvc.yaml's code deps must equal it (tests/test_codedeps.py says which file is missing or extra),
and the Prefect flow's cache key hashes the same files, so `dvc repro` and `visiontune run`
rerun the same stages for the same change.

    python -m visiontune.pipelines.codedeps            # every stage's code deps, as dvc.yaml lists them
    python -m visiontune.pipelines.codedeps train      # one stage's
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

# import name of each project package -> its folder in the repository (and in dvc.yaml's deps)
PACKAGES = {"visiontune.components": "components", "visiontune.pipelines": "pipelines"}
WIRING = "pipelines/stages.py"  # where each stage's function lives (the STAGES table)


def _package_dirs() -> dict[str, Path]:
    """Where each project package's files are on this machine (the repo, or site-packages)."""
    import visiontune.components
    import visiontune.pipelines

    return {
        "components": Path(visiontune.components.__file__).parent,
        "pipelines": Path(visiontune.pipelines.__file__).parent,
    }


def source(relative: str) -> Path:
    """The file on disk for a repo-relative module path such as 'components/train.py'."""
    folder, _, name = relative.partition("/")
    return _package_dirs()[folder] / name


@functools.cache
def _tree(relative: str) -> ast.Module:
    return ast.parse(source(relative).read_text(), filename=relative)


def _module_file(package: str, name: str) -> str | None:
    """'components/x.py' when `package.name` is one of the project's modules, else None."""
    folder = PACKAGES.get(package)
    if folder is None:
        return None
    relative = f"{folder}/{name}.py"
    return relative if source(relative).is_file() else None


def _imports(node: ast.AST, here: str) -> set[str]:
    """Project modules imported anywhere under `node` of the file `here` ('pipelines/x.py')."""
    own_package = next(p for p, folder in PACKAGES.items() if here.startswith(folder + "/"))
    found: set[str] = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            for alias in item.names:
                package, _, name = alias.name.rpartition(".")
                found.add(_module_file(package, name))
        elif isinstance(item, ast.ImportFrom):
            if item.level > 1:
                raise ValueError(f"{here}: imports from a parent package; import visiontune.* instead")
            package = own_package if item.level == 1 else item.module or ""
            if item.level == 1 and item.module:
                found.add(_module_file(own_package, item.module))  # from .x import y
                continue
            found.add(_module_file(*package.rsplit(".", 1)) if "." in package else None)
            for alias in item.names:  # from visiontune.components import manifest
                found.add(_module_file(package, alias.name))
    return found - {None}


def _module_level(relative: str) -> ast.Module:
    """The imports at the top of a module, without those inside its functions."""
    body = [n for n in _tree(relative).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return ast.Module(body=body, type_ignores=[])


def _closure(start: set[str]) -> set[str]:
    """`start` and every project module reachable from it through imports."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        relative = todo.pop()
        if relative in seen:
            continue
        seen.add(relative)
        tree = _module_level(relative) if relative == WIRING else _tree(relative)
        todo.extend(_imports(tree, relative) - seen)
    return seen


def _wiring_functions(stage: str) -> list[ast.FunctionDef]:
    """The stage's function in pipelines/stages.py and the module's functions it calls, transitively."""
    defs = {n.name: n for n in _tree(WIRING).body if isinstance(n, ast.FunctionDef)}
    if stage not in defs:
        raise KeyError(f"{WIRING} has no function for stage {stage!r}")
    chosen, todo = {}, [stage]
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen[name] = defs[name]
        calls = [c for c in ast.walk(defs[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        called = {c.func.id for c in calls}
        todo.extend(called & defs.keys())
    return list(chosen.values())


@functools.cache
def stage_code(stage: str) -> tuple[str, ...]:
    """The repo-relative source files stage `stage` runs, sorted: its wiring and their import closure."""
    start = {WIRING}  # its top-level imports, and of its functions only the stage's own
    for function in _wiring_functions(stage):
        start |= _imports(function, WIRING)
    return tuple(sorted(_closure(start)))


def main(argv: list[str]) -> int:
    from .stages import STAGES

    for stage in argv or list(STAGES):
        print(f"{stage}:")
        for relative in stage_code(stage):
            print(f"  - {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
