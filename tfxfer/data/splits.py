"""One split's examples before decoding, and the selections made on them.

Every source gives `Split`s. Selection happens here, on labels, before any image
is decoded, in the order `load_dataset` applies it:

1. `select_classes`: a subset of the classes, relabelled 0..K-1 (`--classes`);
2. `sample_per_class`: N labelled training images per class, seeded (`--labels-per-class`);
3. `carve`: validation carved from train, per class, when the source has none,
   or `kfold`: validation is one fold of a stratified K-fold split of train;
4. `sample`: a seeded sample of train (`--max-train-examples`).

Nothing is copied: folder splits keep file paths, tfds splits keep the positions
of the records they use. File splits are decoded for the first time once the
selection is made (`unchecked`), so a sample of a large folder checks only the
files it uses.
"""

import dataclasses
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from tfxfer.errors import TfxferError, did_you_mean

__all__ = ["Split", "SPLIT_NAMES", "class_order", "select_classes", "align_classes", "sample_per_class", "carve",
           "kfold", "sample"]

# The names a split goes by, in folders, a CSV's split column and --tfrecord SPLIT=GLOB, and the split each means.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test", "testing": "test"}

_INTEGER = re.compile(r"[+-]?[0-9]+")


def class_order(names):
    """Class names in label order: as numbers when every name is an integer
    (`1, 2, 10`), else as text. A label's class id is its place here."""
    names = list(names)
    if names and all(_INTEGER.fullmatch(name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


@dataclasses.dataclass
class Split:
    """Examples of one split: either indexable `items` (file paths or uint8
    images) with their `labels`, or tfds `records` of (image, label).

    For records, `positions` are the record indices kept (sorted) and `labels`
    their labels, both known only once the labels were read (`read_labels`);
    `label_map` maps a record's label to the label used (-1: not used), and
    `limit` keeps only the first records when nothing was read.

    `unchecked` file paths have not been decoded yet (`tfxfer.data.load_splits`
    checks the ones it uses).
    """

    count: int
    labels: Optional[np.ndarray] = None
    items: Optional[np.ndarray] = None
    records: Optional[tf.data.Dataset] = None
    read_labels: Optional[object] = None  # records: a callable returning every record's label
    positions: Optional[np.ndarray] = None
    label_map: Optional[np.ndarray] = None
    limit: Optional[int] = None
    unchecked: bool = False

    @property
    def from_paths(self):
        return self.items is not None and self.items.dtype.kind in "USO"

    @property
    def small_items(self):
        """Paths and small arrays fit in a full shuffle buffer; records may not."""
        return self.records is None

    def with_labels(self):
        """This split with `labels` known (reads a record split's labels once)."""
        if self.labels is not None:
            return self
        labels = np.asarray(self.read_labels(), np.int64)
        positions = np.arange(len(labels))
        if self.limit is not None:
            positions, labels = positions[: self.limit], labels[: self.limit]
        mapped = labels if self.label_map is None else self.label_map[labels]
        return dataclasses.replace(self, labels=mapped.astype(np.int32), positions=positions, count=len(positions), limit=None)

    def subset(self, indices):
        """The examples at `indices` (into this split's order), order kept."""
        indices = np.sort(np.asarray(indices, np.int64))
        split = self.with_labels()
        if split.items is not None:
            return dataclasses.replace(split, items=split.items[indices], labels=split.labels[indices], count=len(indices))
        return dataclasses.replace(split, positions=split.positions[indices], labels=split.labels[indices], count=len(indices))

    def examples(self):
        """A `tf.data.Dataset` of (path or image, int32 label) pairs."""
        if self.items is not None:
            return tf.data.Dataset.from_tensor_slices((self.items, self.labels.astype(np.int32)))
        ds = self.records
        if self.positions is not None:
            keep = np.zeros(int(self.positions.max()) + 1 if len(self.positions) else 0, bool)
            keep[self.positions] = True
            mask = tf.constant(keep)
            ds = ds.take(len(keep)).enumerate().filter(lambda i, _: tf.gather(mask, i)).map(lambda _, record: record)
            # A filter hides the length; Keras's progress bar needs it.
            ds = ds.apply(tf.data.experimental.assert_cardinality(self.count))
        elif self.limit is not None:
            ds = ds.take(self.limit)
        if self.label_map is not None:
            table = tf.constant(self.label_map, tf.int32)
            ds = ds.map(lambda image, label: (image, tf.gather(table, tf.cast(label, tf.int32))))
        return ds.map(lambda image, label: (image, tf.cast(label, tf.int32)))


def select_classes(splits, class_names, wanted):
    """Keep only the classes named in `wanted` (in that order) in every split.

    Returns `(splits, class_names)`; labels become indices into `wanted`.
    """
    wanted = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted) if w.strip()]
    for name in wanted:
        if name not in class_names:
            raise did_you_mean(name, class_names, "class")
    if len(set(wanted)) != len(wanted) or len(wanted) < 2:
        raise TfxferError(f"--classes needs at least two different class names, got {','.join(wanted)!r}.")
    label_map = np.full(len(class_names), -1, np.int64)
    for new, name in enumerate(wanted):
        label_map[class_names.index(name)] = new
    selected = {}
    for key, split in splits.items():
        if split is None:
            continue
        # Records keep their source labels: a map from an earlier selection (a model's class
        # order, then --classes) is composed with this one, not replaced by it.
        source_map = label_map if split.label_map is None else np.where(
            split.label_map >= 0, label_map[np.maximum(split.label_map, 0)], -1)
        if split.records is not None and split.labels is not None:
            # Labels already read (TFRecord files): map them.
            split = dataclasses.replace(split, label_map=source_map, labels=label_map[split.labels].astype(np.int32))
        elif split.records is not None:
            # Read (again) with the map applied.
            split = dataclasses.replace(split, label_map=source_map, labels=None, positions=None).with_labels()
        else:
            split = dataclasses.replace(split, labels=label_map[split.labels].astype(np.int32))
        selected[key] = split.subset(np.flatnonzero(split.labels >= 0))
    return selected, wanted


def align_classes(splits, class_names, stored):
    """`(splits, stored)` with labels that follow `stored`, the class order of an
    existing model, when the data has the same classes in another order; else
    `(splits, class_names)` as they are, for the caller to compare."""
    if list(class_names) == list(stored) or sorted(class_names) != sorted(stored):
        return splits, class_names
    return select_classes(splits, class_names, list(stored))


def sample_per_class(split, per_class, seed, keep=None):
    """A seeded, stratified sample of `per_class` examples of each class (all
    of a class that has fewer). With `keep` (see `sample`), the examples it
    refuses are passed over for the next ones of their class."""
    if per_class < 1:
        raise TfxferError(f"--labels-per-class must be at least 1, got {per_class}.")
    split = split.with_labels()
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(split.labels == c)) for c in np.unique(split.labels)]
    chosen = split.subset(np.concatenate(_first_kept(orders, per_class, keep)))
    return dataclasses.replace(chosen, unchecked=False) if keep else chosen


def carve(split, fraction, seed):
    """`(train, val)`: a seeded, per-class share `fraction` of `split` as validation."""
    split = split.with_labels()
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == label)
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val.append(rng.permutation(idx)[:n_val])
    val = np.concatenate(val) if val else np.array([], np.int64)
    train = np.setdiff1d(np.arange(split.count), val)
    return split.subset(train), split.subset(val)


def kfold(split, folds, fold, seed):
    """`(train, val)`: val is fold `fold` of a seeded, stratified `folds`-fold
    split: each class's examples, shuffled, are dealt into `folds` near-equal
    parts, so the K validation sets are disjoint and cover every example once."""
    split = split.with_labels()
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == label)
        if len(idx) < folds:
            raise TfxferError(
                f"Class {label} has {len(idx)} labelled training images, fewer than --folds {folds}; use fewer folds."
            )
        val.append(np.array_split(rng.permutation(idx), folds)[fold])
    val = np.concatenate(val)
    return split.subset(np.setdiff1d(np.arange(split.count), val)), split.subset(val)


def sample(split, count, seed, keep=None):
    """A seeded sample of `count` examples; for unread records, the first `count`
    (tfds shuffles records when it prepares a dataset).

    `keep(indices)` gives a bool per index: whether that example is usable (its
    file decodes). The ones it refuses are replaced by the next ones of the
    same seeded order, so the sample does not depend on which other files are bad."""
    if count >= split.count:
        return split
    if split.labels is None:
        return dataclasses.replace(split, limit=count, count=count)
    order = np.random.default_rng(seed).permutation(split.count)
    chosen = split.subset(_first_kept([order], count, keep)[0])
    return dataclasses.replace(chosen, unchecked=False) if keep else chosen


def _first_kept(orders, count, keep):
    """The first `count` indices of each of `orders` that `keep` accepts, asking
    `keep` about as few indices as it can, for all orders at once."""
    if keep is None:
        return [order[:count] for order in orders]
    chosen, start = [[] for _ in orders], [0] * len(orders)
    while True:
        chunks = [order[s:s + count - len(c)] for order, s, c in zip(orders, start, chosen)]
        sizes = [len(chunk) for chunk in chunks]
        if not sum(sizes):
            return [np.asarray(c, np.int64) for c in chosen]
        accepted = np.split(np.asarray(keep(np.concatenate(chunks)), bool), np.cumsum(sizes)[:-1])
        for k, (chunk, ok) in enumerate(zip(chunks, accepted)):
            chosen[k].extend(chunk[ok])
            start[k] += len(chunk)
