"""The data version a model is trained on: the DVC hash of data.source, computed by DVC itself.

The flow caches prepare on it, the data-triggered run compares it with the newest registered
version's, and register tags every version with it. DVC is imported here, in pipelines/, and
only when a hash is asked for.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.components.prepare import SourceError


def source_hash(source: str) -> str:
    """The DVC hash of data.source as it is now: the data version a model is trained on.

    A folder hashes as DVC hashes a tracked directory (`<md5>.dir`, the value in `data/raw.dvc`
    and dvc.lock), so it matches what `dvc add` and `dvc repro` record; a CSV hashes its own folder,
    where relative image paths point. Inside a DVC repo, DVC's state database makes a rerun on
    unchanged files cheap. A built-in dataset is its own name.
    """
    if source.startswith("builtin:"):
        return source
    path = Path(source)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise SourceError(
            f"data.source: {source!r} does not exist; "
            "point it at an image folder, a CSV or a Hugging Face dataset"
        )
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    try:
        repo = Repo(Repo.find_root(str(path)))
    except NotDvcRepoError:  # not inside a DVC repo: hash without its state database
        repo = None
    if repo is None:
        import tempfile

        from dvc.fs import LocalFileSystem
        from dvc_data.hashfile.db import HashFileDB

        fs = LocalFileSystem()
        with tempfile.TemporaryDirectory() as scratch:
            _, _, obj = build(HashFileDB(fs, scratch), str(path.absolute()), fs, "md5", dry_run=True)
        return obj.hash_info.value
    with repo:
        _, _, obj = build(
            repo.cache.local, str(path.absolute()), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True
        )
    return obj.hash_info.value
