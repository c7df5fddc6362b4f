"""SimCLR: contrastive pretraining with the InfoNCE / NT-Xent loss.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020. Each image gives two augmented views;
the backbone and a projection head map them to z, and for the 2N views of a
batch

    loss = -1/2N sum_i log( exp(sim(z_i, z_j(i)) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

where j(i) is the other view of i's image and sim is cosine similarity. Labels
are never used: a flat folder of unlabelled images works.

Logged each epoch: the contrastive top-1 accuracy (the positive is the most
similar of the 2N-1 others), the standard deviation of the L2-normalised
embeddings (about 1/sqrt(d) is healthy; toward 0 the embeddings collapse, and a
warning says so), and, when a labelled validation split exists, a cosine kNN
accuracy of the backbone's features on it (leave-one-out, k = 20).
"""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfxfer.pretext.base import PretextModel, backbone_features
from tfxfer.pretext.options import SimCLROptions
from tfxfer.pretext.registry import PretextMethod, register_method
from tfxfer.data.pipeline import augment_batches

__all__ = ["SimCLR", "nt_xent", "embedding_std", "simclr_views", "KnnAccuracy", "knn_accuracy"]

# Augmentations of the paper, at strengths chosen for small images.
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER_STRENGTH = 0.5
JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2


def nt_xent(z1, z2, temperature):
    """`(loss, top-1 accuracy)` of the NT-Xent loss over two views [N, d] each."""
    z = tf.math.l2_normalize(tf.concat([tf.cast(z1, tf.float32), tf.cast(z2, tf.float32)], 0), axis=1)
    n = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    # A view is not its own negative.
    logits = logits - 1e9 * tf.eye(2 * n)
    positives = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], 0)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), positives), tf.float32))
    return loss, accuracy


def embedding_std(z):
    """Mean over dimensions of the batch standard deviation of L2-normalised `z`."""
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))


def simclr_views(image, seed):
    """Two augmented uint8 views of one uint8 image [S, S, 3], from a seed pair."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return _view(image, seeds[0]), _view(image, seeds[1])


def _view(image, seed):
    shape = tf.shape(image)
    size = shape[:2]
    s = tf.random.experimental.stateless_split(seed, num=8)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4]), seed=s[0], min_object_covered=0.0,
        aspect_ratio_range=CROP_RATIO, area_range=CROP_SCALE, use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, extent)
    x = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, size, method="bilinear", antialias=True)
    x = tf.image.stateless_random_flip_left_right(x, seed=s[1])
    strength = JITTER_STRENGTH

    def jitter(x):
        x = tf.image.stateless_random_brightness(x, 0.8 * strength, seed=s[2])
        x = tf.image.stateless_random_contrast(x, 1 - 0.8 * strength, 1 + 0.8 * strength, seed=s[3])
        x = tf.image.stateless_random_saturation(x, 1 - 0.8 * strength, 1 + 0.8 * strength, seed=s[4])
        x = tf.image.stateless_random_hue(x, 0.2 * strength, seed=s[5])
        return tf.clip_by_value(x, 0.0, 1.0)

    x = tf.cond(tf.random.stateless_uniform([], seed=s[6]) < JITTER_PROBABILITY, lambda: jitter(x), lambda: x)
    gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
    x = tf.cond(tf.random.stateless_uniform([], seed=s[7]) < GRAYSCALE_PROBABILITY, lambda: gray, lambda: x)
    # No blur: these images are 64 px or below, where blur removes too much.
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


@keras.saving.register_keras_serializable(package="tfxfer")
class SimCLR(PretextModel):
    """Backbone + 2-layer projection head with BatchNorm, trained with NT-Xent."""

    def __init__(self, backbone, image_size, temperature=0.2, projection_dim=128, bn_momentum=None, **kwargs):
        super().__init__(backbone, image_size, bn_momentum, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.projection_dim = int(projection_dim)
        width = self.features_dim
        self.projection = keras.Sequential(
            [
                keras.layers.Dense(width, use_bias=False, name="projection_dense1"),
                keras.layers.BatchNormalization(momentum=0.9, name="projection_bn"),
                keras.layers.ReLU(name="projection_relu"),
                keras.layers.Dense(self.projection_dim, dtype="float32", name="projection_dense2"),
            ],
            name="projection",
        )
        self.projection.build((None, width))
        # Keras's own step logs the loss; these two are logged beside it.
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.std_tracker = keras.metrics.Mean(name="embedding_std")
        self._build_by_calling()

    def call(self, images, training=False):
        """Projections of `images`, or of each of the two views `(view1, view2)`
        of a training batch, which Keras's step passes as one input."""
        if isinstance(images, (tuple, list)):
            return tuple(self.call(view, training=training) for view in images)
        return self.projection(self.features(images, training=training), training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        z1, z2 = y_pred
        loss, accuracy = nt_xent(z1, z2, self.temperature)
        self.accuracy_tracker.update_state(accuracy)
        self.std_tracker.update_state(embedding_std(tf.concat([z1, z2], 0)))
        return loss

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "projection_dim": self.projection_dim}


class CollapseWarning(keras.callbacks.Callback):
    """Warn when the embeddings' spread falls far below the healthy 1/sqrt(d)."""

    def __init__(self, dim, share=0.25):
        super().__init__()
        self.healthy = 1 / math.sqrt(dim)
        self.share = share

    def on_epoch_end(self, epoch, logs=None):
        std = (logs or {}).get("embedding_std")
        if std is not None and std < self.share * self.healthy:
            warnings.warn(
                f"SimCLR embeddings are collapsing: their standard deviation is {std:.4f}, "
                f"against about {self.healthy:.4f} (1/sqrt(d)) when healthy; lower the learning rate "
                "or raise the temperature.",
                stacklevel=2,
            )


class KnnAccuracy(keras.callbacks.Callback):
    """`val_knn_accuracy`: leave-one-out cosine kNN of the backbone's pooled,
    L2-normalised features on the labelled validation split (k neighbours,
    votes weighted by exp(similarity / 0.07), as in Wu et al. 2018)."""

    def __init__(self, val, k=20, max_images=5000):
        super().__init__()
        self.val, self.k, self.max_images = val, k, max_images

    def on_epoch_end(self, epoch, logs=None):
        features, labels = backbone_features(self.model, self.val, self.max_images)
        if logs is not None and len(np.unique(labels)) > 1:
            logs["val_knn_accuracy"] = knn_accuracy(features, labels, self.k)


def knn_accuracy(features, labels, k=20, temperature=0.07):
    """Leave-one-out weighted cosine kNN accuracy of `features` [N, d]."""
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(similarity, neighbours, 1) / temperature)
    votes = np.zeros((len(labels), int(labels.max()) + 1))
    np.add.at(votes, (np.arange(len(labels))[:, None], labels[neighbours]), weights)
    return float((votes.argmax(1) == labels).mean())


def _validation(val, config):
    # Fixed views for the validation loss: the same pairs every epoch.
    return augment_batches(val, simclr_views, config.run.seed, rerandomize=False)


def _labelled(info):
    return info.num_classes > 1


register_method(
    PretextMethod(
        name="simclr",
        build=lambda config, info, image_size: SimCLR(
            config.model.backbone, image_size, config.pretext.temperature, config.pretext.projection_dim,
            config.model.bn_momentum, weights=config.model.weights,
        ),
        augment=lambda config: simclr_views,
        validation=_validation,
        monitor=lambda info: ("val_knn_accuracy", "max") if _labelled(info) else ("loss", "min"),
        callbacks=lambda model, run_dir, val, info, config: (
            [KnnAccuracy(val)] if _labelled(info) else []
        ) + [CollapseWarning(config.pretext.projection_dim)],
        settings=lambda config: {
            "temperature": config.pretext.temperature, "projection_dim": config.pretext.projection_dim,
            "augmentations": {"crop_scale": CROP_SCALE, "flip": True, "jitter_strength": JITTER_STRENGTH,
                              "jitter_probability": JITTER_PROBABILITY, "grayscale_probability": GRAYSCALE_PROBABILITY,
                              "blur": False},
        },
        options=SimCLROptions,
    )
)
