"""The precision an export computes in, whatever precision trained the model.

A model trained under `mixed_bfloat16` computes its convolutions in bfloat16.
Exported as it is, it serves slowly on CPUs without native bfloat16, and its
ONNX and LiteRT files disagree with it by some 1e-3 in probability. So every
export starts from a float32 copy of the trained model with the same weights
(the weights of a mixed-precision model are float32 already), unless asked
for a reduced precision.
"""

import keras

from tfxfer.backbones.registry import rebuild_weights
from tfxfer.errors import did_you_mean
from tfxfer.lora import merged_copy

__all__ = ["EXPORT_PRECISIONS", "at_precision", "precision_of", "tolerance"]

# precision -> (Keras dtype policy, largest |probability difference| an export
# may have from its reference). The reduced precisions are held to what their
# 8 (bfloat16) and 11 (float16) bits of mantissa give on a softmax output.
EXPORT_PRECISIONS = {
    "float32": ("float32", 1e-4),
    "bfloat16": ("mixed_bfloat16", 3e-2),
    "float16": ("mixed_float16", 5e-3),
}


def _policy(precision):
    if precision not in EXPORT_PRECISIONS:
        raise did_you_mean(precision, EXPORT_PRECISIONS, "export precision")
    return EXPORT_PRECISIONS[precision][0]


def tolerance(precision):
    """The largest |probability difference| an export in `precision` may have."""
    _policy(precision)
    return EXPORT_PRECISIONS[precision][1]


def at_precision(model, precision="float32"):
    """A copy of `model` that computes in `precision`, with the same weights.

    `model` is a `TransferModel` (anything with `get_config()` whose layers
    take their dtype policy from Keras's global one when built). The copy is
    built afresh under the policy of `precision`, so nothing that was done to
    the trained model's layers for training (`tfxfer.speedups`) reaches an
    export; the global policy is put back.
    """
    policy = _policy(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        # A KerasHub preset folder holds the architecture, so it is built again from there.
        # LoRA adapters are merged into their kernels: the export is the plain network.
        copy = type(model).from_config({**model.get_config(), "weights": rebuild_weights(model.weights_source),
                                        **({"lora": None} if model.get_config().get("lora") else {})})
    finally:
        keras.config.set_dtype_policy(previous)
    copy.weights_source = model.weights_source
    if getattr(model, "lora_rank", None):
        return merged_copy(model, copy)
    copy.set_weights(model.get_weights())
    return copy


def precision_of(model):
    """The export precision `model` computes in (`float32` for any other policy)."""
    policy = model.backbone.dtype_policy.name
    return next((name for name, (p, _) in EXPORT_PRECISIONS.items() if p == policy), "float32")
