"""Model factory: any timm model, randomly initialised, adapted to small images when asked.

timm's ImageNet models shrink a 224 px image 32x before the last stage; a 28 px Fashion-MNIST or
an 8 px digits image would reach it as 1x1. ``small_input`` swaps a ResNet's stride-2 stem and
max-pool for a stride-1 3x3 stem (as in He et al., 2016, Sec. 4.2, for CIFAR) and gives ViTs
(Dosovitskiy et al., 2021) small patches.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from msam.errors import UserError

__all__ = [
    "MODEL_ALIASES",
    "check_model",
    "check_model_name",
    "create_model",
    "model_for",
    "resolve_model_name",
]

# Short names people type, mapped to the timm model they mean.
MODEL_ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
}

# Set from the data set, so a value in model.kwargs would silently disagree with the data.
_RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained")
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def resolve_model_name(name: str) -> str:
    """The timm name behind an alias (unknown names pass through unchanged)."""
    return MODEL_ALIASES.get(name, name)


def check_model_name(name: str) -> None:
    """UserError naming the closest timm models when ``name`` is neither a timm model nor alias."""
    import timm

    if timm.is_model(resolve_model_name(name)):
        return
    names = list(MODEL_ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"closest timm names: {', '.join(close)}" if close else "see timm.list_models()"
    raise UserError(f"unknown model '{name}' ({hint})")


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    small_input: bool | str = "auto",
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised timm model for ``img_size`` px images with ``in_chans`` channels.

    ``small_input="auto"`` adapts the model when ``img_size < 64``. ``kwargs`` go to
    ``timm.create_model`` and win over the adaptation's own choices (``img_size``, ``patch_size``).
    """
    import timm
    from timm.models import get_arch_name, model_entrypoint

    check_model_name(name)
    name = resolve_model_name(name)
    small = img_size < 64 if small_input == "auto" else bool(small_input)
    user_kwargs = dict(kwargs or {})
    reserved = [key for key in _RESERVED_KWARGS if key in user_kwargs]
    if reserved:
        raise UserError(
            f"model.kwargs: {', '.join(reserved)} cannot be set there (the data set fixes the "
            f"classes and channels; weights are never pretrained)"
        )

    module = model_entrypoint(get_arch_name(name)).__module__
    is_resnet = module == "timm.models.resnet"
    is_vit = module in _VIT_MODULES or name.startswith(("vit_", "deit_"))
    extra: dict[str, Any] = {}
    if is_vit:
        extra["img_size"] = img_size
        if small:
            extra["patch_size"] = 4 if img_size >= 16 else 2
    elif not is_resnet:
        extra["img_size"] = img_size  # dropped below if the model does not take it
    extra.update(user_kwargs)

    def build(options: dict[str, Any]) -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **options
        )

    try:
        try:
            model = build(extra)
        except TypeError:
            if "img_size" not in extra or "img_size" in user_kwargs or is_vit:
                raise
            extra.pop("img_size")
            model = build(extra)
    except TypeError as exc:
        raise UserError(f"model.kwargs {user_kwargs} not accepted by '{name}': {exc}") from None

    if small and _has_resnet_stem(model):
        _make_small_resnet_stem(model)
    return model


def model_for(model: Any, info: Any) -> nn.Module:
    """The model a config's ``model`` section asks for, shaped for the data set ``info``
    (``msam.data.dataset_info``): its classes, channels and image size."""
    return create_model(
        model.name,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
        small_input=model.small_input,
        kwargs=model.kwargs,
    )


def check_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    small_input: bool | str = "auto",
    kwargs: dict[str, Any] | None = None,
) -> None:
    """UserError if the model cannot be built or cannot take these images, e.g. a ConvNeXt
    shrinking 28 px to below its kernel size.

    Builds and runs it on the meta device: shapes are checked, no memory is allocated, no weights
    are computed, so it is cheap enough to run before any work starts.
    """
    with torch.device("meta"):
        model = create_model(
            name,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            small_input=small_input,
            kwargs=kwargs,
        )
        try:
            model(torch.empty(2, in_chans, img_size, img_size))
        except (RuntimeError, ValueError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"model '{name}' cannot take {img_size} px images with {in_chans} channel(s): "
                f"{first}"
            ) from None


def _has_resnet_stem(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), nn.Module) and hasattr(model, "maxpool")


def _make_small_resnet_stem(model: nn.Module) -> None:
    """Stride-1 3x3 stem and no max-pool: the stem keeps full resolution instead of quartering it.

    A plain stem (``conv1`` a 7x7 stride-2 conv) becomes a 3x3 stride-1 conv with the same output
    channels; a deep stem (``conv1`` a Sequential of 3x3 convs, e.g. resnet10t) gets its first conv
    made stride 1. Other layers keep their trained-from-scratch initialisation.
    """
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = _small_conv(stem)
    elif isinstance(stem, nn.Sequential):
        for index, layer in enumerate(stem):
            if isinstance(layer, nn.Conv2d):
                stem[index] = _small_conv(layer)
                break
    model.maxpool = nn.Identity()


def _small_conv(conv: nn.Conv2d) -> nn.Conv2d:
    small = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    # timm ResNets initialise convs this way; keep the replacement consistent with its neighbours.
    with torch.no_grad():
        nn.init.kaiming_normal_(small.weight, mode="fan_out", nonlinearity="relu")
        if small.bias is not None:
            small.bias.zero_()
    return small
