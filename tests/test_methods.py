"""train.method: what trains and what stays frozen in full, freeze, linear and LoRA."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import tiny_params, write_digits
from visiontune.components import manifest
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


# --- each training option changes what train() does, seen from outside a real run ---------------
#
# Every run below is the real `train` on the same tiny, imbalanced digits set (classes 0 and 1 of
# 20 train images each, class 2 of 4), seed 0, one epoch, batches of 8, no colour jitter and no
# weight decay. Runs differ only in the option under test, so the first batch is the same images
# with the same random crops in each: an option's effect is compared with the plain run's.
# A spy wraps the model that `_build` returns (forward hooks only: the real model runs) and global
# optimizer step hooks record what each step applied.

SMOOTH = 0.1  # TrainConfig.label_smoothing default: the target of class y is (1 - 0.1)·onehot + 0.1/3


@dataclass
class Watch:
    """What one training run did: per train batch the model's input, the loss's target distribution
    and the classifier's gradient; per optimizer step the global gradient norm and the classifier's
    gradient; over the first step, how far each parameter moved; the weights before and after."""

    k: int = 1  # grad_accum of the run: each backward pass carries loss / k
    inputs: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    head_grads: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    step_head_grads: list = field(default_factory=list)
    first_grad: torch.Tensor | None = None
    first_move: dict = field(default_factory=dict)
    initial: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)


def _watch_run(root: Path, name: str, **options) -> Watch:
    from visiontune.components import train as training
    from visiontune.components.config import BaseConfig

    prepared = root / "prep" / "prepare"
    watch = Watch(k=options.get("grad_accum", 1))
    built = {}
    real_build = training._build

    def spy_build(cfg, model_cfg, n_classes):
        model, prep, frozen = real_build(cfg, model_cfg, n_classes)
        built["model"] = model
        watch.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def seen(module, args, out):
            if not module.training:
                return  # validation passes
            x = args[0].detach().float().contiguous()
            probs = torch.softmax(out.detach().float(), 1)

            def target(grad):  # d(loss·w)/dlogits = w·(softmax − target)/B for mean cross-entropy
                watch.targets.append(probs - grad.float() * len(x) * watch.k)

            watch.inputs.append(x)
            out.register_hook(target)

        model.register_forward_hook(seen)
        model.get_classifier().weight.register_hook(lambda g: watch.head_grads.append(g.detach().clone()))
        return model, prep, frozen

    def before_step(optimizer, args, kwargs):
        model = built["model"]
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        watch.norms.append(float(torch.cat(grads).double().norm()))  # fp32 sums drift
        watch.step_head_grads.append(model.get_classifier().weight.grad.detach().clone())
        if watch.first_grad is None:
            watch.first_grad = torch.cat(grads).clone()
            built["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def after_step(optimizer, args, kwargs):
        if "before" in built:
            before = built.pop("before")
            for n, p in built["model"].named_parameters():
                watch.first_move[n] = float((p.detach() - before[n]).abs().max())

    plain = {"epochs": 1, "batch_size": 8, "color_jitter": 0.0, "weight_decay": 0.0, "hflip": False}
    options = {**plain, **options}
    cfg = TrainConfig(device="cpu", **options)
    pre = register_optimizer_step_pre_hook(before_step)
    post = register_optimizer_step_post_hook(after_step)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(training, "_build", spy_build)
            training.train(cfg, ModelConfig(image_size=32), BaseConfig(seed=0), prepared, root / name,
                           store=root / "cache", resume="never")  # fmt: skip
    finally:
        pre.remove()
        post.remove()
    watch.final = {k: v.detach().clone() for k, v in built["model"].state_dict().items()}
    return watch


def _smoothed(labels: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    return (1 - SMOOTH) * torch.nn.functional.one_hot(labels, n_classes).float() + SMOOTH / n_classes


def _labels(watch: Watch) -> list[torch.Tensor]:
    return [t.argmax(1) for t in watch.targets]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    write_digits(root / "raw", classes=(0, 1), per_class=40)
    write_digits(root / "raw", classes=(2,), per_class=8)
    stages.prepare(tiny_params(root / "raw"), stages.Layout(root / "prep"))
    return root


@pytest.fixture(scope="module")
def plain(digits) -> Watch:
    """The run without any option: the reference every option is compared with."""
    return _watch_run(digits, "plain")


def test_plain_run_trains_every_train_image_once_on_its_smoothed_label(digits, plain):
    """Checks the spy itself: one epoch is every train image once, in batches of 8 (44 = 5·8 + 4),
    one optimizer step per batch, and the loss's target is the label smoothed by 0.1."""
    frame = manifest.read(digits / "prep" / "prepare" / "manifest.csv")
    train_counts = frame[frame["split"] == "train"]["label"].astype(int).value_counts().sort_index()
    assert train_counts.tolist() == [20, 20, 4]
    assert [len(x) for x in plain.inputs] == [8, 8, 8, 8, 8, 4] and len(plain.norms) == 6
    assert torch.cat(_labels(plain)).bincount().tolist() == [20, 20, 4]
    for target in plain.targets:
        torch.testing.assert_close(target, _smoothed(target.argmax(1)), atol=1e-5, rtol=0)


def test_clip_grad_norm_caps_the_gradient_each_step_applies(digits, plain):
    clip = 1.0
    assert min(plain.norms) > 50 * clip  # without clipping every step's gradient is far longer
    clipped = _watch_run(digits, "clip", clip_grad_norm=clip)
    assert clipped.norms == pytest.approx([clip] * len(plain.norms), rel=1e-4)
    # same weights, same first batch: the first gradient is the plain one scaled to norm 1, not truncated
    expected = plain.first_grad * (clip / plain.first_grad.double().norm().float())
    torch.testing.assert_close(clipped.first_grad, expected, rtol=1e-3, atol=1e-7)


def test_grad_accum_sums_scaled_micro_batches_into_fewer_steps(digits, plain):
    accum = _watch_run(digits, "accum", grad_accum=2)
    assert len(accum.inputs) == len(plain.inputs) == 6  # the same batches of 8 ...
    assert len(plain.norms) == 6 and len(accum.norms) == 3  # ... but one optimizer step per two
    for s, applied in enumerate(accum.step_head_grads):  # each step applies both passes' gradients
        torch.testing.assert_close(applied, accum.head_grads[2 * s] + accum.head_grads[2 * s + 1])
    # each pass carries half its batch's mean loss, so a step applies the mean over 16 images
    torch.testing.assert_close(accum.head_grads[0], plain.head_grads[0] / 2, rtol=1e-4, atol=1e-8)
    for target in accum.targets:  # recovered with loss/2: still the smoothed labels
        torch.testing.assert_close(target, _smoothed(target.argmax(1)), atol=1e-5, rtol=0)


def test_layer_decay_lr_reaches_the_optimizer_and_the_stem_moves_least(digits, plain):
    """AdamW's first step moves each weight by lr·|g|/(|g| + eps) ≈ lr (no weight decay here), so
    a tensor's largest first-step move is the lr training gave it."""
    stem, last = "conv_stem.weight", "blocks.6.0.conv_pw.weight"
    assert plain.first_move[stem] == pytest.approx(plain.first_move[last], rel=1e-2)  # one backbone lr
    assert plain.first_move["classifier.weight"] == pytest.approx(3 * plain.first_move[last], rel=1e-2)
    decayed = _watch_run(digits, "decay", layer_decay=0.5, lr=1e-2)
    head = decayed.first_move["classifier.weight"]  # lr·head_lr_scale (3), times the warmup factor
    # timm's depth groups of Lite0: stem 0, blocks.0 … blocks.6 → 1 … 7, head 8; lr × 0.5^(8 − depth)
    depths = {stem: 0, "blocks.0.0.conv_dw.weight": 1, "blocks.3.0.conv_pw.weight": 4, last: 7}
    for name, depth in depths.items():
        assert decayed.first_move[name] == pytest.approx(head / 3 * 0.5 ** (8 - depth), rel=2e-2), name
    moved = {n: (decayed.final[n] - decayed.initial[n]).abs().mean() for n in (stem, last)}
    assert moved[stem] < moved[last] / 10  # over the epoch too, the stem stays nearly where it was


def test_mixup_trains_on_mixed_images_against_mixed_targets(digits, plain):
    mixed = _watch_run(digits, "mixup", mixup=1.0)
    x, seen, y = plain.inputs[0], mixed.inputs[0], _labels(plain)[0]  # the same 8 crops before mixing
    # each image the model saw is lam·x_i + (1 − lam)·x_j: find j and lam by least squares
    partner, lams = [], []
    for i in range(len(x)):
        fits = []
        for j in range(len(x)):
            d = x[i] - x[j]
            lam = 1.0 if j == i else float(((seen[i] - x[j]) * d).sum() / (d * d).sum())
            fits.append((float((seen[i] - lam * x[i] - (1 - lam) * x[j]).norm()), j, lam))
        residual, j, lam = min(fits)
        assert residual < 1e-3 * float(x[i].norm()), i
        partner.append(j)
        if j != i:
            lams.append(lam)
    assert len(lams) >= len(x) // 2  # most images are mixed with another one ...
    lam = lams[0]
    assert 0.02 < lam < 0.98 and max(lams) - min(lams) < 1e-4  # ... all by the one lam of the batch
    perm = torch.tensor(partner)
    torch.testing.assert_close(
        mixed.targets[0], lam * _smoothed(y) + (1 - lam) * _smoothed(y[perm]), atol=1e-4, rtol=0
    )
    assert (mixed.targets[0].max(1).values < 0.9).any()  # some targets are really split between classes


def test_randaugment_changes_the_images_the_model_sees(digits, plain):
    augmented = _watch_run(digits, "randaugment", randaugment=2)
    assert torch.equal(_labels(augmented)[0], _labels(plain)[0])  # the same images, in the same order
    change = (augmented.inputs[0] - plain.inputs[0]).flatten(1).abs().amax(1)
    assert (change > 0.1).sum() >= len(change) // 2  # (an image may draw two no-op operations)


def test_class_balanced_sampler_draws_every_class_about_equally(digits, plain):
    balanced = _watch_run(digits, "sampler", imbalance="sampler")
    counts = torch.cat(_labels(balanced)).bincount(minlength=3).tolist()
    assert sum(counts) == 44  # an epoch is still as many images as the train split has
    assert counts[2] >= 2 * 4  # the 4-image class is drawn far more often than once per image ...
    assert max(counts) < 2 * min(counts)  # ... and no class twice as often as another (plain: 20 vs 4)


def test_hflip_mirrors_some_crops_and_leaves_the_others(digits, plain):
    flipped = _watch_run(digits, "hflip", hflip=True)
    mirrored = []
    for before, after in zip(plain.inputs[0], flipped.inputs[0], strict=True):
        same = torch.allclose(after, before, atol=1e-4)
        assert same or torch.allclose(after, before.flip(-1), atol=1e-4)
        mirrored.append(not same)
    assert any(mirrored) and not all(mirrored)


def test_freeze_keeps_the_stem_and_first_stage_and_their_norm_statistics(digits, plain):
    frozen = _watch_run(digits, "freeze", freeze=2)
    depth = models.depth_groups(models.create(ModelConfig(image_size=32), num_classes=3)[0])
    for key, before in frozen.initial.items():
        module = key.rsplit(".", 1)[0]
        group = depth.get(key, depth.get(f"{module}.weight"))  # running stats: their module's group
        if group is None or not before.dtype.is_floating_point:
            continue
        assert torch.equal(frozen.final[key], before) == (group < 2), key
