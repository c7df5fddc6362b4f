"""Image decoding and resizing shared by the data pipeline and the SavedModel.

Training batches and serving requests pass through these same two functions, so a
served image is resized exactly as the training images were.
"""

import tensorflow as tf

__all__ = ["FORMATS", "decode_image", "exif_orientation", "orient", "not_an_image", "to_rgb", "resize_uint8"]

# What `decode_image` reads (TensorFlow's decoders).
FORMATS = "JPEG, PNG, BMP, GIF or WebP"
# Formats people have that TensorFlow cannot decode: (name, leading bytes).
_UNREAD = (("TIFF", (b"II*\x00", b"MM\x00*")), ("HEIC", (b"ftypheic", b"ftypheix", b"ftypmif1")))


def not_an_image(path, data):
    """The sentence for bytes `decode_image` refused: the format by name when known."""
    head = bytes(data[:12])
    for name, signatures in _UNREAD:
        if any(head.startswith(sig) or head[4:].startswith(sig) for sig in signatures):
            return f"{path} is a {name} image, which TensorFlow cannot decode; convert it to PNG or JPEG."
    return f"{path} is not an image ({FORMATS})."


def decode_image(data):
    """Decode JPEG, PNG, BMP, GIF or WebP bytes to a uint8 RGB tensor [H, W, 3].

    Grayscale becomes RGB; RGBA loses its alpha; an animated GIF gives its first
    frame. A JPEG is turned upright by its EXIF orientation, as photo viewers
    show it: a phone stores a portrait photo as landscape pixels plus that tag.
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = orient(image, exif_orientation(data))
    image.set_shape([None, None, 3])
    return image


# IFD entries of the EXIF block's first directory that are searched for the tag.
_MAX_EXIF_ENTRIES = 64
_ORIENTATION_TAG = 0x0112


def exif_orientation(data):
    """The EXIF orientation (1-8) of JPEG bytes, in TensorFlow ops; 1 when there is none.

    The APP1 segment holds `Exif\\0\\0` and a TIFF header (byte order, the
    offset of the first directory); the directory's 12-byte entries are
    searched for tag 0x0112, whose SHORT value is the orientation.
    """
    head = tf.strings.substr(data, 0, 65536)
    parts = tf.strings.split(head, "Exif\x00\x00", maxsplit=1)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
    found = tf.logical_and(is_jpeg, tf.size(parts) == 2)

    def parse():
        raw = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int32)
        n = tf.size(raw)
        tiff = tf.strings.length(parts[0]) + 6
        little = tf.equal(tf.strings.substr(head, tiff, 2), b"II")

        def byte(i):
            return tf.gather(raw, tf.clip_by_value(i, 0, n - 1))

        def u16(i):
            return tf.where(little, byte(i) + 256 * byte(i + 1), 256 * byte(i) + byte(i + 1))

        def u32(i):
            return tf.where(little, u16(i) + 65536 * u16(i + 2), 65536 * u16(i) + u16(i + 2))

        directory = tiff + u32(tiff + 4)
        count = u16(directory)
        entries = directory + 2 + 12 * tf.range(_MAX_EXIF_ENTRIES)
        match = (tf.range(_MAX_EXIF_ENTRIES) < count) & (u16(entries) == _ORIENTATION_TAG) & (entries + 10 <= n)
        value = tf.reduce_max(tf.where(match, u16(entries + 8), 0))
        return tf.where((value >= 1) & (value <= 8), value, 1)

    return tf.cond(found, parse, lambda: tf.constant(1, tf.int32))


def orient(image, orientation):
    """`image` [H, W, C] turned upright by an EXIF `orientation` (1-8)."""
    branches = [
        lambda: image,                                             # 1: upright
        lambda: tf.reverse(image, [1]),                            # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),                         # 3: upside down
        lambda: tf.reverse(image, [0]),                            # 4: mirrored vertically
        lambda: _transpose(image),                                 # 5: transposed
        lambda: tf.reverse(_transpose(image), [1]),                # 6: needs 90 degrees clockwise
        lambda: tf.reverse(_transpose(image), [0, 1]),             # 7: transversed
        lambda: _transpose(tf.reverse(image, [1])),                # 8: needs 90 degrees counter-clockwise
    ]
    return tf.switch_case(tf.clip_by_value(orientation - 1, 0, 7), branches)


def _transpose(image):
    """[H, W, C] to [W, H, C] by a gather of the pixels, not a Transpose op.

    oneDNN has no uint8 Transpose: a graph holding one makes TensorFlow log an
    error-level line ("oneDNN supports DT_UINT8 only ...") in every process that
    decodes images, and Grappler moves a Transpose of a float32 copy back onto
    the uint8 tensor."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    order = tf.reshape(tf.range(height)[None, :] * width + tf.range(width)[:, None], [-1])
    pixels = tf.gather(tf.reshape(image, [height * width, -1]), order)
    return tf.reshape(pixels, [width, height, shape[2]])


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
