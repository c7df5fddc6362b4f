"""Image decoding and resizing shared by the data pipeline and the SavedModel.

Training batches and serving requests pass through these same two functions, so a
served image is resized exactly as the training images were.
"""

import tensorflow as tf

__all__ = ["decode_image", "to_rgb", "resize_uint8"]


def decode_image(data):
    """Decode JPEG, PNG, BMP or GIF bytes to a uint8 RGB tensor [H, W, 3].

    Grayscale becomes RGB; RGBA loses its alpha; an animated GIF gives its first
    frame.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def to_rgb(image):
    """Grayscale [..., 1] to RGB and RGBA [..., 4] to RGB, by the static channel count."""
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def resize_uint8(images, size):
    """Resize uint8 images ([H, W, 3] or [N, H, W, 3]) to `size`x`size`, uint8.

    Bilinear with antialiasing, then rounded: the model only ever sees the
    uint8 pixels a client could have sent.
    """
    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
