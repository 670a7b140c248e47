"""Any torchvision classification model by name, untrained, sized to the dataset.

Besides torchvision's models there is one of our own, `small-cnn`, for tiny
images on a CPU: ImageNet networks downsample a 28x28 image to 1x1 and, on a
2-core CPU, spend most of their time in convolutions over those tiny maps, so
they train slowly and poorly there. The embedded and smoke presets use it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from optstate.errors import UserError


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, width: int = 16) -> nn.Module:
    """Five conv-BN-ReLU layers, two max-pools, global average pool, linear head."""
    w = width
    return nn.Sequential(
        *_block(3, w), *_block(w, w), nn.MaxPool2d(2),
        *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
        *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


OWN_MODELS = {"small-cnn": small_cnn}


def names() -> list[str]:
    return sorted(OWN_MODELS) + sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str, num_classes: int) -> nn.Module:
    """weights=None and a head for num_classes. Inputs always have three channels:
    the batch pipeline repeats grayscale images across channels."""
    if name in OWN_MODELS:
        model = OWN_MODELS[name](num_classes)
    else:
        kwargs = {"weights": None, "num_classes": num_classes}
        if name.startswith(("inception", "googlenet")):
            kwargs["aux_logits"] = False  # a second loss would blur a study of the optimizer
            kwargs["init_weights"] = True
        try:
            model = torchvision.models.get_model(name, **kwargs)
        except (ValueError, TypeError) as e:
            raise UserError(f"model {name!r}: {e}") from None
    return model.to(memory_format=torch.channels_last)


def check_input(model: nn.Module, image_size: int) -> None:
    """Fail early, with one sentence, for a model that cannot take this image size."""
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the model cannot take {image_size}x{image_size} images ({first}); "
                        f"choose a larger image_size or another model") from None
    finally:
        model.train()
