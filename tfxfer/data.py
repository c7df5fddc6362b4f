"""`tf.data` pipelines over built-in data, `tensorflow-datasets` names and image folders.

Every source yields `(uint8 image [size, size, 3], int label)` after the same
decode and resize as the SavedModel (`tfxfer.images`), so train and serve agree.
`load_dataset` returns batched train, validation and test `tf.data.Dataset`s
(test may be `None`) and a `DatasetInfo`.
"""

import contextlib
import dataclasses
import os

import numpy as np
import tensorflow as tf

from tfxfer.errors import TfxferError, did_you_mean, is_network_failure
from tfxfer.images import decode_image, resize_uint8, to_rgb

__all__ = ["DatasetInfo", "load_dataset", "BUILTIN_DATASETS"]

AUTOTUNE = tf.data.AUTOTUNE
# Decoded uint8 images are cached in memory when they fit in this many bytes.
CACHE_BYTES = 4 * 2**30
# Uncached sources of large items (tfds records) shuffle through this many bytes.
SHUFFLE_BYTES = 2**30


@dataclasses.dataclass
class DatasetInfo:
    name: str
    class_names: list
    image_size: int
    num_examples: dict  # split -> count, for the splits that exist
    skipped_files: list = dataclasses.field(default_factory=list)

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclasses.dataclass
class _Split:
    """Unbatched examples of one split: (image, label) pairs, or (path, label) pairs."""

    examples: tf.data.Dataset
    count: int
    from_paths: bool = False
    small_items: bool = True  # cheap to hold all of them in a shuffle buffer


def load_dataset(
    name=None,
    data_dir=None,
    image_size=32,
    batch_size=64,
    val_fraction=0.1,
    seed=0,
    tfds_data_dir=None,
    train_split="train",
    val_split=None,
    test_split=None,
    max_train_examples=None,
    augment="none",
    cache=None,
):
    """Load a dataset as batched `tf.data` pipelines.

    Args:
        name: a built-in dataset (`"digits"`) or a `tensorflow-datasets` name.
        data_dir: an image folder instead of `name`: one sub-folder per class,
            either directly or under `train/` plus `val/` and/or `test/`.
        image_size: images are resized to `image_size`x`image_size`.
        batch_size: batch size of every split.
        val_fraction: share of train carved out, deterministically, as the
            validation split when the source has none.
        seed: seeds the split and the shuffling.
        tfds_data_dir: where prepared `tensorflow-datasets` data lives.
        train_split, val_split, test_split: tfds split names (slicing allowed);
            `None` picks "validation"/"test" when the dataset has them.
        max_train_examples: use only this many training examples, for quick
            runs: a seeded sample of a folder or built-in data, the first ones
            of a tfds split (already shuffled when tfds prepared it).
        augment: `"none"`, `"flip"` or `"flip_crop"`, applied to train only.
        cache: keep decoded images in memory; `None` decides by size.

    Returns:
        `(train, val, test, info)`; `test` is `None` when there is no test split.
    """
    if (name is None) == (data_dir is None):
        raise TfxferError("Give exactly one of a dataset name (--dataset) or an image folder (--data-dir).")
    if not 0.0 < val_fraction < 1.0:
        raise TfxferError(f"--val-fraction must be between 0 and 1, got {val_fraction}.")
    if augment not in AUGMENTATIONS:
        raise did_you_mean(augment, AUGMENTATIONS, "augmentation")
    if data_dir is not None:
        splits, class_names, skipped = _folder_splits(data_dir, val_fraction, seed)
        label = os.path.basename(os.path.normpath(data_dir))
    elif name in BUILTIN_DATASETS:
        splits, class_names = BUILTIN_DATASETS[name](val_fraction, seed)
        skipped, label = [], name
    else:
        splits, class_names = _tfds_splits(name, tfds_data_dir, train_split, val_split, test_split, val_fraction)
        skipped, label = [], name
    if max_train_examples:
        train = splits["train"]
        examples = train.examples
        if train.small_items:
            # One sample for the whole run, not a new one each epoch.
            examples = examples.shuffle(train.count, seed=seed, reshuffle_each_iteration=False)
        # tfds records are already shuffled when prepared: take the first ones.
        splits["train"] = dataclasses.replace(
            train, examples=examples.take(max_train_examples), count=min(max_train_examples, train.count)
        )

    info = DatasetInfo(label, class_names, image_size, {k: s.count for k, s in splits.items()}, skipped)
    pipelines = {
        key: _pipeline(split, image_size, batch_size, training=key == "train", seed=seed, augment=augment, cache=cache)
        for key, split in splits.items()
    }
    return pipelines["train"], pipelines["val"], pipelines.get("test"), info


def _pipeline(split, size, batch_size, training, seed, augment, cache):
    ds = split.examples
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
    ds = ds.map(lambda image, label: (resize_uint8(image, size), tf.cast(label, tf.int32)), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    if training and (cache or not split.small_items):
        # Resized images: the whole split when cached, else a buffer of bounded memory.
        buffer = split.count if cache else max(1, min(split.count, SHUFFLE_BYTES // image_bytes))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if training and augment != "none":
        ds = _augment(ds, size, seed, crop=augment == "flip_crop")
    return ds.batch(batch_size).prefetch(AUTOTUNE)


AUGMENTATIONS = ("none", "flip", "flip_crop")


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


# ---------------------------------------------------------------- built-in data


def _digits(val_fraction, seed):
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled and tiled to RGB."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.repeat((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=val_fraction, stratify=y_train, random_state=seed
    )
    splits = {
        key: _Split(tf.data.Dataset.from_tensor_slices((x, y)), len(y))
        for key, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    return splits, [str(i) for i in range(10)]


BUILTIN_DATASETS = {"digits": _digits}


# ---------------------------------------------------------------- image folders

VAL_FOLDERS = ("val", "validation")


def _folder_splits(data_dir, val_fraction, seed):
    if not os.path.isdir(data_dir):
        raise TfxferError(f"Image folder {data_dir!r} does not exist; pass --data-dir with a folder of class sub-folders.")
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        train_dir = data_dir
    class_names = _class_folders(train_dir)
    val_dir = next((os.path.join(data_dir, v) for v in VAL_FOLDERS if os.path.isdir(os.path.join(data_dir, v))), None)
    test_dir = os.path.join(data_dir, "test") if train_dir != data_dir else None

    skipped = []
    train_files = _scan(train_dir, class_names, skipped)
    if not train_files[0]:
        raise TfxferError(f"No readable images under {train_dir!r}; it needs one sub-folder of images per class.")
    splits = {}
    if val_dir:
        splits["train"] = _path_split(*train_files)
        splits["val"] = _path_split(*_scan(val_dir, class_names, skipped))
    else:
        (tr_paths, tr_labels), (va_paths, va_labels) = _carve(*train_files, val_fraction, seed)
        splits["train"] = _path_split(tr_paths, tr_labels)
        splits["val"] = _path_split(va_paths, va_labels)
    if test_dir and os.path.isdir(test_dir):
        splits["test"] = _path_split(*_scan(test_dir, class_names, skipped))
    return splits, class_names, skipped


def _class_folders(folder):
    names = sorted(
        d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")
    )
    if not names:
        raise TfxferError(f"Image folder {folder!r} has no class sub-folders; put each class's images in a sub-folder named after it.")
    return names


def _scan(folder, class_names, skipped):
    """Paths and labels of the decodable images under `folder`; bad files go to `skipped`."""
    unknown = sorted(set(_class_folders(folder)) - set(class_names))
    if unknown:
        raise TfxferError(f"{folder!r} has class folders that train/ lacks: {', '.join(unknown)}.")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue
        for root, dirs, files in os.walk(class_dir):
            dirs.sort()
            for f in sorted(files):
                if not f.startswith("."):
                    paths.append(os.path.join(root, f))
                    labels.append(label)
    good = _decodable(paths)
    skipped.extend(p for p in paths if p not in good)
    keep = [i for i, p in enumerate(paths) if p in good]
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _decodable(paths):
    """The subset of `paths` that decode as images, checked in parallel by tf.data."""
    if not paths:
        return set()
    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(lambda p: (p, tf.shape(decode_image(tf.io.read_file(p)))), num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors().batch(4096)
    return {p.decode() for batch, _ in ds.as_numpy_iterator() for p in batch}


def _carve(paths, labels, fraction, seed):
    """A deterministic, per-class split of `fraction` of the files."""
    rng = np.random.default_rng(seed)
    paths, labels = np.array(paths), np.array(labels)
    val = np.zeros(len(paths), bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val[rng.permutation(idx)[:n_val]] = True
    return (list(paths[~val]), list(labels[~val])), (list(paths[val]), list(labels[val]))


def _path_split(paths, labels):
    return _Split(tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32))), len(paths), True)


# ---------------------------------------------------------------- tensorflow-datasets


def _tfds_splits(name, data_dir, train_split, val_split, test_split, val_fraction):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise did_you_mean(name, list(BUILTIN_DATASETS) + tfds.list_builders(), "dataset") from None
    try:
        with _few_download_retries():
            builder.download_and_prepare()
    except Exception as e:
        if not is_network_failure(e):
            raise
        where = data_dir or "~/tensorflow_datasets"
        raise TfxferError(
            f"Could not download the tensorflow-datasets data for {name!r} into {where} (no network?); "
            "pass --tfds-data-dir with a folder where it is already prepared, or --data-dir with an image folder."
        ) from None
    image_key, label_key = _image_and_label(builder.info, name)
    class_names = list(builder.info.features[label_key].names)
    available = set(builder.info.splits.keys())

    if val_split is None and "validation" in available:
        val_split = "validation"
    if val_split is None:
        # Carve validation from the end of train with tfds's own slicing: the
        # same examples every time, disjoint from the training slice.
        keep = int(round(100 * (1 - val_fraction)))
        train_split, val_split = f"{train_split}[:{keep}%]", f"{train_split}[{keep}%:]"
    if test_split is None and "test" in available:
        test_split = "test"

    splits = {}
    for key, split in (("train", train_split), ("val", val_split), ("test", test_split)):
        if split is None:
            continue
        try:
            ds = builder.as_dataset(split=split, shuffle_files=False)
        except (KeyError, ValueError) as e:
            raise TfxferError(f"Split {split!r} of {name!r} is not valid ({e}); its splits are: {', '.join(sorted(available))}.") from None
        ds = ds.map(lambda ex: (to_rgb(ex[image_key]), ex[label_key]), num_parallel_calls=AUTOTUNE)
        splits[key] = _Split(ds, _count(builder, split, ds), small_items=False)
    return splits, class_names


def _count(builder, split, ds):
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        # Split metadata is missing (as in tfds's mock data): count by reading.
        return int(ds.reduce(0, lambda n, _: n + 1))


def _image_and_label(info, name):
    import tensorflow_datasets as tfds

    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        features = info.features
        image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    ok = (
        image_key in info.features
        and label_key in info.features
        and isinstance(info.features[image_key], tfds.features.Image)
        and isinstance(info.features[label_key], tfds.features.ClassLabel)
    )
    if not ok:
        raise TfxferError(f"tensorflow-datasets {name!r} has no image and class-label features; tfxfer needs an image-classification dataset.")
    return image_key, label_key


@contextlib.contextmanager
def _few_download_retries(retries=2):
    """tfds retries a refused connection 10 times with exponential backoff: about
    3.5 minutes (measured) before an offline user learns anything. Use fewer."""
    from tensorflow_datasets.core.download import downloader

    saved = getattr(downloader, "MAX_RETRIES", None)
    if saved is not None:
        downloader.MAX_RETRIES = min(saved, retries)
    try:
        yield
    finally:
        if saved is not None:
            downloader.MAX_RETRIES = saved
