"""Cross-entropy for labels given as class ids [B] or as class probabilities
[B, C] (what mixup and cutmix make), with optional label smoothing, and the
class weights of `--class-weight balanced`."""

import keras

__all__ = ["Crossentropy", "as_probabilities", "class_weights"]


def as_probabilities(labels, num_classes):
    """Class ids [B] (or [B, 1]) as one-hot rows; class probabilities [B, C] as they are."""
    if len(labels.shape) == 2 and labels.shape[-1] == num_classes and num_classes > 1:
        return keras.ops.cast(labels, "float32")
    ids = keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32")
    return keras.ops.one_hot(ids, num_classes)


@keras.saving.register_keras_serializable("tfxfer")
class Crossentropy(keras.losses.Loss):
    """Categorical cross-entropy of probabilities (the model's softmax output)
    against class ids or class probabilities. `label_smoothing` ε mixes the
    targets with the uniform distribution: y ← (1 − ε) y + ε / C (Szegedy et al.
    2016). Without smoothing and with class ids it equals Keras's
    `sparse_categorical_crossentropy`."""

    def __init__(self, num_classes, label_smoothing=0.0, name="crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)

    def call(self, y_true, y_pred):
        targets = as_probabilities(y_true, self.num_classes)
        y_pred = keras.ops.cast(y_pred, "float32")
        return keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def class_weights(config, info, log=print):
    """The `class_weight` of `fit`: `{class: n / (classes * n_class)}` for
    `--class-weight balanced`, else `None`; the class counts of the training
    images (`info.class_counts`) are logged either way when known."""
    counts = info.class_counts
    if counts:
        log("training images per class: " + ", ".join(f"{name} {n}" for name, n in zip(info.class_names, counts)))
    if config.transfer.class_weight != "balanced":
        return None
    total = sum(counts)
    weights = {c: total / (len(counts) * n) for c, n in enumerate(counts) if n}
    log("class weights (balanced): " + ", ".join(f"{info.class_names[c]} {w:.3f}" for c, w in weights.items()))
    return weights
