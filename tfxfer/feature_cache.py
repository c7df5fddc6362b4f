"""Feature caching: while the backbone is frozen, train the head on its features.

With `freeze=head` (and the first phase of `lp-ft`) the backbone is a fixed
function, so `pool(backbone(preprocess(image)))` is computed once per image and
the head trains on those vectors: an epoch is a pass over `[N, D]` floats, not
through the backbone.

What the cache keeps and what it does not:

* the features are those of the un-augmented images, computed in inference
  mode. With `--augment`, a cached phase does not augment (the run says so);
  layers inside the backbone that are random in training (EfficientNet's
  dropout) do not run either. Dropout before the head still does.
* the exported model is the whole `TransferModel`: the head trained on the
  cache is the same layer object, so the backbone is always in the export.

`--feature-cache DIR` keeps the features on disk, keyed by the backbone's name,
a digest of its weights, the image size and a fingerprint of the images and
labels (order-independent), so a second run on the same data and weights skips
the extraction.
"""

import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfxfer import atomic, probes
from tfxfer.data.pipeline import epoch_passes, prefetched
from tfxfer.errors import TfxferError
from tfxfer.model import PenalizedLoss

__all__ = ["FEATURE_CACHE", "HeadModel", "use_feature_cache", "extract_features", "cached_features", "feature_dataset",
           "fit_probe"]

FEATURE_CACHE = ("auto", "off", "memory")  # or a folder


def use_feature_cache(setting, first_policy, augment, log=print):
    """Whether the run's first (frozen-backbone) phase trains on cached features."""
    if setting == "off" or str(first_policy) != "head":
        return False
    if setting == "auto" and augment != "none":
        return False  # auto never changes what training sees
    if augment != "none":
        log(f"feature cache: the head trains on features of un-augmented images; --augment {augment} applies "
            "only to phases that train the backbone")
    return True


@keras.saving.register_keras_serializable(package="tfxfer")
class HeadModel(PenalizedLoss, keras.Model):
    """The head of a `TransferModel` (dropout + dense), on cached features.

    It shares the layers, and so the weights, of `transfer`, and its penalty:
    its loss adds the same head penalty and logs the same keys (`l2sp` stays 0,
    the backbone being frozen), so a run's history reads the same with or
    without the cache.
    """

    def __init__(self, transfer, **kwargs):
        super().__init__(name="cached_head", **kwargs)
        self.drop, self.head = transfer.drop, transfer.head
        self.penalty = transfer.penalty
        self._track_penalties()
        self.freeze = "head"

    def call(self, features, training=False):
        return self.head(self.drop(features, training=training))


def _extractor(model):
    @tf.function
    def features(images):
        return tf.cast(model.features(images), tf.float32)

    return features


def extract_features(model, dataset):
    """`(features [N, D] float32, labels [N])` of a batched `(images, labels)` dataset."""
    features, labels = [], []
    extract = _extractor(model)
    for images, batch_labels in dataset:
        features.append(extract(images).numpy())
        labels.append(batch_labels.numpy())
    if not features:
        raise TfxferError("No images to compute features of.")
    return np.concatenate(features), np.concatenate(labels)


def weights_digest(model):
    digest = hashlib.sha256()
    for weight in model.backbone.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset):
    """A digest of the images and labels of `dataset`, whatever their order."""
    digests = []
    for images, labels in dataset.as_numpy_iterator():
        for image, label in zip(images, labels):
            digests.append(hashlib.sha1(image.tobytes() + int(label).to_bytes(8, "little")).digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def cached_features(model, dataset, setting, split, log=print):
    """Features and labels of `dataset` for the run's model: computed, or read
    from the folder `setting` when it holds them for these weights and images."""
    if setting in ("auto", "memory"):
        return extract_features(model, dataset)
    key = hashlib.sha256(
        f"{model.backbone_name}|{model.image_size}|{weights_digest(model)}|{data_fingerprint(dataset)}".encode()
    ).hexdigest()[:24]
    path = os.path.join(setting, f"{model.backbone_name}-{model.image_size}px-{key}.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            log(f"feature cache: {split} features read from {path}")
            return saved["features"], saved["labels"]
    features, labels = extract_features(model, dataset)
    os.makedirs(setting, exist_ok=True)
    atomic.write_npz(path, features=features, labels=labels)
    log(f"feature cache: {split} features written to {path}")
    return features, labels


def feature_dataset(features, labels, batch_size, training, seed):
    """Batched `(features, labels)`; for training, in an order set by `seed`
    and the epoch (`tfxfer.data.pipeline.set_epoch`)."""
    ds = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.int32)))
    if not training:
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    passes = epoch_passes(lambda pass_seed: ds.shuffle(len(labels), seed=pass_seed).batch(batch_size),
                          -(-len(labels) // batch_size), seed)
    return prefetched(passes)


def fit_probe(model, train, val, setting="memory", monitor="val_accuracy", seed=0, log=print):
    """Set the head of `model` (built with `probe=`) from the features of the
    batched, un-augmented `train` and `val` datasets (`tfxfer.probes`); returns
    the logs of this one-epoch run: training and validation loss and accuracy."""
    started = time.time()
    setting = "memory" if setting in ("auto", "off") else setting
    train_features, train_labels = cached_features(model, train, setting, "train", log)
    val_features, val_labels = cached_features(model, val, setting, "validation", log)
    if model.probe == "knn":
        keep = probes.bank_sample(train_labels, model.head.bank_size, seed)
        model.head.set_bank(train_features[keep], train_labels[keep])
        bank = f"{len(keep):,} training images" + (
            f" (a class-stratified sample of {len(train_labels):,}: --knn-bank)" if len(keep) < len(train_labels) else "")
        log(f"k-NN probe: k {model.head.k}, temperature {model.head.temperature:g}, bank of {bank} x "
            f"{train_features.shape[1]} features ({len(keep) * train_features.shape[1] * 4 / 2**20:.1f} MiB in the "
            "SavedModel)")
    else:
        kernel, bias, _, _ = probes.fit_linear(train_features, train_labels, val_features, val_labels,
                                               model.num_classes, log)
        model.head.set_weights([kernel, bias])
    logs = {}
    for prefix, features, labels in (("", train_features, train_labels), ("val_", val_features, val_labels)):
        probabilities = keras.ops.convert_to_numpy(model.head(features))
        predicted = probabilities.argmax(axis=1)
        logs[prefix + "accuracy"] = float((predicted == labels).mean())
        logs[prefix + "loss"] = float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12)).mean())
    if monitor == "val_macro_f1":  # `predicted` is the validation split's, the loop's last
        from sklearn.metrics import f1_score

        logs["val_macro_f1"] = float(f1_score(val_labels, predicted, average="macro",
                                              labels=list(range(model.num_classes)), zero_division=0))
    log(f"{model.probe} probe: {len(train_labels):,} train and {len(val_labels):,} validation features in "
        f"{time.time() - started:.1f} s; training accuracy {logs['accuracy']:.4f}, validation {logs['val_accuracy']:.4f}")
    return logs
