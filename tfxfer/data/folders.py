"""Image folders: one sub-folder per class, directly or under `train/` plus
`val/` (or `validation/`) and/or `test/`."""

import os

import numpy as np
import tensorflow as tf

from tfxfer.data.images import decode_image
from tfxfer.data.splits import Split
from tfxfer.errors import TfxferError

__all__ = ["image_folder", "decodable"]

VAL_FOLDERS = ("val", "validation")
UNLABELLED = "unlabelled"


def image_folder(data_dir):
    """`(splits, class names, skipped files)`; undecodable files are skipped and listed."""
    if not os.path.isdir(data_dir):
        raise TfxferError(f"Image folder {data_dir!r} does not exist; pass --data-dir with a folder of class sub-folders.")
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        train_dir = data_dir
    if _is_flat(train_dir):
        # Unlabelled images (for simclr and autoencoder pretraining): one class.
        skipped = []
        split = _scan_files([(train_dir, 0)], skipped, recurse=False)
        if not split.count:
            raise TfxferError(f"No readable images in {train_dir!r}.")
        return {"train": split}, [UNLABELLED], skipped
    class_names = _class_folders(train_dir)
    val_dir = next((os.path.join(data_dir, v) for v in VAL_FOLDERS if os.path.isdir(os.path.join(data_dir, v))), None)
    test_dir = os.path.join(data_dir, "test") if train_dir != data_dir else None

    skipped = []
    splits = {"train": _scan(train_dir, class_names, skipped, every_class=True)}
    if not splits["train"].count:
        raise TfxferError(f"No readable images under {train_dir!r}; it needs one sub-folder of images per class.")
    if val_dir:
        splits["val"] = _scan(val_dir, class_names, skipped)
    if test_dir and os.path.isdir(test_dir):
        splits["test"] = _scan(test_dir, class_names, skipped)
    return splits, class_names, skipped


def _class_folders(folder):
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if not names:
        raise TfxferError(f"Image folder {folder!r} has no class sub-folders; put each class's images in a sub-folder named after it.")
    return names


def _scan(folder, class_names, skipped, every_class=False):
    """The decodable images under `folder` as a `Split`; bad files go to `skipped`.
    With `every_class`, a class without a readable image is an error."""
    unknown = sorted(set(_class_folders(folder)) - set(class_names))
    if unknown:
        raise TfxferError(f"{folder!r} has class folders that train/ lacks: {', '.join(unknown)}.")
    folders = [(os.path.join(folder, name), label) for label, name in enumerate(class_names)]
    split = _scan_files([(d, label) for d, label in folders if os.path.isdir(d)], skipped)
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


def _scan_files(labelled_dirs, skipped, recurse=True):
    """The decodable images in `(folder, label)` pairs as a `Split`; bad files go to `skipped`."""
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
    good = decodable(paths)
    skipped.extend(os.fsdecode(p) for p in paths if p not in good)
    keep = [i for i, p in enumerate(paths) if p in good]
    return Split(len(keep), np.asarray([labels[i] for i in keep], np.int32), np.asarray([paths[i] for i in keep], dtype=object))


# Scans of more files than this show a progress bar.
PROGRESS_FILES = 5000


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

        progress = keras.utils.Progbar(len(paths), unit_name="file")
        print(f"checking {len(paths):,} image files")
    good = set()
    for batch in ds.batch(2048).as_numpy_iterator():
        good.update(batch.tolist())
        if progress:
            progress.add(len(batch))
    if progress:
        progress.update(len(paths), finalize=True)
    return good
