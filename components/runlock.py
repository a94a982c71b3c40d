"""One writer per output folder, and no stage outliving the `dvc repro` that started it.

`exclusive(folder)` takes an advisory lock (flock) on a file beside the folder, so a second
trainer on the same output stops at once with a line naming the process that holds it; the
operating system releases the lock when that process ends, however it ends, so a lock is never
stale. `end_with_parent()` ends a stage whose parent died: killed with SIGKILL, `dvc repro`
cannot stop its children, and a rerun would start a second trainer beside the orphan.
Imported, never run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VisiontuneError


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`: beside it, not in it (DVC empties a stage's outputs before it runs)."""
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def exclusive(folder: Path, command: str) -> Iterator[None]:
    """Hold `folder`'s lock while the block runs; another holder is a VisiontuneError naming it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise VisiontuneError(
                f"{folder}: {_holder(handle.read())}; wait for it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }))  # fmt: skip
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (
            f"another `visiontune {info['command']}` is writing here (pid {info['pid']} on {info['host']}, "
            f"started {info['started']}; `kill {info['pid']}` stops it)"
        )
    except (ValueError, KeyError, TypeError):
        return "another process holds its lock"


def end_with_parent(poll_s: float = 1.0) -> None:
    """Exit (status 1, one line on stderr) when the process that started this one ends: it was
    killed, and nobody is left to read this stage's result. Only where DVC started the stage
    (DVC_STAGE is set): a trainer started with `nohup ... &` must survive its shell."""
    if "DVC_STAGE" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(
                    f"visiontune: the process that started this stage (pid {parent}, `dvc repro`) is gone; "
                    "stopping, so that a rerun is the only writer",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
