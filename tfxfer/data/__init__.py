"""Data: sources (built-in digits, `tensorflow-datasets` names, image folders),
selection on labels, and the shared `tf.data` pipeline.

Every source yields `(uint8 image [size, size, 3], int32 label)` after the same
decode and resize as the SavedModel (`tfxfer.data.images`), so train and serve
agree. `load_dataset` returns batched train, validation and test pipelines
(test may be `None`) and a `DatasetInfo`.
"""

import dataclasses
import os
from typing import Optional

import numpy as np

from tfxfer.data.digits import digits
from tfxfer.data.folders import decodable_mask, image_folder
from tfxfer.data.augment import AUGMENTATIONS, parse_augment
from tfxfer.data.pipeline import build_pipeline
from tfxfer.data.splits import align_classes, carve, kfold, sample, sample_per_class, select_classes
from tfxfer.data.tables import csv_table, tfrecord_files
from tfxfer.data.images import FORMATS
from tfxfer.data.tfds import tfds_dataset
from tfxfer.config import expand_path
from tfxfer.errors import TfxferError

__all__ = ["AUGMENTATIONS", "BUILTIN_DATASETS", "DatasetInfo", "load_dataset", "load_splits"]

BUILTIN_DATASETS = {"digits": digits}


@dataclasses.dataclass
class DatasetInfo:
    name: str
    class_names: list
    image_size: int
    num_examples: dict  # split -> count, for the splits that exist
    skipped_files: list = dataclasses.field(default_factory=list)
    classes: Optional[list] = None  # the class subset asked for, if any
    labels_per_class: Optional[int] = None
    class_counts: Optional[list] = None  # training images per class, when the labels are known
    files: dict = dataclasses.field(default_factory=dict)  # split -> its image files in order, for file sources
    sources: dict = dataclasses.field(default_factory=dict)  # split -> where it came from: a folder, carved, a fold
    preflight: Optional[dict] = None  # the report of `tfxfer.preflight.check`, when it ran

    @property
    def num_classes(self):
        return len(self.class_names)


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
    classes=None,
    labels_per_class=None,
    folds=None,
    fold=0,
    count_classes=False,
    csv=None,
    tfrecord=None,
    tfrecord_keys=("image", "label"),
    tfds_manual_dir=None,
    check=None,
    csv_columns=("path", "label"),
    model_classes=None,
):
    """Load a dataset as batched `tf.data` pipelines.

    Args:
        name: a built-in dataset (`"digits"`) or a `tensorflow-datasets` name.
        data_dir: an image folder instead of `name`: one sub-folder per class,
            either directly or under `train/` plus `val/` and/or `test/`.
        image_size: images are resized to `image_size`x`image_size`.
        batch_size: batch size of every split.
        val_fraction: share of train carved out, per class and seeded, as the
            validation split when the source has none.
        seed: seeds the selection, the split and the shuffling.
        tfds_data_dir: where prepared `tensorflow-datasets` data lives.
        train_split, val_split, test_split: tfds split names (slicing allowed);
            `None` picks "validation"/"test" when the dataset has them.
        max_train_examples: use only this many training examples, for quick
            runs: a seeded sample (the first ones of an unread tfds split,
            which tfds shuffled when it prepared the data).
        augment: an `--augment` text (`tfxfer.data.augment`), or a function `fn(image, seed)`
            (see `tfxfer.data.pipeline.build_pipeline`), applied to train only.
        cache: keep decoded images in memory; `None` decides by size.
        classes: names of a subset of classes (list or comma-separated), in
            the order of the new labels; every split keeps only those.
        labels_per_class: a seeded, stratified sample of this many labelled
            training images per class, taken before validation is carved.
        folds, fold: validation is fold `fold` of a seeded, stratified
            `folds`-fold split of the (selected) training images; a source's
            own validation split is then not used.
        count_classes: read a tfds split's labels, if not read already, to
            fill `info.class_counts` (image folders and arrays always have it).
        csv: instead of `name` or `data_dir`, a CSV of path,label[,split] rows
            (`tfxfer.data.tables.csv_table`).
        tfrecord: instead, a glob (or `SPLIT=GLOB` pairs) of TFRecord files of
            `tf.train.Example`s; `tfrecord_keys` names their image and label
            features.
        csv_columns: the CSV's path and label columns.
        model_classes: the class names of an existing model, in its order
            (`load_splits`).
        check: a function `check(splits, info)` of the selected, unbatched
            splits, run before the pipelines are built; its result is `info.preflight`
            (`tfxfer.preflight.check`).

    Returns:
        `(train, val, test, info)`; `test` is `None` when there is no test split.
    """
    if not callable(augment):
        parse_augment(augment)
    splits, info = load_splits(
        name, data_dir, image_size, val_fraction, seed, tfds_data_dir, train_split, val_split, test_split,
        max_train_examples, classes, labels_per_class, folds, fold, count_classes, csv, tfrecord, tfrecord_keys,
        tfds_manual_dir, csv_columns=csv_columns, model_classes=model_classes,
    )
    if check is not None:
        info.preflight = check(splits, info)
    pipelines = {
        key: build_pipeline(split, image_size, batch_size, training=key == "train", seed=seed, augment=augment, cache=cache,
                            num_classes=info.num_classes)
        for key, split in splits.items()
    }
    return pipelines["train"], pipelines["val"], pipelines.get("test"), info


def load_splits(
    name=None, data_dir=None, image_size=32, val_fraction=0.1, seed=0, tfds_data_dir=None, train_split="train",
    val_split=None, test_split=None, max_train_examples=None, classes=None, labels_per_class=None, folds=None, fold=0,
    count_classes=False, csv=None, tfrecord=None, tfrecord_keys=("image", "label"), tfds_manual_dir=None,
    csv_columns=("path", "label"), model_classes=None,
):
    """The unbatched `Split`s after selection, and the `DatasetInfo`.

    Image files are decoded once, to skip the unreadable ones, after the
    selection picked them: a sample of a large folder checks only its files.
    An unreadable file the seeded sample picks is skipped and replaced by the
    next one of the same order.

    `model_classes`: the class names of an existing model, in its order. When
    the data has the same classes, its labels follow that order, before any
    selection, so a resumed or evaluated run keeps the class ids (and the
    seeded samples) it was trained with.
    """
    if sum(x is not None for x in (name, data_dir, csv, tfrecord)) != 1:
        raise TfxferError("Give exactly one of --dataset NAME, --data-dir FOLDER, --csv FILE or --tfrecord GLOB.")
    if not 0.0 < val_fraction < 1.0:
        raise TfxferError(f"--val-fraction must be between 0 and 1, got {val_fraction}.")
    data_dir, csv, tfrecord, tfds_data_dir, tfds_manual_dir = (
        None if path is None else expand_path(path) for path in (data_dir, csv, tfrecord, tfds_data_dir, tfds_manual_dir)
    )
    selecting = bool(classes) or labels_per_class is not None
    skipped, sources = [], {}
    if data_dir is not None:
        splits, class_names, sources = image_folder(data_dir)
        label = os.path.basename(os.path.normpath(data_dir))
    elif csv is not None:
        splits, class_names = csv_table(csv, *csv_columns)
        label = os.path.splitext(os.path.basename(csv))[0]
    elif tfrecord is not None:
        splits, class_names, skipped = tfrecord_files(tfrecord, *tfrecord_keys)
        label = "tfrecord"

    elif name in BUILTIN_DATASETS:
        splits, class_names = BUILTIN_DATASETS[name](seed)
        label = name
    else:
        splits, class_names = tfds_dataset(
            name, tfds_data_dir, train_split, val_split, test_split,
            slice_fraction=None if selecting or folds else val_fraction, known=BUILTIN_DATASETS,
            manual_dir=tfds_manual_dir,
        )
        label = name

    def readable(split):
        """`keep` of the seeded samples: whether the files at some indices decode."""
        return (lambda indices: decodable_mask(split.items[indices], skipped)) if split.unchecked else None

    def checked(split):
        if split is None or not split.unchecked:
            return split
        kept = split.subset(np.flatnonzero(decodable_mask(split.items, skipped)))
        return dataclasses.replace(kept, unchecked=False)

    if model_classes is not None:
        splits, class_names = align_classes(splits, class_names, model_classes)
    if classes:
        splits, class_names = select_classes(splits, class_names, classes)
    # The classes of the listed training files, for a class none of whose files decodes. A random
    # sample (--max-train-examples) may leave a class out by chance, so it is not held to them.
    listed = (set(splits["train"].labels.tolist()) if splits["train"].unchecked and not max_train_examples
              else set())
    if labels_per_class is not None:
        splits["train"] = sample_per_class(splits["train"], labels_per_class, seed, readable(splits["train"]))
    if not max_train_examples:
        # Every file listed is used: check them all before validation is carved, so it is carved from readable ones.
        splits = {key: checked(split) for key, split in splits.items()}
        lost = sorted(listed - set(splits["train"].labels.tolist())) if listed else []
        if lost:
            raise TfxferError(
                f"No training image of {', '.join(repr(class_names[c]) for c in lost)} in {label} could be decoded "
                f"({len(skipped)} files skipped); add readable images ({FORMATS}) or remove the class."
            )
    if folds:
        splits.pop("val", None)  # cross-validation is on train; a source's own validation split is left out
        splits["train"], splits["val"] = kfold(splits["train"], folds, fold, seed)
        sources["val"] = f"fold {fold} of {folds} of train"
    elif "val" not in splits:
        splits["train"], splits["val"] = carve(splits["train"], val_fraction, seed)
        sources["val"] = f"carved from train ({val_fraction:.0%} per class)"
    if max_train_examples:
        splits["train"] = sample(splits["train"], max_train_examples, seed, readable(splits["train"]))
        splits = {key: checked(split) for key, split in splits.items()}
    if not splits["train"].count:
        if skipped:
            raise TfxferError(f"No training image of {label} could be decoded ({len(skipped)} files skipped); it "
                              f"needs {FORMATS} images.")
        raise TfxferError(f"No training images are left in {label} after the selection; check --classes and --labels-per-class.")

    if count_classes and splits["train"].labels is None:
        splits["train"] = splits["train"].with_labels()
    counts = None
    if splits["train"].labels is not None:
        counts = np.bincount(splits["train"].labels, minlength=len(class_names)).tolist()
    info = DatasetInfo(
        label, list(class_names), image_size, {k: s.count for k, s in splits.items()}, skipped,
        classes=list(class_names) if classes else None, labels_per_class=labels_per_class, class_counts=counts,
        files={key: [os.fsdecode(p) for p in split.items] for key, split in splits.items() if split.from_paths},
        sources={key: sources[key] for key in ("train", "val", "test") if key in sources and key in splits},
    )
    return splits, info
