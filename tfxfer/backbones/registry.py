"""The backbone registry.

Each backbone is a `BackboneSpec`: how to build it, the preprocessing its weights
expect, its default input size, and how its layers group into stages. Data
pipelines, freeze policies and export all read the spec, so training and serving
cannot disagree about preprocessing.
"""

import dataclasses
import fnmatch
import functools
import importlib
import os
from typing import Callable, Optional

from tfxfer.backbones.pretrained import find_pretrained, is_preset_folder
from tfxfer.errors import TfxferError, did_you_mean, is_network_failure

__all__ = [
    "BackboneSpec",
    "Reference",
    "feature_pool",
    "set_bn_momentum",
    "scale_unit",
    "scale_symmetric",
    "no_imagenet_weights",
    "register_backbone",
    "list_backbones",
    "get_backbone",
    "create_backbone",
    "layer_stages",
    "backbone_units",
    "rebuild_weights",
]

KERAS_CACHE = os.path.join(os.path.expanduser("~"), ".keras", "models")


class Reference:
    """A function named `"module:name"`, imported at its first call.

    Specs name the `keras.applications` constructors and preprocessing this
    way, so that the registry loads without Keras and `tfxfer backbones`
    answers without starting TensorFlow.
    """

    def __init__(self, reference):
        self.__module__, _, self.__qualname__ = reference.partition(":")

    @functools.cached_property
    def target(self):
        return functools.reduce(getattr, self.__qualname__.split("."), importlib.import_module(self.__module__))

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def __repr__(self):
        return f"Reference({self.__module__}:{self.__qualname__})"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What tfxfer needs to know about one backbone family member.

    Args:
        name: registry name, e.g. `"resnet50"`.
        builder: `keras.applications`-style constructor taking `weights`,
            `include_top` and `input_shape` (a function or a `Reference`).
        preprocess: maps raw 0-255 float pixels to what the weights expect.
        default_size: the input size the ImageNet weights were trained at.
        stages: stage names from input to output.
        stage_of: maps a layer name to its stage, or `None` to keep the stage of
            the layer before it (padding, pooling and other glue layers).
        sizes: the input sizes it suits, as `tfxfer backbones` shows them.
        min_size: the smallest input size it builds at.
        params: the headless network's parameter count at `default_size`, for
            `tfxfer backbones` (tests check it against the built network);
            `None` counts them by building it.
        source: what `--weights imagenet` loads, as `tfxfer backbones` shows it.
        licence: the licence of those weights.
        units: maps the built backbone to `[(layer, stage)]`, the layers that
            freeze policies act on; `None` takes `backbone.layers` with
            `stage_of` (networks whose blocks are nested layers need it).
        presets: `--weights DIR` takes a KerasHub preset folder.
        lora_targets: the layers `--lora` adapts by default (`tfxfer.lora`):
            `"stages:N"` (the convolutions of the last N stages) or layer names
            separated by commas; `None` where no layer takes adapters.
    """

    name: str
    builder: Callable
    preprocess: Callable
    default_size: int
    stages: tuple
    stage_of: Callable
    sizes: str = ""
    min_size: int = 32  # keras.applications' floor
    params: Optional[int] = None
    source: str = "ImageNet-1k (keras.applications)"
    licence: str = ""
    units: Optional[Callable] = None
    presets: bool = False
    lora_targets: Optional[str] = "stages:1"


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
        weights: `"imagenet"`, `None`/`"none"` for random init, the path of a
            weights file for the headless backbone, or a tfxfer run folder
            (see `tfxfer.backbones.pretrained`).
        image_size: square input size; defaults to the spec's.

    Returns:
        A functional `keras.Model` from images (already preprocessed) to its
        last feature map.
    """
    spec = get_backbone(name)
    size = image_size or spec.default_size
    if size < spec.min_size:
        raise TfxferError(f"{name} needs images of at least {spec.min_size} px, got {size}; pass --image-size {spec.min_size} or more.")
    shape = (size, size, 3)
    if weights in (None, "none"):
        return spec.builder(weights=None, include_top=False, input_shape=shape)
    if spec.presets and (weights == "imagenet" or weights == spec.builder.preset or is_preset_folder(weights)):
        # KerasHub's own loading: the builder says what went wrong in one sentence.
        return spec.builder(weights=weights, include_top=False, input_shape=shape)
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
    found = find_pretrained(weights)
    if found:
        weights, pretrained = found
        if pretrained["backbone"] != name or int(pretrained["image_size"]) != size:
            raise TfxferError(
                f"{weights!r} holds a {pretrained['backbone']} backbone at {pretrained['image_size']} px, "
                f"not {name} at {size} px; use --backbone {pretrained['backbone']} --image-size {pretrained['image_size']}."
            )
    if not os.path.isfile(weights):
        raise TfxferError(
            f"Weights file {weights!r} does not exist; pass --weights imagenet, "
            "--weights none, or the path of a weights file."
        )
    architecture = {"architecture": pretrained["architecture"]} if found and "architecture" in pretrained else {}
    model = spec.builder(weights=None, include_top=False, input_shape=shape, **architecture)
    try:
        model.load_weights(weights)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TfxferError(
            f"Weights file {weights!r} does not fit backbone {name} without its "
            f"top ({first_line}); pass weights saved from the same architecture."
        ) from None
    return model


def rebuild_weights(weights):
    """What to pass as `weights` to build the same architecture again before
    setting its values: `"none"`, except for a KerasHub preset folder or a run
    folder, which may hold an architecture other than the entry's default."""
    return weights if is_preset_folder(weights) or find_pretrained(weights) else "none"


def backbone_units(backbone, spec):
    """`[(layer, stage)]`: the layers of `backbone` that freeze policies act
    on, input to output, each with its stage name."""
    if spec.units is not None:
        return spec.units(backbone)
    units, current = [], spec.stages[0]
    for layer in backbone.layers:
        current = spec.stage_of(layer.name) or current
        units.append((layer, current))
    return units


def layer_stages(backbone, spec):
    """Map each layer name of `backbone` to its stage name, in layer order."""
    return {layer.name: stage for layer, stage in backbone_units(backbone, spec)}


def feature_pool(backbone):
    """The layer from a backbone's output to a feature vector: global average
    pooling of a feature map; nothing for a vector (simplecnn's dense layer)."""
    import keras

    if len(backbone.output.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="pool")
    return keras.layers.Identity(name="pool")


def set_bn_momentum(backbone, momentum):
    """Set the momentum of every BatchNorm layer of `backbone`; `None` keeps them."""
    if momentum is None:
        return
    import keras

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def scale_unit(x):
    """0-255 pixels to [0, 1]."""
    return x / 255.0


def scale_symmetric(x):
    """0-255 pixels to [-1, 1]."""
    return x / 127.5 - 1.0


def no_imagenet_weights(name, weights, include_top=False):
    """For backbones that tfxfer defines: there is no ImageNet file to load."""
    if weights == "imagenet":
        raise TfxferError(
            f"{name} has no ImageNet weights; pass --weights none, a weights file, "
            "or the folder of a `tfxfer pretrain` run."
        )
    if include_top:
        raise ValueError(f"{name} is headless: build it with include_top=False.")
