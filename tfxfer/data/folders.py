"""Image folders: one sub-folder per class, directly or under a training folder
beside validation and/or test folders.

Split folders go by their common names, in any case: `train`/`training`,
`val`/`valid`/`validation`/`dev` and `test`/`testing` (Kaggle's `Train/` and
`Test/` among them). Files are listed here and decoded later, once the
selection has picked the ones used (`tfxfer.data.load_splits`)."""

import os
import sys

import numpy as np
import tensorflow as tf

from tfxfer.data.images import decode_image
from tfxfer.data.splits import SPLIT_NAMES, Split, class_order
from tfxfer.errors import TfxferError

__all__ = ["image_folder", "split_folders", "decodable", "decodable_mask"]

UNLABELLED = "unlabelled"
_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def image_folder(data_dir):
    """`(splits, class names, sources)` of the folder, its files not yet decoded
    (`Split.unchecked`); `sources` names each split's folder, e.g. `{"val": "valid/"}`."""
    if not os.path.isdir(data_dir):
        raise TfxferError(f"Image folder {data_dir!r} does not exist; pass --data-dir with a folder of class sub-folders.")
    found = split_folders(data_dir)
    if "train" in found:
        train_dir = os.path.join(data_dir, found["train"])
    elif found and len(found) == len(_subfolders(data_dir)):
        # Only split names: test/ and val/ are not classes, and there is nothing to train on.
        raise TfxferError(
            f"{data_dir!r} holds the split folder(s) {', '.join(f + '/' for f in found.values())} and no training "
            "folder; add train/ (or training/) with one sub-folder per class beside them."
        )
    else:
        train_dir, found = data_dir, {}
    if _is_flat(train_dir):
        # Unlabelled images (for simclr and autoencoder pretraining): one class.
        split = _list_files([(train_dir, 0)], recurse=False)
        if not split.count:
            raise TfxferError(f"No readable images in {train_dir!r}.")
        return {"train": split}, [UNLABELLED], {"train": found["train"] + "/"} if found else {}
    class_names = _class_folders(train_dir)
    splits = {"train": _scan(train_dir, class_names, found.get("train", "train"), every_class=True)}
    for key in ("val", "test"):
        if key in found:
            splits[key] = _scan(os.path.join(data_dir, found[key]), class_names, found.get("train"))
    return splits, class_names, {key: name + "/" for key, name in found.items()}


def split_folders(data_dir):
    """`{split: folder name}` of the split folders directly in `data_dir`, by
    their common names in any case; two folders for one split are an error."""
    found = {}
    for name in _subfolders(data_dir):
        split = SPLIT_NAMES.get(name.lower())
        if split is None:
            continue
        if split in found:
            raise TfxferError(
                f"{data_dir!r} has two {_SPLIT_WORDS[split]} folders, {found[split]}/ and {name}/; merge them into "
                "one or rename the other."
            )
        found[split] = name
    return found


def _subfolders(folder):
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _class_folders(folder):
    names = _subfolders(folder)
    if not names:
        raise TfxferError(f"Image folder {folder!r} has no class sub-folders; put each class's images in a sub-folder named after it.")
    return class_order(names)


def _scan(folder, class_names, train_name, every_class=False):
    """The image files under `folder` as an unchecked `Split`. With
    `every_class`, a class without a file is an error."""
    unknown = sorted(set(_class_folders(folder)) - set(class_names))
    if unknown:
        raise TfxferError(f"{folder!r} has class folders that {train_name}/ lacks: {', '.join(unknown)}.")
    folders = [(os.path.join(folder, name), label) for label, name in enumerate(class_names)]
    split = _list_files([(d, label) for d, label in folders if os.path.isdir(d)])
    if every_class:
        empty = [name for label, name in enumerate(class_names) if not np.any(split.labels == label)]
        if empty:
            raise TfxferError(
                f"Class folder(s) {', '.join(map(repr, empty))} under {folder!r} hold no readable images; "
                "add images or remove the folder."
            )
    return split


def _is_flat(folder):
    """Images directly in `folder`, no class sub-folders."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    return bool(entries) and not any(os.path.isdir(os.path.join(folder, e)) for e in entries)


def _list_files(labelled_dirs, recurse=True):
    """The files in `(folder, label)` pairs as an unchecked `Split`."""
    # Paths as bytes (os.fsencode): a file name that is not UTF-8 still reads.
    # os.walk does not follow symlinked folders, so a symlink loop ends.
    paths, labels = [], []
    for class_dir, label in labelled_dirs:
        for root, dirs, files in os.walk(os.fsencode(class_dir)):
            dirs.sort()
            if not recurse:
                dirs.clear()
            for f in sorted(files):
                if not f.startswith(b"."):
                    paths.append(os.path.join(root, f))
                    labels.append(label)
    return Split(len(paths), np.asarray(labels, np.int32), np.asarray(paths, dtype=object), unchecked=True)


# Scans of more files than this show a progress bar.
PROGRESS_FILES = 5000


def decodable_mask(paths, skipped):
    """A bool per path (bytes): whether the file decodes as an image; the
    others are added to `skipped`."""
    good = decodable(list(paths))
    mask = np.array([p in good for p in paths], bool)
    skipped.extend(os.fsdecode(p) for p, ok in zip(paths, mask) if not ok)
    return mask


def decodable(paths):
    """The subset of `paths` (bytes) that decode as images, checked in parallel by tf.data."""
    if not paths:
        return set()
    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(lambda p: (p, tf.shape(decode_image(tf.io.read_file(p)))), num_parallel_calls=tf.data.AUTOTUNE)
    # The bar counts the readable files as they pass; it completes at the end.
    ds = ds.map(lambda p, shape: p).ignore_errors()
    progress = None
    if len(paths) > PROGRESS_FILES:
        import keras

        # Keras draws its bar with colour codes and carriage returns; a log file gets one plain line.
        progress = keras.utils.Progbar(len(paths), unit_name="file", verbose=1 if sys.stdout.isatty() else 2)
        print(f"checking {len(paths):,} image files")
    good = set()
    for batch in ds.batch(2048).as_numpy_iterator():
        good.update(batch.tolist())
        if progress:
            progress.add(len(batch))
    if progress:
        progress.update(len(paths), finalize=True)
    return good
