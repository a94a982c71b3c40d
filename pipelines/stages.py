"""Stage wiring shared by the CLI (one stage per `dvc repro` process) and the Prefect flow.

Each function takes the parsed Params and the output layout and calls one component; the
heavy libraries are imported inside, so that light commands start at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visiontune.components.config import Params


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under one root (data/prepared by default)."""

    root: Path = Path("data/prepared")

    @property
    def cache(self) -> Path:
        """Decoded-image store shared by validate (label audit) and train."""
        return self.root / "cache"

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    @property
    def validate(self) -> Path:
        return self.root / "validate"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def register(self) -> Path:
        return self.root / "register"


def prepare(params: Params, layout: Layout):
    from visiontune.components.prepare import prepare as run

    return run(params.data, params.base, params.validate_, layout.prepare)


def image_size(params: Params, prepared: Path) -> int:
    """model.image_size resolved against the prepared manifest (what train will choose)."""
    from visiontune.components import manifest
    from visiontune.components.model import choose_image_size

    frame = manifest.read(prepared / "manifest.csv")
    return choose_image_size(params.model, frame["width"].to_numpy(), frame["height"].to_numpy()).size


def validate(params: Params, layout: Layout):
    from visiontune.components.validate import validate as run

    return run(
        params.validate_,
        layout.prepare,
        layout.validate,
        image_size(params, layout.prepare),
        params.base.seed,
        layout.cache,
    )


def train(params: Params, layout: Layout, resume: str = "auto"):
    """Train under the output folder's lock (one trainer per folder; torchrun's ranks run under the
    lock of the process that launched them)."""
    from visiontune.components import distributed, runlock
    from visiontune.components.train import train as run

    if distributed.launched():
        return run(
            params.train, params.model, params.base, layout.prepare, layout.train, layout.cache, resume
        )
    with runlock.exclusive(layout.train, "train"):
        if params.train.nproc > 1:
            return _torchrun_train(params, layout, resume)
        return run(
            params.train, params.model, params.base, layout.prepare, layout.train, layout.cache, resume
        )


def _torchrun_train(params: Params, layout: Layout, resume: str):
    """train.nproc data-parallel processes on this machine under torchrun, each `visiontune train`.

    For several machines, run torchrun yourself on each with its rendezvous flags (README).
    """
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    import yaml

    from visiontune.components.errors import VisiontuneError
    from visiontune.components.train import TrainResult

    n = params.train.nproc
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # the cores, shared out
    env["VISIONTUNE_LAUNCHER"] = "1"  # this command reports the result, not its ranks
    flag = {"auto": [], "must": ["--resume"], "never": ["--fresh"]}[resume]
    with tempfile.TemporaryDirectory() as scratch:
        resolved = os.path.join(scratch, "params.yaml")  # params.yaml with this run's overrides applied
        with open(resolved, "w") as fh:
            yaml.safe_dump(params.model_dump(by_alias=True, mode="json"), fh)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "visiontune.pipelines.cli", "train", "--params", resolved, "--root", str(layout.root),
            *flag,
        ]  # fmt: skip
        launcher = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            returncode = launcher.wait()
        except BaseException:  # a flow timeout, Ctrl-C: stop torchrun and every rank with it
            os.killpg(launcher.pid, signal.SIGTERM)
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
            raise
    if returncode != 0:
        raise VisiontuneError(
            f"train: the {n} data-parallel processes (train.nproc) failed, torchrun exit code "
            f"{returncode}; the failing rank's error is above. The last finished epoch is kept: "
            "rerun to resume, or set train.nproc: 1"
        )
    return TrainResult(**json.loads((layout.train / "train.json").read_text()))


def evaluate(params: Params, layout: Layout):
    from visiontune.components.evaluate import evaluate as run

    return run(params.evaluate, layout.prepare, layout.train, layout.evaluate, layout.validate)


def export(params: Params, layout: Layout):
    from visiontune.components.export import export as run

    return run(
        params.export,
        layout.prepare,
        layout.train,
        layout.export,
        evaluation=layout.evaluate,  # the model card's evaluation table and validation summary
        validation=layout.validate,
        data_hash=_data_hash(params),
    )


def _data_hash(params: Params) -> str:
    """The DVC hash of data.source, or "" when the data moved since training."""
    from visiontune.components.prepare import SourceError

    from .dataversion import source_hash

    try:
        return source_hash(params.data.source)
    except SourceError:
        return ""


def register(params: Params, layout: Layout):
    from visiontune.components.hub import HF_DIR
    from visiontune.components.tracking import Candidate
    from visiontune.components.tracking import register as run

    candidate = Candidate(
        data_hash=_data_hash(params),  # "" when the data moved since training: register what is on disk
        params={**params.flat(), "train.resolved_lr": params.train.base_lr, **resolved_params(layout)},
        prepare=layout.prepare / "prepare.json",
        validation=layout.validate,
        checkpoint=layout.train,
        evaluation=layout.evaluate,
        onnx=layout.export / "model.onnx",
        hf=layout.export / HF_DIR,
    )
    result = run(params.register_, candidate, layout.register)
    if params.register_.auto_promote:
        from visiontune.components.tracking import promote

        decision = promote(params.register_, layout.prepare, result.version)
        outcome = "promoted" if decision.promoted else "refused"
        print(f"promotion of v{decision.candidate}: {outcome} ({decision.reason})")
    return result


def resolved_params(layout: Layout) -> dict[str, int | str | bool]:
    """What `auto` became in the trained run (the resolution, the flips and the device policy), as MLflow
    params beside the keys that say auto."""
    import json

    trained = json.loads((layout.train / "train.json").read_text())
    out: dict[str, int | str | bool] = {}
    if "image_size" in trained:
        out["model.resolved_image_size"] = trained["image_size"]
    if "hflip" in trained:
        out["train.resolved_hflip"] = trained["hflip"]
    for key, value in trained.get("device_policy", {}).items():
        if key != "reason":
            out[f"train.resolved_{key}"] = value
    return out


STAGES = {
    "prepare": prepare,
    "validate": validate,
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "register": register,
}
