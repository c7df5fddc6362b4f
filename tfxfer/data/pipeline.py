"""The shared `tf.data` pipeline: decode, resize, cache, shuffle, augment, batch.

Every source's `Split` passes through `build_pipeline`, and every image through
the decode and resize of `tfxfer.data.images`, which the SavedModel uses too.
"""

import tensorflow as tf

from tfxfer.data.images import decode_image, resize_uint8

__all__ = ["AUGMENTATIONS", "build_pipeline"]

AUTOTUNE = tf.data.AUTOTUNE
AUGMENTATIONS = ("none", "flip", "flip_crop")
# Decoded uint8 images are cached in memory when they fit in this many bytes.
CACHE_BYTES = 4 * 2**30
# Uncached sources of large items (tfds records) shuffle through this many bytes.
SHUFFLE_BYTES = 2**30


def build_pipeline(split, size, batch_size, training, seed, augment="none", cache=None):
    """Batched `(uint8 [B, size, size, 3], int32 [B])` from a `Split`."""
    ds = split.examples()
    image_bytes = size * size * 3
    if cache is None:
        cache = split.count * image_bytes <= CACHE_BYTES
    if training and split.small_items and not cache:
        # Shuffle the small items (paths, 8x8 arrays) fully, before the decode.
        ds = ds.shuffle(split.count, seed=seed, reshuffle_each_iteration=True)
    if split.from_paths:
        ds = ds.map(lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=AUTOTUNE)
        # The folder scan already dropped undecodable files. No ignore_errors()
        # here: it would hide the epoch length from Keras's progress bar.
        ds = ds.map(lambda data, label: (decode_image(data), label), num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda image, label: (resize_uint8(image, size), label), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    if training and (cache or not split.small_items):
        # Resized images: the whole split when cached, else a buffer of bounded memory.
        buffer = split.count if cache else max(1, min(split.count, SHUFFLE_BYTES // image_bytes))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    if training and augment != "none":
        ds = _augment(ds, size, seed, crop=augment == "flip_crop")
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def _augment(ds, size, seed, crop):
    # Stateless ops with a seeded per-example seed stream: the same seed gives
    # the same augmentations whatever the parallelism.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def augment(example, pair):
        image, label = example
        pair = tf.cast(pair, tf.int32)
        image = tf.image.stateless_random_flip_left_right(image, seed=pair)
        if crop:
            pad = max(size // 8, 1)
            image = tf.image.resize_with_crop_or_pad(image, size + 2 * pad, size + 2 * pad)
            image = tf.image.stateless_random_crop(image, (size, size, 3), seed=pair[::-1])
        return image, label

    return tf.data.Dataset.zip((ds, seeds)).map(augment, num_parallel_calls=AUTOTUNE)
