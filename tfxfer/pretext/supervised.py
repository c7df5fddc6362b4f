"""Supervised pretraining: classify the source labels, keep the backbone.

The classic recipe of "pretrain your own CNN on a large source set, swap the
output layer, fine-tune": the whole backbone trains, BatchNorm included, with a
softmax head over the source classes that is dropped afterwards. Weak
augmentation (flip + pad-and-crop) by default; label smoothing is an option.
"""

from tfxfer.losses import Crossentropy
from tfxfer.metrics import Accuracy
from tfxfer.model import build_model
from tfxfer.pretext.options import SupervisedOptions
from tfxfer.pretext.registry import PretextMethod, register_method


def _build(config, info, image_size):
    return build_model(
        config.model.backbone, num_classes=info.num_classes, weights=config.model.weights, image_size=image_size,
        freeze="full", train_bn=True, bn_momentum=config.model.bn_momentum, class_names=info.class_names,
        speedups=config.run.cpu_speedups,
    )


def _compile(model, optimizer, config, info):
    loss = Crossentropy(info.num_classes, config.pretext.label_smoothing)
    model.compile(optimizer=optimizer, loss=loss, metrics=[Accuracy()], jit_compile=config.run.jit_compile)


register_method(
    PretextMethod(
        name="supervised",
        build=_build,
        compile=_compile,
        augment=lambda config: config.data.augment,
        monitor=lambda info: ("val_accuracy", "max"),
        settings=lambda config: {"augment": config.data.augment, "label_smoothing": config.pretext.label_smoothing},
        needs_labels=True,
        options=SupervisedOptions,
    )
)
