"""Supervised pretraining: classify the source labels, keep the backbone.

The classic recipe of "pretrain your own CNN on a large source set, swap the
output layer, fine-tune": the whole backbone trains, BatchNorm included, with a
softmax head over the source classes that is dropped afterwards. Weak
augmentation (flip + pad-and-crop) by default; label smoothing is an option.
"""

import keras

from tfxfer.model import build_model
from tfxfer.pretext.registry import PretextMethod, register_method

__all__ = ["smoothed_crossentropy"]


def smoothed_crossentropy(num_classes, smoothing):
    """Cross-entropy of integer labels against probabilities, with label smoothing."""

    def loss(labels, probabilities):
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32"), num_classes)
        return keras.losses.categorical_crossentropy(one_hot, probabilities, label_smoothing=smoothing)

    return loss


def _build(config, info, image_size):
    return build_model(
        config.model.backbone, num_classes=info.num_classes, weights=config.model.weights, image_size=image_size,
        freeze="full", train_bn=True, bn_momentum=config.model.bn_momentum, class_names=info.class_names,
    )


def _compile(model, optimizer, config, info):
    smoothing = config.pretext.label_smoothing
    loss = smoothed_crossentropy(info.num_classes, smoothing) if smoothing else "sparse_categorical_crossentropy"
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=config.run.jit_compile)


register_method(
    PretextMethod(
        name="supervised",
        build=_build,
        compile=_compile,
        augment=lambda config: config.data.augment,
        monitor=lambda info: ("val_accuracy", "max"),
        settings=lambda config: {"augment": config.data.augment, "label_smoothing": config.pretext.label_smoothing},
        needs_labels=True,
    )
)
