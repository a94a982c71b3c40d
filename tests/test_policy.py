"""The device policy: what `auto` resolves to per model family, image size and device, explicit
values winning, fixed batch shapes under cuDNN autotuning, and the policy recorded with the run."""

import json

import numpy as np
import pytest
import timm
import torch

from conftest import tiny_params, write_digits
from visiontune.components import model as models
from visiontune.components import train as training
from visiontune.components.config import TrainConfig
from visiontune.components.errors import VisiontuneError
from visiontune.components.policy import SMALL_IMAGES, resolve


@pytest.mark.parametrize(
    "name, expected",
    [("tf_efficientnet_lite0", "depthwise"), ("mobilenetv3_small_050", "depthwise"),
     ("resnet18", "cnn"), ("vit_tiny_patch16_224", "transformer")],
)  # fmt: skip
def test_family_is_read_from_the_layers(name, expected):
    assert models.family(timm.create_model(name, pretrained=False)) == expected


def _policy(family, size, device="cuda", bf16=True, **train):
    p = resolve(TrainConfig(**train), family, size, device, bf16)
    return p.precision, p.memory_format, p.cudnn_benchmark, p.fused_optimizer


def test_auto_on_cuda_follows_the_measured_rules():
    assert _policy("depthwise", 224) == ("bf16", "channels_last", True, True)  # Lite0 224: 4,472 img/s
    assert _policy("depthwise", SMALL_IMAGES - 1) == ("fp32", "contiguous", True, True)  # Lite0 64: 1,769
    assert _policy("depthwise", SMALL_IMAGES) == ("bf16", "channels_last", True, True)
    assert _policy("cnn", 64) == ("bf16", "channels_last", True, True)  # ResNet-18: 10,671 vs 5,179 NCHW
    assert _policy("transformer", 224) == ("bf16", "contiguous", True, True)
    assert _policy("cnn", 224, bf16=False) == ("fp16", "channels_last", True, True)  # pre-Ampere
    assert _policy("cnn", 224, deterministic=True)[2] is False  # autotuning picks kernels by speed


def test_auto_off_cuda_keeps_fp32_and_channels_last_for_cnns():
    for device in ("cpu", "mps"):
        assert _policy("depthwise", 64, device) == ("fp32", "channels_last", False, False)
        assert _policy("transformer", 224, device) == ("fp32", "contiguous", False, False)


def test_explicit_values_win_and_impossible_ones_name_the_key():
    assert _policy("depthwise", 64, precision="bf16", memory_format="channels_last") == (
        "bf16", "channels_last", True, True
    )  # fmt: skip
    assert _policy("cnn", 224, cudnn_benchmark=False, fused_optimizer=False)[2:] == (False, False)
    assert _policy("cnn", 224, "cpu", precision="bf16")[0] == "bf16"  # CPU autocast, when asked for
    with pytest.raises(VisiontuneError, match="train.precision: fp16 needs a CUDA device"):
        _policy("cnn", 224, "cpu", precision="fp16")
    with pytest.raises(VisiontuneError, match="train.fused_optimizer"):
        _policy("cnn", 224, "cpu", fused_optimizer=True)
    reason = resolve(TrainConfig(), "depthwise", 64, "cuda").reason
    assert reason.startswith("cuda, depthwise at 64 px: fp32") and "cudnn.benchmark" in reason


def test_earlier_params_files_still_read():
    assert TrainConfig(bf16=False).precision == "fp32" and TrainConfig(bf16=True).precision == "auto"
    assert TrainConfig(channels_last=False).memory_format == "contiguous"
    assert TrainConfig(channels_last=True).memory_format == "auto"
    assert TrainConfig(bf16=False, precision="bf16").precision == "bf16"  # the new key wins


def test_autotuned_epochs_keep_one_batch_shape_and_plain_ones_keep_every_image():
    tuned = resolve(TrainConfig(), "cnn", 224, "cuda")
    plain = resolve(TrainConfig(), "cnn", 224, "cpu")
    order = np.arange(70)
    assert [len(b) for b in training._batches(order, 32, plain)] == [32, 32, 6]
    assert [len(b) for b in training._batches(order, 32, tuned)] == [32, 32]
    assert [len(b) for b in training._batches(order[:20], 32, tuned)] == [20]  # one batch: kept


def test_padded_validation_scores_exactly_the_real_images():
    """The last val batch filled up with zero images (one shape for cuDNN) scores the same."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    prep = models.Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    rows, y = np.arange(11), np.array([0, 1, 2] * 3 + [0, 1])
    args = (model, pixels, rows, y, prep, torch.device("cpu"), 4, training.nullcontext, 3)
    plain = training._evaluate(*args)
    padded = training._evaluate(*args, pad=True, memory_format=torch.channels_last)
    assert plain[1:].sum() == padded[1:].sum() == 11  # 11 images counted, not 12
    np.testing.assert_allclose(padded, plain, rtol=1e-5)


def test_the_resolved_policy_is_recorded_with_the_run(tmp_path):
    from visiontune.pipelines import stages

    params = tiny_params(write_digits(tmp_path / "raw", classes=(0, 1), per_class=12))
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    result = stages.train(params, layout)
    recorded = json.loads((layout.train / "train.json").read_text())["device_policy"]
    assert recorded == result.device_policy
    expected = resolve(params.train, "depthwise", 32, result.device.split(":")[0])
    assert recorded == expected.as_dict()
    checkpoint = json.loads((layout.train / "checkpoint.json").read_text())
    assert checkpoint["device_policy"] == recorded
    logged = stages.resolved_params(layout)
    assert logged["train.resolved_precision"] == recorded["precision"]
    assert logged["train.resolved_memory_format"] == recorded["memory_format"]
