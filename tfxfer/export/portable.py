"""What the ONNX and LiteRT exports share: the model behind a uint8 input.

Their input is uint8 images [N, S, S, 3] already at the model's size S; the
backbone's preprocessing (scaling, mean and std) is inside. The resize is not:
the training pipeline resizes with antialiasing (`tfxfer.data.images`), which
is TF's `ScaleAndTranslate` op, and neither tf2onnx nor the LiteRT converter
has it (both refuse it: measured with tf2onnx 1.17 and TF 2.21). A plain
bilinear resize inside would serve different pixels from the ones the model
was trained on; resize with antialiasing (e.g. Pillow's `Image.resize` with
`BILINEAR` and `reducing_gap=None`) before calling the model.
"""

import keras
import numpy as np

__all__ = ["uint8_model", "INPUTS"]

INPUTS = "images: uint8 [N, S, S, 3] at the model's size S (resize with antialiasing first); probabilities out"


def uint8_model(model):
    """A functional Keras model from uint8 images [N, S, S, 3] to probabilities,
    called once (Keras's ONNX export needs a model that has run)."""
    size = int(model.image_size)
    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    wrapped = keras.Model(images, model(keras.ops.cast(images, "float32"), training=False), name="tfxfer_uint8")
    wrapped(np.zeros((1, size, size, 3), np.uint8))
    return wrapped
