"""Models: the embedded Lite0 weights really are ImageNet weights; other weights load or fail clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.components import images
from visiontune.components import model as models
from visiontune.components.config import ModelConfig


def _top5(model, prep, photo) -> list[int]:
    x = images.normalize(images.resize(Image.fromarray(photo), 224)[None], prep.mean, prep.std)
    return np.argsort(-models.predict_logits(model, iter([x]))[0])[:5].tolist()


def test_embedded_lite0_classifies_real_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model, prep = models.create(ModelConfig(image_size=None), num_classes=1000)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.size == 224
    assert 281 <= _top5(model, prep, skimage_data.chelsea())[0] <= 285  # a cat
    assert _top5(model, prep, skimage_data.coffee())[0] in (967, 968)  # espresso / cup


def test_new_head_has_num_classes_and_image_size_follows_config():
    model, prep = models.create(ModelConfig(image_size=64), num_classes=7)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    assert prep.size == 64


def test_no_weights_lists_the_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.WeightsUnavailable) as err:
        models.create(ModelConfig(name="resnet18", image_size=None), num_classes=3)
    msg = str(err.value)
    for option in (
        "model.weights",
        "tf_efficientnet_lite0",
        "Hugging Face Hub",
        "pretrained: false",
    ):
        assert option in msg


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), path)
    model, prep = models.create(
        ModelConfig(name="resnet18", weights=str(path), image_size=None), num_classes=4
    )
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.get_classifier().out_features == 4
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406))


def test_vit_at_another_resolution_loads_local_weights_and_round_trips(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # a 224 px checkpoint
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), path)
    cfg = ModelConfig(name="vit_tiny_patch16_224", weights=str(path), image_size=32)
    model, prep = models.create(cfg, num_classes=5)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    meta = models.checkpoint_meta(cfg.name, list("abcde"), prep, {})
    models.save_checkpoint(model, tmp_path / "ckpt", meta)
    loaded, _ = models.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
        assert model(x).shape == (2, 5)


def test_missing_weights_file_and_unknown_model_are_clear(tmp_path):
    with pytest.raises(models.WeightsUnavailable, match="does not exist"):
        models.create(ModelConfig(name="resnet18", weights=str(tmp_path / "no.pth"), image_size=None), 3)
    with pytest.raises(Exception, match="not a timm model"):
        models.create(ModelConfig(name="resnet_eighteen", image_size=None), 3)


def test_random_init_only_when_asked():
    model, _ = models.create(ModelConfig(name="resnet18", pretrained=False, image_size=None), num_classes=3)
    assert model.get_classifier().out_features == 3


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model, prep = models.create(ModelConfig(image_size=32), num_classes=3)
    model.eval()
    meta = models.checkpoint_meta("tf_efficientnet_lite0", ["a", "b", "c"], prep, {"k": 1})
    models.save_checkpoint(model, tmp_path, meta)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    loaded, loaded_meta = models.load_checkpoint(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert loaded_meta["class_names"] == ["a", "b", "c"]
    assert models.preprocessing_of(loaded_meta) == prep


@pytest.mark.parametrize(
    ("setting", "name", "short_sides", "size"),
    [
        ("auto", "tf_efficientnet_lite0", [8] * 5, 64),  # digits: 8×8 scans
        ("auto", "tf_efficientnet_lite0", [25] * 5, 64),  # lfw faces
        ("auto", "tf_efficientnet_lite0", [90, 96, 96, 100, 500], 96),  # median 96: already ×32
        ("auto", "tf_efficientnet_lite0", [97, 97, 97], 128),  # rounded up
        ("auto", "tf_efficientnet_lite0", [224, 300, 4000], 224),  # photos: native
        ("auto", "vit_tiny_patch16_224", [150, 160, 170], 160),
        (None, "tf_efficientnet_lite0", [8], 224),
        (48, "tf_efficientnet_lite0", [4000], 48),  # an integer wins
    ],
)
def test_image_size_is_chosen_from_the_data(setting, name, short_sides, size):
    sides = np.array(short_sides)
    choice = models.choose_image_size(ModelConfig(name=name, image_size=setting), sides + 10, sides)
    assert choice.size == size
    assert choice.reason.startswith("auto" if setting == "auto" else "model.image_size")


def test_image_size_setting_is_validated():
    with pytest.raises(ValueError, match="image_size"):
        ModelConfig(image_size="big")
    with pytest.raises(ValueError, match="image_size"):
        ModelConfig(image_size=8)
    with pytest.raises(ValueError, match="choose_image_size"):
        models.create(ModelConfig(image_size="auto"), num_classes=3)


@pytest.mark.parametrize("kind", ["timm", "probe", "lora"])
def test_scale_logits_folds_a_factor_into_the_classifier(kind):
    """The scaled model's logits are the factor times the original's, for a plain timm model, a
    linear probe over several levels and a peft LoRA model (merged afterwards as training does)."""
    from visiontune.components.config import LoraConfig

    torch.manual_seed(0)
    model, _ = models.create(ModelConfig(image_size=32, pretrained=False), num_classes=3)
    if kind == "probe":
        model, _ = models.linear_probe(model, levels=2, num_classes=3, size=32)
    if kind == "lora":
        model = models.apply_lora(model, LoraConfig())
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        models.scale_logits(model, 0.25)
        after = model(x)
        if kind == "lora":
            assert torch.allclose(models.merge_lora(model)(x), after, atol=1e-5)
    assert torch.allclose(after, 0.25 * before, atol=1e-5)


def test_a_classifier_that_is_not_one_linear_layer_cannot_be_scaled():
    from visiontune.components.errors import VisiontuneError

    model, _ = models.create(ModelConfig(image_size=32, pretrained=False), num_classes=3)
    model.reset_classifier(0)  # an Identity: no layer to fold a temperature into
    with pytest.raises(VisiontuneError, match="train.calibrate_confidence: false"):
        models.scale_logits(model, 0.5)
