"""train.method: what trains and what stays frozen in full, freeze, linear and LoRA."""

import json

import pytest
import torch

from conftest import tiny_params, write_digits
from visiontune.components import model as models
from visiontune.components.config import LoraConfig, ModelConfig, TrainConfig
from visiontune.components.train import _build, class_weights, epoch_order, param_groups
from visiontune.pipelines import stages


def _step(model, size=32):
    """One optimizer step, in whatever train/eval modes the caller set."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_changes_only_adapters_and_head_and_merges_exactly():
    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    model = models.apply_lora(model, LoraConfig())
    trainable, total = models.count_parameters(model)
    assert trainable / total <= 0.05  # default LoRA on Lite0 trains ≤ 5 %
    before = _snapshot(model)
    _step(model)
    changed = {
        k
        for k, v in model.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    }
    weights_changed = {k for k in changed if not k.endswith(("running_mean", "running_var"))}
    assert weights_changed and all("lora_" in k or "modules_to_save" in k for k in weights_changed)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        plain = models.merge_lora(model)
        merged = plain(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in k for k in plain.state_dict())


def test_vit_lora_targets_attention_and_optionally_mlp():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    attn = models.lora_targets(vit, LoraConfig())
    assert attn and all(n.endswith(("attn.qkv", "attn.proj")) for n in attn)
    with_mlp = models.lora_targets(vit, LoraConfig(include_mlp=True))
    assert any(n.endswith("mlp.fc1") for n in with_mlp) and len(with_mlp) == 2 * len(attn)
    named = models.lora_targets(vit, LoraConfig(target_modules=["qkv"]))
    assert all(n.endswith("qkv") for n in named)


@pytest.mark.parametrize("levels", [0, 3])
def test_linear_probe_trains_only_the_head_and_keeps_norm_statistics(levels):
    cfg = TrainConfig(method="linear", probe_levels=levels)
    model, _, frozen = _build(cfg, ModelConfig(image_size=32), 3)
    before = _snapshot(model)
    model.train()
    for module in frozen:
        module.eval()
    _step(model)
    head = {k for k in before if k.startswith("classifier." if levels == 0 else "fc.")}
    assert head
    changed = {
        k
        for k, v in model.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    }
    assert changed == head  # no weight, norm statistic or feature statistic moved


def test_level_probe_standardizes_each_level_on_the_train_features():
    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    probe, _ = models.linear_probe(model, 3, 3, 32)
    assert probe.dims == [40, 112, 320, 1280]  # Lite0's last three stages, then its pooled head input
    probe.eval()
    with torch.no_grad():
        f = probe.features(torch.randn(64, 3, 32, 32)).double()
        probe.standardize(len(f), f.sum(0).numpy(), (f * f).sum(0).numpy())
        z = (f - probe.mean.double()) * probe.inv_std.double()
    assert z.mean(0).abs().max() < 1e-3
    raw, std = f.std(0, unbiased=False), z.std(0, unbiased=False)
    assert std.max() < 1 + 1e-3
    start = 0
    for d in probe.dims:  # unit variance, except units far quieter than their level: floored, not blown up
        level_raw, level_std = raw[start : start + d], std[start : start + d]
        loud = level_raw > 0.1 * level_raw.mean() + 1e-5
        assert loud.any() and torch.allclose(level_std[loud], torch.ones_like(level_std[loud]), atol=1e-3)
        assert (level_std[~loud] < 1).all()
        start += d
    # every level carries the same share of the standardized variance
    shares = [
        (probe.block_scale[a : a + d] ** 2).sum().item()
        for a, d in zip([0, 40, 152, 472], probe.dims, strict=True)
    ]
    assert shares == pytest.approx([sum(shares) / 4] * 4)


def test_probe_levels_beyond_the_model_is_a_clear_error():
    from visiontune.components.errors import VisiontuneError

    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    with pytest.raises(VisiontuneError, match="train.probe_levels: 9"):
        models.linear_probe(model, 9, 3, 32)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224"])
def test_freeze_counts_groups_from_the_stem(name):
    model, _ = models.create(ModelConfig(name=name, pretrained=False, image_size=32), num_classes=3)
    depth = models.depth_groups(model)
    frozen_modules = models.freeze(model, 2)  # the stem and the first stage or block
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, d in depth.items() if d < 2}
    assert frozen_modules and all(d >= 2 for n, d in depth.items() if n not in frozen)
    assert all(p.requires_grad for p in model.get_classifier().parameters())


def test_layer_decay_lowers_lr_towards_the_stem():
    model, _ = models.create(ModelConfig(image_size=32), num_classes=3)
    groups = param_groups(model, TrainConfig(lr=1e-3, layer_decay=0.5, head_lr_scale=3))
    lrs = sorted({g["lr"] for g in groups})
    assert lrs[-1] == pytest.approx(3e-3) and lrs[0] < 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_imbalance_weights_and_sampler():
    labels = torch.tensor([0] * 90 + [1] * 10).numpy()
    w = class_weights(labels, 2)
    assert w[1] / w[0] == pytest.approx(9.0)
    order = epoch_order(labels, torch.Generator().manual_seed(0), balanced=True)
    share = (labels[order] == 1).mean()
    assert 0.4 < share < 0.6  # the minority class fills about half of every epoch


@pytest.mark.parametrize("method", ["lora", "linear"])
def test_methods_train_end_to_end_and_export_plain_checkpoints(tmp_path, method):
    data = write_digits(tmp_path / "raw", classes=(0, 1, 2), per_class=12)
    params = tiny_params(data, train={"method": method, "epochs": 2})
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    result = stages.train(params, layout)
    assert result.method == method and result.trainable_percent < 6
    model, meta = models.load_checkpoint(layout.train)  # a plain timm model: LoRA merged
    assert meta["config"]["train"]["method"] == method
    if method == "linear":  # the multi-level probe rebuilds from its checkpoint alone
        assert meta["probe_levels"] == 3 and isinstance(model, models.LevelProbe)
    if method == "lora":
        adapter = layout.train / "adapter" / "adapter_model.safetensors"
        assert adapter.stat().st_size < (layout.train / "model.safetensors").stat().st_size / 10
        assert json.loads((layout.train / "adapter" / "adapter_config.json").read_text())["r"] == 4
    exported = stages.export(params, layout)
    assert exported.top1_agreement == 1.0


def test_augmentation_options_train(tmp_path):
    data = write_digits(tmp_path / "raw", classes=(0, 1, 2), per_class=12)
    train_opts = {
        "randaugment": 2,
        "mixup": 0.2,
        "hflip": True,
        "imbalance": "sampler",
        "grad_accum": 2,
        "clip_grad_norm": 1.0,
        "freeze": 2,
        "layer_decay": 0.8,
    }
    params = tiny_params(data, train=train_opts)
    layout = stages.Layout(tmp_path / "prep")
    stages.prepare(params, layout)
    result = stages.train(params, layout)
    assert result.epochs_run == 1 and result.trainable_percent < 100
    assert json.loads((layout.train / "checkpoint.json").read_text())["config"]["train"]["randaugment"] == 2
