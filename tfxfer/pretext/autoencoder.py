"""Autoencoder: pretrain the backbone as the encoder of a reconstruction.

The decoder mirrors the backbone's downsampling: one upsampling stage (nearest
x2, 3x3 conv, BatchNorm, ReLU) for each halving between the input and the
backbone's feature map, then a 3x3 conv to RGB with a sigmoid. A backbone that
ends in a feature vector (simplecnn) is first projected back to a 1/4-size map.
The loss is the mean squared error against the input in [0, 1]. With
`denoise=STD`, Gaussian noise of that standard deviation (in [0, 1] units) is
added to the input, and the clean image is the target (Vincent et al. 2008).
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf

from tfxfer.pretext.base import PretextModel
from tfxfer.pretext.options import AutoencoderOptions
from tfxfer.pretext.registry import PretextMethod, register_method
from tfxfer.data.pipeline import augment_batches

__all__ = ["Autoencoder", "ReconstructionGrid", "noisy"]


def noisy(image, seed, std):
    """`image` (uint8) with Gaussian noise of `std` (in [0, 1] units), as uint8."""
    noise = tf.random.stateless_normal(tf.shape(image), seed=tf.cast(seed, tf.int32), stddev=255.0 * std)
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32) + noise), 0.0, 255.0), tf.uint8)


@keras.saving.register_keras_serializable(package="tfxfer")
class Autoencoder(PretextModel):
    """Backbone encoder + a decoder that mirrors its downsampling; MSE loss."""

    def __init__(self, backbone, image_size, bn_momentum=None, **kwargs):
        super().__init__(backbone, image_size, bn_momentum, **kwargs)
        output = self.backbone.output.shape
        layers = []
        if len(output) == 2:
            side = max(self.image_size // 4, 1)
            layers += [keras.layers.Dense(side * side * 32, activation="relu", name="decoder_dense"),
                       keras.layers.Reshape((side, side, 32), name="decoder_reshape")]
            channels = 32
        else:
            side, channels = int(output[1]), int(output[-1])
        stages = max(0, round(math.log2(self.image_size / side)))
        for i in range(stages):
            channels = max(channels // 2, 16)
            layers += [
                keras.layers.UpSampling2D(2, name=f"decoder_up{i + 1}"),
                keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"decoder_conv{i + 1}"),
                keras.layers.BatchNormalization(momentum=0.9, name=f"decoder_bn{i + 1}"),
                keras.layers.ReLU(name=f"decoder_relu{i + 1}"),
            ]
        layers += [
            keras.layers.Resizing(self.image_size, self.image_size, name="decoder_fit"),
            keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", dtype="float32", name="decoder_rgb"),
        ]
        self.decoder = keras.Sequential(layers, name="decoder")
        self.decoder.build(self.backbone.output.shape)
        self._build_by_calling()

    def call(self, images, training=False):
        """Reconstructions in [0, 1] of uint8 `images`, or of the inputs of the
        `(inputs, targets)` pair that Keras's step passes as one input."""
        if isinstance(images, (tuple, list)):
            images = images[0]
        return self.decoder(self.backbone(self.preprocess(images), training=training), training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        target = tf.cast(x[1], tf.float32) / 255.0
        return tf.reduce_mean(tf.square(tf.cast(y_pred, tf.float32) - target))


class ReconstructionGrid(keras.callbacks.Callback):
    """Each epoch, a PNG in `folder`: inputs (top row) over reconstructions."""

    def __init__(self, folder, images, scale=4):
        super().__init__()
        self.folder, self.images, self.scale = folder, np.asarray(images), scale

    def on_epoch_end(self, epoch, logs=None):
        reconstructed = np.asarray(self.model(self.images, training=False), np.float32)
        rows = [self.images.astype(np.uint8), np.round(np.clip(reconstructed, 0, 1) * 255).astype(np.uint8)]
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
        grid = np.repeat(np.repeat(grid, self.scale, axis=0), self.scale, axis=1)
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"epoch_{epoch + 1:03d}.png")
        tf.io.write_file(path + ".tmp", tf.io.encode_png(grid))
        os.replace(path + ".tmp", path)


def _pairs(std, flip):
    """Per-example `(input, target)`: the (flipped) image, with noise on the input."""

    def pair(image, seed):
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=seeds[0])
        return (noisy(image, seeds[1], std) if std else image), image

    return pair


def _validation(val, config):
    return augment_batches(val, _pairs(config.pretext.denoise, flip=False), config.run.seed, rerandomize=False)


def _grid(model, run_dir, val, info, config):
    images = next(iter(val.unbatch().batch(8)))[0]
    return [ReconstructionGrid(os.path.join(run_dir, "reconstructions"), images)]


register_method(
    PretextMethod(
        name="autoencoder",
        build=lambda config, info, image_size: Autoencoder(
            config.model.backbone, image_size, config.model.bn_momentum, weights=config.model.weights
        ),
        augment=lambda config: _pairs(config.pretext.denoise, flip=True),
        validation=_validation,
        monitor=lambda info: ("val_loss", "min"),
        callbacks=_grid,
        settings=lambda config: {"denoise": config.pretext.denoise, "loss": "mse", "flip": True},
        options=AutoencoderOptions,
    )
)
