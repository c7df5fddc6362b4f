"""A registry of backbones over `keras.applications`.

Each backbone is a `BackboneSpec`: how to build it, the preprocessing its weights
expect, its default input size, and how its layers group into stages. Data
pipelines, freeze policies and export all read the spec, so training and serving
cannot disagree about preprocessing.
"""

import dataclasses
import fnmatch
import os
import re
from typing import Callable

import keras

from tfxfer.errors import TfxferError, did_you_mean, is_network_failure

__all__ = [
    "BackboneSpec",
    "register_backbone",
    "list_backbones",
    "get_backbone",
    "create_backbone",
    "layer_stages",
]

KERAS_CACHE = os.path.join(os.path.expanduser("~"), ".keras", "models")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What tfxfer needs to know about one backbone family member.

    Args:
        name: registry name, e.g. `"resnet50"`.
        builder: `keras.applications`-style constructor taking `weights`,
            `include_top` and `input_shape`.
        preprocess: maps raw 0-255 float pixels to what the weights expect.
        default_size: the input size the ImageNet weights were trained at.
        stages: stage names from input to output.
        stage_of: maps a layer name to its stage, or `None` to keep the stage of
            the layer before it (padding, pooling and other glue layers).
    """

    name: str
    builder: Callable
    preprocess: Callable
    default_size: int
    stages: tuple
    stage_of: Callable


_REGISTRY = {}


def register_backbone(spec):
    """Add `spec` to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(pattern="*"):
    """Registered backbone names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_backbone(name):
    """The `BackboneSpec` registered as `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise did_you_mean(name, _REGISTRY, "backbone") from None


def create_backbone(name, weights="imagenet", image_size=None):
    """Build the headless backbone `name` with `weights`.

    Args:
        name: a registered backbone name.
        weights: `"imagenet"`, `None`/`"none"` for random init, or the path of a
            weights file for the headless backbone.
        image_size: square input size; defaults to the spec's.

    Returns:
        A functional `keras.Model` from images (already preprocessed) to its
        last feature map.
    """
    spec = get_backbone(name)
    size = image_size or spec.default_size
    shape = (size, size, 3)
    if weights in (None, "none"):
        return spec.builder(weights=None, include_top=False, input_shape=shape)
    if weights == "imagenet":
        try:
            return spec.builder(weights="imagenet", include_top=False, input_shape=shape)
        except Exception as e:
            if not is_network_failure(e):
                raise
            raise TfxferError(
                f"Could not download the ImageNet weights for {name} (no network?); "
                f"put the weights file in {KERAS_CACHE} or pass --weights PATH "
                "with a local weights file, or --weights none."
            ) from None
    if not os.path.isfile(weights):
        raise TfxferError(
            f"Weights file {weights!r} does not exist; pass --weights imagenet, "
            "--weights none, or the path of a weights file."
        )
    model = spec.builder(weights=None, include_top=False, input_shape=shape)
    try:
        model.load_weights(weights)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TfxferError(
            f"Weights file {weights!r} does not fit backbone {name} without its "
            f"top ({first_line}); pass weights saved from the same architecture."
        ) from None
    return model


def layer_stages(backbone, spec):
    """Map each layer name of `backbone` to its stage name, in layer order."""
    stages = {}
    current = spec.stages[0]
    for layer in backbone.layers:
        current = spec.stage_of(layer.name) or current
        stages[layer.name] = current
    return stages


def _prefix_stage_of(rules):
    """A `stage_of` from (regex, stage) rules; the stage may use regex groups."""
    compiled = [(re.compile(p), s) for p, s in rules]

    def stage_of(layer_name):
        for pattern, stage in compiled:
            m = pattern.match(layer_name)
            if m:
                return m.expand(stage)
        return None

    return stage_of


def _mobilenetv2_stage_of(layer_name):
    # Stages end where the feature map halves: blocks 1-2, 3-5, 6-12, 13-16.
    if layer_name.startswith(("Conv1", "bn_Conv1", "expanded_conv")):
        return "stem"
    m = re.match(r"block_(\d+)_", layer_name)
    if m:
        block = int(m.group(1))
        return "stage" + str(1 + sum(block >= b for b in (3, 6, 13)))
    if layer_name.startswith(("Conv_1", "out_relu")):
        return "top"
    return None


_RESNET_STAGES = ("stem", "conv2", "conv3", "conv4", "conv5")
_resnet_stage_of = _prefix_stage_of(
    [(r"(conv1|pool1)_", "stem"), (r"(conv[2-5])_", r"\1"), (r"post_", "conv5")]
)
_apps = keras.applications

for _name, _builder, _module in [
    ("resnet50", _apps.ResNet50, _apps.resnet),
    ("resnet101", _apps.ResNet101, _apps.resnet),
    ("resnet152", _apps.ResNet152, _apps.resnet),
    ("resnet50v2", _apps.ResNet50V2, _apps.resnet_v2),
    ("resnet101v2", _apps.ResNet101V2, _apps.resnet_v2),
]:
    register_backbone(
        BackboneSpec(_name, _builder, _module.preprocess_input, 224, _RESNET_STAGES, _resnet_stage_of)
    )

register_backbone(
    BackboneSpec(
        "mobilenetv2",
        _apps.MobileNetV2,
        _apps.mobilenet_v2.preprocess_input,
        224,
        ("stem", "stage1", "stage2", "stage3", "stage4", "top"),
        _mobilenetv2_stage_of,
    )
)

_EFFICIENTNET_STAGES = ("stem",) + tuple(f"block{i}" for i in range(1, 8)) + ("top",)
_efficientnet_stage_of = _prefix_stage_of(
    [(r"stem_", "stem"), (r"block(\d)[a-z]_", r"block\1"), (r"top_", "top")]
)
for _i, _size in enumerate((224, 240, 260, 300)):
    register_backbone(
        BackboneSpec(
            f"efficientnetb{_i}",
            getattr(_apps, f"EfficientNetB{_i}"),
            # EfficientNet rescales and normalizes inside the model itself.
            _apps.efficientnet.preprocess_input,
            _size,
            _EFFICIENTNET_STAGES,
            _efficientnet_stage_of,
        )
    )
