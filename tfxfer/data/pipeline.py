"""The shared `tf.data` pipeline: decode, resize, cache, shuffle, augment, batch.

Every source's `Split` passes through `build_pipeline`, and every image through
the decode and resize of `tfxfer.data.images`, which the SavedModel uses too.
"""

import tensorflow as tf

from tfxfer.data.images import decode_image, resize_uint8

__all__ = ["AUGMENTATIONS", "build_pipeline", "augment_examples", "augment_batches", "flip_crop"]

AUTOTUNE = tf.data.AUTOTUNE
AUGMENTATIONS = ("none", "flip", "flip_crop")
# Decoded uint8 images are cached in memory when they fit in this many bytes.
CACHE_BYTES = 4 * 2**30
# Uncached sources of large items (tfds records) shuffle through this many bytes.
SHUFFLE_BYTES = 2**30


def build_pipeline(split, size, batch_size, training, seed, augment="none", cache=None):
    """Batched `(uint8 [B, size, size, 3], int32 [B])` from a `Split`.

    `augment` (training only) is a name of `AUGMENTATIONS` or a function
    `fn(image, seed) -> image` (or a tuple of images) given a seed pair per
    example, as pretext methods need."""
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
        fn = augment if callable(augment) else flip_crop(size, crop=augment == "flip_crop")
        ds = augment_examples(ds, fn, seed)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def augment_examples(ds, fn, seed, rerandomize=True):
    """`(fn(image, seed pair), label)` for each `(image, label)` of `ds`.

    Stateless ops with a seeded stream of seed pairs: the same seed gives the
    same augmentations whatever the parallelism; `rerandomize=False` gives the
    same ones every epoch (fixed validation views)."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=rerandomize).batch(2)

    def apply(example, pair):
        image, label = example
        return fn(image, pair), label

    return tf.data.Dataset.zip((ds, seeds)).map(apply, num_parallel_calls=AUTOTUNE)


def augment_batches(batched, fn, seed, rerandomize=True):
    """`augment_examples` on a batched dataset, batched the same way again (its
    length stays known, so Keras's progress bar and validation need no guess)."""
    batch_size = batched.element_spec[0].shape[0]
    batches = batched.cardinality()
    ds = augment_examples(batched.unbatch(), fn, seed, rerandomize).batch(batch_size or 64)
    return ds.apply(tf.data.experimental.assert_cardinality(batches)) if batches >= 0 else ds


def flip_crop(size, crop=True):
    """Random horizontal flip and, with `crop`, pad-and-crop by size/8."""

    def augment(image, pair):
        pair = tf.cast(pair, tf.int32)
        image = tf.image.stateless_random_flip_left_right(image, seed=pair)
        if crop:
            pad = max(size // 8, 1)
            image = tf.image.resize_with_crop_or_pad(image, size + 2 * pad, size + 2 * pad)
            image = tf.image.stateless_random_crop(image, (size, size, 3), seed=pair[::-1])
        return image

    return augment
