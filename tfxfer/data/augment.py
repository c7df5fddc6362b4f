"""The augmentation menu, from Keras 3's own preprocessing layers, run in the
`tf.data` pipeline (never in the exported model).

`--augment flip,crop,rotate:15,zoom:0.1,color:0.2,randaugment,mixup:0.2,cutmix:1`
(`parse_augment`). Per-image layers run on each image, in one
tf.data thread, so their seed generators are drawn in a fixed order; mixup
and cutmix mix the images of a batch and make its labels class
probabilities. Before each epoch every generator is set from the run's seed
and the epoch, so epoch e's augmentations are the same in a resumed run.
"""

import math

import keras
import tensorflow as tf

from tfxfer.errors import TfxferError, did_you_mean

__all__ = ["AUGMENTATIONS", "Augmenter", "DEFAULTS", "parse_augment"]

# The names `--augment` takes, as a comma-separated list of NAME[:VALUE].
AUGMENTATIONS = ("none", "flip", "crop", "flip_crop", "rotate", "zoom", "color", "randaugment", "mixup", "cutmix")

# The value of an item given without one: degrees, zoom share, jitter strength, Beta alpha.
DEFAULTS = {"crop": 0.125, "rotate": 15.0, "zoom": 0.1, "color": 0.2, "randaugment": 0.5, "mixup": 0.2, "cutmix": 1.0}
MIXING = ("mixup", "cutmix")


def parse_augment(text):
    """`[(name, value or None), ...]` of an `--augment` text; `[]` for none.
    `flip_crop` is `flip,crop`. A name is checked against `AUGMENTATIONS`."""
    items = []
    for item in str(text or "none").replace(" ", "").split(","):
        name, _, value = item.partition(":")
        if name not in AUGMENTATIONS:
            raise did_you_mean(name, AUGMENTATIONS, "augmentation")
        if name == "none":
            continue
        if name == "flip_crop":
            items += [("flip", None), ("crop", None)]
            continue
        number = None
        if value:
            try:
                number = float(value)
            except ValueError:
                raise TfxferError(f"--augment {name}:{value}: the value must be a number.") from None
            if not number > 0 or math.isinf(number):
                raise TfxferError(f"--augment {name}:{value}: the value must be above 0.")
        items.append((name, number))
    return items


class Augmenter:
    """The Keras layers of an `--augment` text, for images of `size` px."""

    def __init__(self, text, size, num_classes):
        # The layers work on pixels in the tf.data pipeline, in float32 whatever
        # precision the model trains in (Keras's layers take the global policy).
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            self._build(text, size, num_classes)
        finally:
            keras.config.set_dtype_policy(previous)

    def _build(self, text, size, num_classes):
        self.size, self.num_classes = size, num_classes
        self.items = parse_augment(text)
        self.per_image, self.mixing, self.crop_pad = [], [], 0
        for name, value in self.items:
            value = DEFAULTS.get(name) if value is None else value
            if name == "flip":
                self.per_image.append(keras.layers.RandomFlip("horizontal"))
            elif name == "crop":
                # Pad by a share of the size, then crop back at random: CIFAR's classic 4 px at 32 px.
                self.crop_pad = max(1, round(value * size))
                self.per_image.append(keras.layers.RandomCrop(size, size))
            elif name == "rotate":
                self.per_image.append(keras.layers.RandomRotation(value / 360.0, fill_mode="reflect"))
            elif name == "zoom":
                self.per_image.append(keras.layers.RandomZoom(value, value, fill_mode="reflect"))
            elif name == "color":
                self.per_image.append(keras.layers.RandomColorJitter(
                    value_range=(0, 255), brightness_factor=value, contrast_factor=value, saturation_factor=(0.5 - value / 2, 0.5 + value / 2),
                    hue_factor=value / 4,
                ))
            elif name == "randaugment":
                self.per_image.append(keras.layers.RandAugment(value_range=(0, 255), factor=value))
            elif name == "mixup":
                self.mixing.append(keras.layers.MixUp(alpha=value))
            elif name == "cutmix":
                self.mixing.append(keras.layers.CutMix(factor=value))
        self.generators = [
            v for layer in self.per_image + self.mixing for v in layer.non_trainable_variables
            if v.path.endswith("seed_generator_state")
        ]

    @property
    def makes_soft_labels(self):
        return bool(self.mixing)

    def reseed(self, pass_seed):
        """Set every generator from the pass seed (seed and epoch); returns a
        tensor to depend on."""
        assigned = [
            state.assign(tf.cast(tf.stack([pass_seed % 2**31, tf.constant(i, tf.int64)]), state.dtype))
            for i, state in enumerate(self.generators)
        ]
        with tf.control_dependencies(assigned):
            return tf.constant(0, tf.int64)

    def _first_reseeds(self, index, pass_seed):
        # Inside the first element's own function, not as a side effect of the
        # pass: tf.data drops control inputs that cross dataset ops when it
        # rewrites the graph (as it does under op determinism).
        return tf.cond(tf.equal(index, 0), lambda: self.reseed(pass_seed), lambda: tf.constant(0, tf.int64))

    def image(self, image, label):
        """The per-image layers on one uint8 image [S, S, 3]."""
        x = tf.cast(image, tf.float32)
        if self.crop_pad:
            x = tf.image.resize_with_crop_or_pad(x, self.size + 2 * self.crop_pad, self.size + 2 * self.crop_pad)
        for layer in self.per_image:
            x = layer(x, training=True)
        return _to_uint8(x), label

    def batch(self, images, labels):
        """Mixup and cutmix on a batch: labels become class probabilities [B, C]."""
        data = {"images": tf.cast(images, tf.float32), "labels": tf.one_hot(tf.cast(labels, tf.int32), self.num_classes)}
        for layer in self.mixing:
            data = layer(data, training=True)
        return _to_uint8(data["images"]), tf.cast(data["labels"], tf.float32)

    def apply(self, examples, batch_size, pass_seed):
        """Batched, augmented `(images, labels)` of one pass over `examples`;
        the generators are set from `pass_seed` before the first draw."""

        def first_then(fn):
            def step(index, example):
                with tf.control_dependencies([self._first_reseeds(index, pass_seed)]):
                    return fn(*example)

            return step

        if not self.per_image:
            return examples.batch(batch_size).enumerate().map(first_then(self.batch))
        # One thread (no num_parallel_calls): a fixed order of draws.
        batches = examples.enumerate().map(first_then(self.image)).batch(batch_size)
        return batches.map(self.batch) if self.mixing else batches

    def options(self):
        """Options for the pipeline around the passes: tf.data's map-and-batch
        fusion fails on this map -> batch -> map (TF 2.21: "can't delete
        node(s) with retained fanouts")."""
        options = tf.data.Options()
        if self.per_image and self.mixing:
            options.experimental_optimization.map_and_batch_fusion = False
        return options


def _to_uint8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
