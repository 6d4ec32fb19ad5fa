"""Model factory: small images keep their resolution, every listed model runs, bad names fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msam.errors import UserError
from msam.models import check_model, check_model_name, create_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes are ~100x slower with two threads on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS = ["resnet18", "resnet10t", "test_resnet", "vit_tiny", "test_vit"]
SIZES = [28, 8, 32]


@pytest.mark.parametrize("img_size", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_on_small_images(name, img_size):
    in_chans = 1 if img_size == 28 else 3
    model = create_model(name, num_classes=7, in_chans=in_chans, img_size=img_size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_chans, img_size, img_size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("img_size", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_takes_every_size(name, img_size):
    check_model(name, num_classes=7, in_chans=3, img_size=img_size)


def feature_size(model: nn.Module, img_size: int) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(model.eval().forward_features(torch.randn(1, 1, img_size, img_size)).shape[2:])


@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_small_resnet_keeps_spatial_size_at_28px(name):
    adapted = create_model(name, num_classes=10, in_chans=1, img_size=28)
    plain = create_model(name, num_classes=10, in_chans=1, img_size=28, small_input=False)
    assert feature_size(adapted, 28) == (4, 4)
    assert feature_size(plain, 28) == (1, 1)  # what the adaptation prevents


def test_small_resnet_stem_is_3x3_stride_1_and_keeps_channels():
    plain = create_model("resnet18", num_classes=10, in_chans=3, img_size=224)
    small = create_model("resnet18", num_classes=10, in_chans=3, img_size=32)
    assert isinstance(plain.maxpool, nn.MaxPool2d) and plain.conv1.stride == (2, 2)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.out_channels == plain.conv1.out_channels


def test_deep_stem_first_conv_becomes_stride_1():
    small = create_model("resnet10t", num_classes=10, in_chans=3, img_size=32)
    assert small.conv1[0].stride == (1, 1)
    assert all(conv.stride == (1, 1) for conv in small.conv1 if isinstance(conv, nn.Conv2d))


def test_small_input_auto_threshold_is_64px():
    assert isinstance(
        create_model("test_resnet", num_classes=2, in_chans=3, img_size=63).maxpool, nn.Identity
    )
    assert isinstance(
        create_model("test_resnet", num_classes=2, in_chans=3, img_size=64).maxpool, nn.MaxPool2d
    )


def test_vit_gets_small_patches_unless_the_user_sets_them():
    vit = create_model("test_vit", num_classes=10, in_chans=3, img_size=28)
    assert vit.patch_embed.patch_size == (4, 4) and vit.patch_embed.grid_size == (7, 7)
    tiny = create_model("test_vit", num_classes=10, in_chans=3, img_size=8)
    assert tiny.patch_embed.patch_size == (2, 2)
    own = create_model(
        "test_vit", num_classes=10, in_chans=3, img_size=28, kwargs={"patch_size": 7}
    )
    assert own.patch_embed.patch_size == (7, 7)


def test_alias_and_kwargs_reach_timm():
    model = create_model("vit_tiny", num_classes=3, in_chans=3, img_size=32, kwargs={"depth": 2})
    assert model.default_cfg["architecture"] == "vit_tiny_patch16_224"
    assert len(model.blocks) == 2


def test_weights_are_random_not_pretrained():
    first = create_model("test_resnet", num_classes=2, in_chans=3, img_size=32)
    torch.manual_seed(1)
    second = create_model("test_resnet", num_classes=2, in_chans=3, img_size=32)
    assert not torch.equal(first.conv1[0].weight, second.conv1[0].weight)


@pytest.mark.parametrize("key", ["num_classes", "in_chans", "pretrained"])
def test_reserved_kwargs_are_refused(key):
    with pytest.raises(UserError, match=key):
        create_model("test_resnet", num_classes=2, in_chans=3, img_size=32, kwargs={key: 1})


def test_unaccepted_kwargs_are_a_user_error():
    with pytest.raises(UserError, match="model.kwargs .* not accepted by 'test_resnet'"):
        create_model("test_resnet", num_classes=2, in_chans=3, img_size=32, kwargs={"bogus": 1})


def test_unknown_model_suggests_timm_names():
    with pytest.raises(UserError) as info:
        check_model_name("resnet1")
    message = str(info.value)
    assert message.startswith("unknown model 'resnet1' (closest timm names: ")
    assert "resnet18" in message and "\n" not in message


def test_known_names_and_aliases_pass():
    for name in [*MODELS, "resnet18.a1_in1k"]:
        check_model_name(name)


def test_check_model_catches_too_small_images_without_allocating():
    check_model("resnet18", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(UserError, match="'convnext_atto' cannot take 8 px images"):
        check_model("convnext_atto", num_classes=10, in_chans=3, img_size=8)
