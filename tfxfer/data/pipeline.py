"""The shared `tf.data` pipeline: decode, resize, cache, shuffle, augment, batch.

Every source's `Split` passes through `build_pipeline`, and every image through
the decode and resize of `tfxfer.data.images`, which the SavedModel uses too.
"""

import tensorflow as tf

from tfxfer.data.augment import AUGMENTATIONS, Augmenter, parse_augment
from tfxfer.data.images import decode_image, resize_uint8

__all__ = ["AUGMENTATIONS", "build_pipeline", "epoch_passes", "prefetched", "set_epoch", "augment_examples", "augment_batches"]

AUTOTUNE = tf.data.AUTOTUNE
# Decoded uint8 images are cached in memory when they fit in this many bytes.
CACHE_BYTES = 4 * 2**30
# Uncached sources of large items (tfds records) shuffle through this many bytes.
SHUFFLE_BYTES = 2**30


def build_pipeline(split, size, batch_size, training, seed, augment="none", cache=None, num_classes=None):
    """Batched `(uint8 [B, size, size, 3], labels)` from a `Split`: labels are
    int32 [B], or float32 class probabilities [B, num_classes] after mixup or
    cutmix.

    `augment` (training only) is an `--augment` text (`tfxfer.data.augment`)
    or a function `fn(image, seed) -> image` (or a tuple of images) given a
    stateless seed pair per example, as pretext methods need.

    A training pipeline's order and augmentations are functions of `seed` and
    the pass (epoch) number, which `set_epoch` sets: a resumed run sees exactly
    the batches the unbroken run would have seen."""
    image_bytes = size * size * 3
    if cache is None:
        cache = split.count * image_bytes <= CACHE_BYTES

    def decoded(ds):
        if split.from_paths:
            ds = ds.map(lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=AUTOTUNE)
            # The folder scan already dropped undecodable files. No ignore_errors()
            # here: it would hide the epoch length from Keras's progress bar.
            ds = ds.map(lambda data, label: (decode_image(data), label), num_parallel_calls=AUTOTUNE)
        return ds.map(lambda image, label: (resize_uint8(image, size), label), num_parallel_calls=AUTOTUNE)

    if not training:
        ds = decoded(split.examples())
        return (ds.cache() if cache else ds).batch(batch_size).prefetch(AUTOTUNE)
    if split.small_items and not cache:
        # Shuffle the small items (paths, 8x8 arrays) fully, before the decode.
        source, buffer, after_shuffle = split.examples(), split.count, decoded
    else:
        # Resized images: the whole split when cached, else a buffer of bounded memory.
        source = decoded(split.examples())
        source = source.cache() if cache else source
        buffer = split.count if cache else min(split.count, SHUFFLE_BYTES // image_bytes)
        after_shuffle = None
    per_example = augment if callable(augment) else None
    augmenter = None
    if not callable(augment) and parse_augment(augment):
        augmenter = Augmenter(augment, size, num_classes)

    def one_pass(pass_seed):
        ds = source.shuffle(max(buffer, 1), seed=pass_seed)
        ds = after_shuffle(ds) if after_shuffle else ds
        if per_example is not None:
            ds = ds.enumerate().map(
                lambda i, example: (per_example(example[0], tf.stack([pass_seed, i])), example[1]), num_parallel_calls=AUTOTUNE
            )
        return augmenter.apply(ds, batch_size, pass_seed) if augmenter else ds.batch(batch_size)

    passes = epoch_passes(one_pass, -(-split.count // batch_size), seed)
    return prefetched(passes, augmenter.options() if augmenter else None)


def epoch_passes(one_pass, count, seed):
    """A dataset whose every pass (iterator) is `one_pass(pass seed)`, `count`
    elements long. The pass seed comes from `seed` and a pass counter that each
    new iterator reads and advances; `set_epoch` sets it."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")

    def next_pass(_):
        # tf.data takes a tensor seed, but TF's get_seed compares it with 0 in
        # Python when the global seed is 0; a graph seed of None skips that, and
        # the op seed (this tensor) still fixes the order.
        tf.compat.v1.get_default_graph().seed = None
        epoch = counter.assign_add(1) - 1
        return one_pass(tf.constant(seed, tf.int64) * PASS_STRIDE + epoch)

    ds = tf.data.Dataset.from_tensors(0).flat_map(next_pass)
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    ds._tfxfer_epoch = counter
    return ds


def prefetched(passes, options=None):
    """`passes` (of `epoch_passes`) prefetched, with `options`; `set_epoch` still works."""
    ds = (passes.with_options(options) if options else passes).prefetch(AUTOTUNE)
    ds._tfxfer_epoch = passes._tfxfer_epoch
    return ds


# Pass seeds of neighbouring run seeds never meet: seed * PASS_STRIDE + epoch.
PASS_STRIDE = 1_000_003


def set_epoch(dataset, epoch):
    """Make the next pass over a training pipeline epoch `epoch`'s (0-based)
    order and augmentations, as PyTorch's `DistributedSampler.set_epoch`.
    `dataset` is a training pipeline of `build_pipeline`, `epoch_passes` or
    `prefetched`."""
    counter = getattr(dataset, "_tfxfer_epoch", None)
    if counter is None:
        raise ValueError("set_epoch() needs a training pipeline of tfxfer.data (build_pipeline, epoch_passes or prefetched).")
    counter.assign(epoch)


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
