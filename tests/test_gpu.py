"""On a CUDA GPU: bf16 autocast training, the device policy, the pinned read-ahead and its
non-blocking copies, resume, ONNX parity of a model trained on the GPU, and NCCL data-parallel
training on two GPUs.

Every test is marked `gpu`: tests/conftest.py skips them where torch sees no CUDA device, so they are
collected everywhere and run with `python -m pytest -m gpu` on a GPU machine (the NCCL tests also
need a second GPU). Where the rest of the suite compares runs bit for bit it pins train.device: cpu
or is marked `cpu_only`.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_params, write_digits
from visiontune.components import model as models
from visiontune.components import train as training
from visiontune.pipelines import stages

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="NCCL data-parallel needs 2 GPUs"
)


def _cuda_run(root: Path, **train) -> dict:
    """Prepare 3 classes of digits and train on cuda, recording what the trainer does on the way:
    the dtype and device of every forward pass (training or eval), and for every batch that the
    read-ahead hands over, whether pinned memory was asked for and whether the batch is pinned."""
    data = write_digits(root / "raw", per_class=16)
    params = tiny_params(data, train={"device": "cuda", "epochs": 2, "patience": 5, **train})
    layout = stages.Layout(root / "prepared")
    stages.prepare(params, layout)
    forwards: list[tuple[bool, torch.dtype, str]] = []
    reads: list[tuple[bool, bool]] = []
    create, read_ahead = models.create, training.read_ahead

    def create_watched(cfg, num_classes):
        model, prep = create(cfg, num_classes=num_classes)
        model.register_forward_hook(
            lambda m, args, out: forwards.append((m.training, out.dtype, out.device.type))
        )
        return model, prep

    def read_ahead_watched(pixels, row_batches, pin):
        for batch in read_ahead(pixels, row_batches, pin=pin):
            reads.append((pin, batch.is_pinned()))
            yield batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "create", create_watched)
        mp.setattr(training, "read_ahead", read_ahead_watched)
        result = stages.train(params, layout)
    return {"params": params, "layout": layout, "result": result, "forwards": forwards, "reads": reads}


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """One tiny full fine-tune on cuda in bf16, 2 epochs (asked for: at 32 px the policy would
    train Lite0 in fp32)."""
    return _cuda_run(tmp_path_factory.mktemp("cuda"), precision="bf16")


def test_bf16_autocast_training_on_cuda_writes_a_float32_checkpoint(cuda_run):
    from typer.testing import CliRunner

    from visiontune.pipelines.cli import app

    result, layout = cuda_run["result"], cuda_run["layout"]
    assert torch.device(result.device).type == "cuda" and result.epochs_run == 2
    assert json.loads((layout.train / "train.json").read_text())["device"] == result.device
    training_passes = {(dtype, where) for is_training, dtype, where in cuda_run["forwards"] if is_training}
    eval_passes = {(dtype, where) for is_training, dtype, where in cuda_run["forwards"] if not is_training}
    assert training_passes == {(torch.bfloat16, "cuda")}  # autocast on the GPU, every training step
    assert eval_passes == {(torch.bfloat16, "cuda")}  # and validation under the same autocast
    with open(layout.train / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
        assert float(row["images_per_s"]) > 0
    weights = load_file(layout.train / "model.safetensors")  # the master weights stay float32
    floats = [t for t in weights.values() if t.is_floating_point()]  # not batch norm's step counts
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)
    model, meta = models.load_checkpoint(layout.train)  # rebuilt on the CPU from the file alone
    assert meta["class_names"] == ["0", "1", "2"] and meta["config"]["train"]["device"] == "cuda"
    summary = CliRunner().invoke(app, ["summary", "--root", str(layout.root)])
    assert summary.exit_code == 0 and f"full on {result.device}, 32 px" in summary.output


def test_the_policy_trains_a_small_depthwise_cnn_in_float32_on_cuda_with_autotuning(tmp_path):
    run = _cuda_run(tmp_path, epochs=1)  # Lite0 at 32 px, every policy key auto
    assert torch.device(run["result"].device).type == "cuda"
    assert {(dtype, where) for _, dtype, where in run["forwards"]} == {(torch.float32, "cuda")}
    policy = json.loads((run["layout"].train / "train.json").read_text())["device_policy"]
    assert (policy["precision"], policy["memory_format"]) == ("fp32", "contiguous")
    assert policy["cudnn_benchmark"] is True and policy["fused_optimizer"] is True
    assert torch.backends.cudnn.benchmark is True


def test_the_read_ahead_pins_batches_for_cuda_and_the_non_blocking_copies_arrive_intact(cuda_run):
    # in training: every batch read for the GPU (training and validation) was pinned
    assert cuda_run["reads"] and all(pin and pinned for pin, pinned in cuda_run["reads"])

    pixels = np.random.default_rng(0).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    rows = np.random.default_rng(1).permutation(96)
    assert all(b.is_pinned() for b in training.read_ahead(pixels, [rows[:40], rows[40:]], pin=True))
    assert not any(b.is_pinned() for b in training.read_ahead(pixels, [rows[:40]], pin=False))

    prep = models.Preprocessing(size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    cuda = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any wait for the GPU on this path raises
    try:
        on_gpu = list(training._plain_batches(pixels, rows, prep, cuda, 16))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = list(training._plain_batches(pixels, rows, prep, torch.device("cpu"), 16))
    assert [s for s, _ in on_gpu] == [s for s, _ in on_cpu] and len(on_gpu) == 6
    for (_, got), (_, expected) in zip(on_gpu, on_cpu, strict=True):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), expected, atol=1e-6, rtol=1e-6)


def test_a_cuda_run_resumes_onto_the_gpu_and_ends_where_an_uninterrupted_one_ends(tmp_path):
    """Stopped after epoch 1 and resumed: the model and AdamW state return to the GPU. With
    deterministic kernels and float32 the weights match the uninterrupted run's."""
    data = write_digits(tmp_path / "raw", per_class=12)
    train = {"device": "cuda", "epochs": 3, "patience": 10, "precision": "fp32", "deterministic": True}
    params = tiny_params(data, train=train)
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    args = (params.train, params.model, params.base, layout.prepare)

    def crash(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's state was kept, as a kill would leave it

    try:
        whole = training.train(*args, tmp_path / "whole", layout.cache)
        with pytest.raises(KeyboardInterrupt):
            training.train(*args, tmp_path / "resumed", layout.cache, on_epoch_end=crash)
        resumed = training.train(*args, tmp_path / "resumed", layout.cache, resume="must")
    finally:  # the mode is process-wide; later tests in this process run without it
        torch.use_deterministic_algorithms(False)
    assert torch.device(resumed.device).type == "cuda" and resumed.resumed_from_epoch == 1
    assert whole.epochs_run == resumed.epochs_run == 3
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)


def test_a_model_trained_on_cuda_exports_with_parity(cuda_run, monkeypatch):
    from visiontune.components import manifest
    from visiontune.components.evaluate import batches
    from visiontune.components.export import onnx_logits

    params, layout = cuda_run["params"], cuda_run["layout"]
    exported = stages.export(params, layout)  # checker, then onnxruntime vs PyTorch on the CPU
    assert exported.top1_agreement == 1.0 and exported.images_checked > 0
    # and onnxruntime on the CPU answers as the same weights do on the GPU (float32, no TF32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, meta = models.load_checkpoint(layout.train)
    prep = models.preprocessing_of(meta)
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = frame.loc[frame["split"] == "test", "path"].tolist()
    batch_list = list(batches(paths, prep.size, prep.mean, prep.std, 64))
    model = model.cuda()
    with torch.no_grad():
        on_gpu = np.concatenate([model(torch.from_numpy(x).cuda()).float().cpu().numpy() for x in batch_list])
    ort = onnx_logits(Path(exported.onnx), batch_list)
    assert on_gpu.shape == ort.shape == (len(paths), 3)
    assert np.abs(on_gpu - ort).max() <= 1e-3 * max(1.0, float(np.abs(ort).max()))


COLLECTIVES = """
import json, sys

import numpy as np
import torch
import torch.distributed as dist

from visiontune.components import distributed

ctx, device = distributed.init("auto", 120)
try:
    record = {
        "rank": ctx.rank, "world": ctx.world, "device": str(device), "backend": dist.get_backend(),
        "current": torch.cuda.current_device(), "sum": ctx.sum([ctx.rank + 1.0, 0.25], device).tolist(),
        "decide": ctx.decide(ctx.rank == 0, device), "shard": ctx.shard(np.arange(5)).tolist(),
    }
    ctx.barrier()
finally:
    distributed.shutdown()
with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as fh:
    json.dump(record, fh)
"""


@two_gpus
def test_nccl_process_group_gives_each_rank_its_gpu_and_the_collectives_agree(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["backend"] == "nccl" and record["world"] == 2
        assert record["device"] == f"cuda:{rank}" and record["current"] == rank
        assert record["sum"] == [3.0, 0.5]  # float64 all-reduce over NCCL
        assert record["decide"] is True  # rank 0's flag, broadcast
        assert record["shard"] == [[0, 2, 4], [1, 3]][rank]


@two_gpus
def test_two_gpus_train_data_parallel_over_nccl_like_one(tmp_path, capfd, monkeypatch):
    """A ViT (no batch norm) in float32: 2 ranks on 2 GPUs take the steps that 1 GPU takes.
    Looser than the CPU test's 1e-4: GPU kernels sum in other orders for other batch shapes."""
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # the ranks: no TF32 in cuBLAS or cuDNN
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # this process
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    data = write_digits(tmp_path / "raw", per_class=13)
    vit = {"name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32}
    train = {"device": "cuda", "precision": "fp32", "epochs": 2, "batch_size": 8, "patience": 5}
    train["hflip"] = True
    params = tiny_params(data, model=vit, train=train)
    results, weights = {}, {}
    for nproc in (1, 2):
        layout = stages.Layout(tmp_path / f"n{nproc}")
        stages.prepare(params, layout)
        run = params.model_copy(update={"train": params.train.model_copy(update={"nproc": nproc})})
        results[nproc] = stages.train(run, layout)
        weights[nproc] = load_file(layout.train / "model.safetensors")
    assert "data-parallel: 2 processes on cuda" in "".join(capfd.readouterr())
    assert results[2].device == "cuda:0" and results[1].device == "cuda"  # rank 0 wrote the result
    assert results[2].epochs_run == 2 and results[2].train_images == results[1].train_images
    assert results[2].best_val_loss == pytest.approx(results[1].best_val_loss, abs=1e-3)
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[2][key], value, atol=1e-3, rtol=1e-3, msg=key)
