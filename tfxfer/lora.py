"""Low-rank adapters (LoRA; Hu et al., ICLR 2022) on a backbone, through Keras's own.

`enable` adds a trainable low-rank update `(alpha / rank) * A @ B` beside the
frozen kernel of each target layer, with Keras's `enable_lora` on `Dense`,
`EinsumDense` and the convolutions (KerasHub's `Backbone.enable_lora` for
its backbones). `B` starts at zero, so the adapted network starts as the
pretrained one. What trains is then the adapters and the head; with
`train="norms"` the backbone's normalisation scales and offsets and its
biases too.

Targets come from the registry (`BackboneSpec.lora_targets`): layer names for
KerasHub's transformers (the attention's query and value projections, Swin's
fused qkv), and `stages:N` for the CNNs: the convolutions of their last N
stages.

Keras saves a LoRA layer's kernel merged (`save_own_variables`), so
`merged_copy` gives the plain network an export serves, with no adapter left.
"""

import os
import tempfile

import keras

from tfxfer.backbones.registry import backbone_units, rebuild_weights
from tfxfer.errors import TfxferError

__all__ = ["TRAIN_MODES", "ADAPTER_WEIGHTS", "parse_targets", "enable", "set_trainable", "merged_copy"]

TRAIN_MODES = ("none", "norms")
# The names Keras gives a LoRA layer's two factors.
ADAPTER_WEIGHTS = ("lora_kernel_a", "lora_kernel_b")
_NORMS_AND_BIASES = ("gamma", "beta", "bias")
# Convolutions and the dense layers some CNNs use as 1x1 convolutions (ConvNeXt).
_ADAPTABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense, keras.layers.EinsumDense)


def parse_targets(text):
    """`"stages:N"` -> `("stages", N)`; `"a,b"` -> `("names", ("a", "b"))`."""
    text = str(text).strip()
    if text.startswith("stages:"):
        count = text[7:]
        if not count.isdigit() or int(count) < 1:
            raise TfxferError(f"--lora-targets {text}: stages:N takes a positive whole number, e.g. stages:2.")
        return "stages", int(count)
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise TfxferError("--lora-targets takes stages:N or layer names separated by commas.")
    return "names", names


def enable(backbone, spec, rank, alpha=None, targets=None, train="none"):
    """Add adapters of `rank` to the target layers of `backbone` (built by
    `spec`) and set what trains; returns the adapted layers' names."""
    if int(rank) < 1:
        raise TfxferError(f"--lora takes a rank of at least 1, got {rank}.")
    if train not in TRAIN_MODES:
        raise TfxferError(f"--lora-train takes {' or '.join(TRAIN_MODES)}, got {train!r}.")
    default = not targets
    targets = targets or spec.lora_targets
    if targets is None:
        raise TfxferError(f"{spec.name} has no layers LoRA adapts (no attention projections or convolutions in "
                          "its stage map); fine-tune it with --freeze instead.")
    kind, value = parse_targets(targets)
    if spec.presets:  # a KerasHub backbone, wrapped by the registry
        if kind != "names":
            raise TfxferError(f"{spec.name} takes layer names as --lora-targets (default {spec.lora_targets}).")
        if alpha is not None and float(alpha) != float(rank):
            raise TfxferError(f"KerasHub's enable_lora scales its adapters by alpha = rank; give --lora-alpha {rank} "
                              f"or leave it out for {spec.name}.")
        hub = backbone.get_layer("hub")
        hub.enable_lora(int(rank), target_layer_names=list(value))
        adapted = sorted({w.path.rpartition("/")[0] for w in hub.weights if _is_adapter(w)})
    else:
        layers = _cnn_targets(backbone, spec, kind, value)
        for layer in layers:
            layer.enable_lora(int(rank), lora_alpha=None if alpha is None else float(alpha))
        adapted = [layer.name for layer in layers]
    if not adapted:
        raise TfxferError(f"No layer of {spec.name} matches --lora-targets {targets}"
                          + (" (its default); give layer names." if default else "."))
    set_trainable(backbone, train)
    return adapted


def _cnn_targets(backbone, spec, kind, value):
    units = backbone_units(backbone, spec)
    if kind == "stages":
        if value > len(spec.stages):
            raise TfxferError(f"{spec.name} has {len(spec.stages)} stages; --lora-targets stages:{value} asks for more.")
        stages = set(spec.stages[len(spec.stages) - value:])
        # Not depthwise convolutions, whose kernels are one filter per channel.
        return [layer for layer, stage in units if stage in stages and type(layer) in _ADAPTABLE
                and getattr(layer, "groups", 1) == 1]
    return [layer for layer, _ in units if layer.name in value and hasattr(layer, "enable_lora")]


def set_trainable(backbone, train="none"):
    """Of the backbone's weights, only the adapters train (and, with
    `train="norms"`, the normalisation scales, offsets and biases).

    Set per weight: a freeze policy sets whole layers, which would freeze
    the adapters with their layer's kernel."""
    for w in backbone.weights:
        name = w.path.rpartition("/")[2]
        w.trainable = _is_adapter(w) or (train == "norms" and name in _NORMS_AND_BIASES)


def _is_adapter(weight):
    return weight.path.rpartition("/")[2] in ADAPTER_WEIGHTS


def merged_copy(model, plain):
    """Load into `plain` (the same network built without adapters, in
    float32) the weights of `model`, each adapted kernel merged with its
    update in float32.

    Keras writes an adapted layer's kernel merged, but in the layer's compute
    dtype: under mixed_bfloat16 that would round every adapted kernel to
    bfloat16. So the merge goes through a float32 copy of `model` first."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        adapted = type(model).from_config({**model.get_config(), "weights": rebuild_weights(model.weights_source)})
    finally:
        keras.config.set_dtype_policy(previous)
    adapted.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory(prefix="tfxfer-lora-") as folder:
        path = os.path.join(folder, "merged.weights.h5")
        adapted.save_weights(path)
        plain.load_weights(path)
    return plain
