"""Low-rank adapters (LoRA; Hu et al., ICLR 2022) on a backbone, through Keras's own.

`enable` adds a trainable low-rank update `(alpha / rank) * A @ B` beside the
frozen kernel of each target layer, with Keras's `enable_lora` on `Dense`,
`EinsumDense` and the convolutions (KerasHub's `Backbone.enable_lora` for
its backbones). `B` starts at zero, so the adapted network starts as the
pretrained one. What trains is then the adapters and the head; with
`train="norms"` the backbone's normalisation scales and offsets and its
biases too. Under the freeze policy `head` (the first phase of
`--unfreeze head@0,lora@25%`) the head alone trains, the adapters wait.

Targets come from the registry (`BackboneSpec.lora_targets`): layer names for
KerasHub's transformers (the attention's query and value projections, Swin's
fused qkv), and `stages:N` for the CNNs: the convolutions of their last N
stages.

Keras saves a LoRA layer's kernel merged (`save_own_variables`), so
`merged_copy` gives the plain network an export serves, with no adapter left.
A run also keeps what trained apart (`save_adapters`): the adapters, the
head, and the norms and biases that trained, a small file that
`load_adapters` puts back on a model built on the same starting weights.
"""

import os
import tempfile

import keras
import numpy as np

from tfxfer import atomic
from tfxfer.backbones.registry import backbone_units, rebuild_weights
from tfxfer.errors import TfxferError

__all__ = ["TRAIN_MODES", "ADAPTER_WEIGHTS", "ADAPTERS_FILE", "parse_targets", "enable", "set_trainable",
           "adapter_pairs", "describe", "save_adapters", "saving_adapters", "load_adapters", "merged_copy"]

TRAIN_MODES = ("none", "norms")
# The names Keras gives a LoRA layer's two factors.
ADAPTER_WEIGHTS = ("lora_kernel_a", "lora_kernel_b")
# In a run folder: what trained (adapters, head, norms), keyed by weight path.
ADAPTERS_FILE = "adapters.npz"
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
        hub = backbone.get_layer("hub")
        # KerasHub's own: it finds the layers by name and freezes the rest, but takes no alpha.
        hub.enable_lora(int(rank), target_layer_names=list(value))
        if alpha is not None:
            _rescale(hub, float(alpha))
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


def _rescale(hub, alpha):
    """Give every layer that KerasHub's `enable_lora` adapted the scale `alpha / rank`.

    Keras's layers read `lora_alpha` each call, so setting it is what their
    own `enable_lora(rank, lora_alpha=alpha)` would have done."""
    for layer in _sublayers(hub, set()):
        if getattr(layer, "lora_enabled", False):
            layer.lora_alpha = alpha


def _sublayers(layer, seen):
    """Every layer held by `layer`'s attributes, at any depth. KerasHub's
    encoder blocks keep their attention layers as attributes, which
    `Model.layers` does not list; a layer holds its sublayers as plain
    attributes (or lists of them), so this walk needs no private Keras name."""
    for value in vars(layer).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                seen.add(id(item))
                yield item
                yield from _sublayers(item, seen)


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


def set_trainable(backbone, train="none", adapters=True):
    """Of the backbone's weights, only the adapters train (and, with
    `train="norms"`, the normalisation scales, offsets and biases); with
    `adapters=False`, none does (the head trains alone).

    Set per weight: a freeze policy sets whole layers, which would freeze
    the adapters with their layer's kernel."""
    for w in backbone.weights:
        w.trainable = adapters and _trains(w, train)


def _trains(weight, train):
    return _is_adapter(weight) or (train == "norms" and weight.path.rpartition("/")[2] in _NORMS_AND_BIASES)


def _is_adapter(weight):
    return weight.path.rpartition("/")[2] in ADAPTER_WEIGHTS


def adapter_pairs(backbone):
    """`[(A, B)]`: the two factors of each adapted layer of `backbone`, paired by the layer's path."""
    factors = {}
    for w in backbone.weights:
        if _is_adapter(w):
            holder, _, name = w.path.rpartition("/")
            factors.setdefault(holder, {})[name] = w
    return [(pair["lora_kernel_a"], pair["lora_kernel_b"]) for pair in factors.values()]


def _trained_weights(model):
    """The weights a LoRA phase trains: the adapters (and norms) of the backbone, and the head."""
    return [w for w in model.backbone.weights if _trains(w, model.lora_train)] + list(model.head.weights)


def describe(model, l2sp=0.0):
    """The line a run starts with: the adapters, how many parameters they
    and the head train out of the model's, and what stays as loaded."""
    layers = model.trained_layers
    trained = sum(int(np.prod(w.shape)) for w in _trained_weights(model))
    total = sum(int(np.prod(w.shape)) for w in model.trainable_weights + model.non_trainable_weights)
    line = (f"LoRA: rank {model.lora_rank}, alpha {model.lora_alpha or model.lora_rank:g}, on {len(layers)} layers "
            f"({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}): {trained:,} trainable of {total:,} "
            f"parameters ({100 * trained / total:.3g}%); the backbone's own weights"
            f"{' but its norms and biases' if model.lora_train == 'norms' else ''} stay as loaded, BatchNorm "
            "statistics too, and the exports hold the adapters merged into their kernels; no feature cache: the "
            "adapters change the backbone's features every step")
    if l2sp:
        line += (f"; --l2sp {l2sp:g} pulls each adapter's update (alpha / rank) * A @ B toward zero: the merged "
                 "kernel's distance from its start")
    return line


def save_adapters(model, path):
    """Write what a LoRA model trains (adapters, head, and norms with
    `lora_train="norms"`) to the `.npz` file `path`, keyed by weight path, in float32."""
    atomic.write_npz(path, **{w.path: keras.ops.convert_to_numpy(w.value) for w in _trained_weights(model)})


def saving_adapters(model, path, save_weights):
    """`save_weights(weights_path)`, followed by `save_adapters(model, path)`:
    a run's best epoch kept both ways."""

    def save(weights_path):
        save_weights(weights_path)
        save_adapters(model, path)

    return save


def load_adapters(model, path):
    """Load an adapters file (`save_adapters`) into `model`, a LoRA model
    built on the same starting weights with the same adapters."""
    by_path = {w.path: w for w in model.weights}
    expected = {w.path for w in _trained_weights(model)}
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    wrong = sorted(set(arrays) ^ expected) + sorted(
        key for key in set(arrays) & expected if arrays[key].shape != tuple(by_path[key].shape))
    if wrong:
        raise TfxferError(f"{path} does not hold this model's adapters ({wrong[0]} differs); build the model with the "
                          "run's --backbone, --lora, --lora-targets and --lora-train.")
    for key, value in arrays.items():
        by_path[key].assign(value)
    return model


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
