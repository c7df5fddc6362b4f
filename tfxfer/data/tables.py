"""Labelled images listed in a CSV file or stored in TFRecord files.

Both give the same `Split`s as an image folder, so selection, the pipeline and
the skipping of undecodable images work alike. Class names are the sorted
distinct labels, as folder names are.
"""

import csv
import glob
import os

import numpy as np
import tensorflow as tf

from tfxfer.data.folders import decodable
from tfxfer.data.images import decode_image
from tfxfer.data.splits import Split
from tfxfer.errors import TfxferError

__all__ = ["csv_table", "tfrecord_files", "SPLIT_NAMES"]

# The values a CSV's split column (or a --tfrecord SPLIT=GLOB) may take, and the split each means.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def csv_table(path):
    """`(splits, class names, skipped files)` of a CSV with columns `path` and
    `label`, and optionally `split` (train, val or validation, test; empty is
    train). Relative paths are from the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except FileNotFoundError:
        raise TfxferError(f"CSV file {path!r} does not exist; pass --csv with a file of path,label rows.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TfxferError(f"Cannot read {path!r} as CSV ({e}); it needs a header row with the columns path and label.") from None
    missing = {"path", "label"} - columns
    if missing:
        raise TfxferError(
            f"{path!r} lacks the column(s) {', '.join(sorted(missing))}; its header must name path and label "
            "(and optionally split)."
        )
    root = os.path.dirname(os.path.abspath(path))
    by_split = {}
    # Row numbers as a spreadsheet shows them: the header is row 1.
    for number, row in enumerate(rows, start=2):
        label = (row.get("label") or "").strip()
        file = (row.get("path") or "").strip()
        split = (row.get("split") or "").strip().lower() or "train"
        if not label:
            raise TfxferError(f"Row {number} of {path!r} has an empty label; give every row a class name.")
        if split not in SPLIT_NAMES:
            raise TfxferError(
                f"Row {number} of {path!r} has the split {row.get('split')!r}; use train, val, validation or test."
            )
        full = os.path.join(root, file)
        if not file or not os.path.isfile(full):
            raise TfxferError(f"Row {number} of {path!r} names {file!r}, which is not a file (looked for {full!r}).")
        by_split.setdefault(SPLIT_NAMES[split], []).append((os.fsencode(full), label))
    if not rows:
        raise TfxferError(f"{path!r} has a header and no rows; add one path,label row per image.")
    if not by_split.get("train"):
        raise TfxferError(f"{path!r} has no training rows; rows without a split value are training rows.")
    class_names = sorted({label for label in (lab for pairs in by_split.values() for _, lab in pairs)})
    index = {name: i for i, name in enumerate(class_names)}
    skipped, splits = [], {}
    good = decodable([p for pairs in by_split.values() for p, _ in pairs])
    for key, pairs in by_split.items():
        skipped.extend(os.fsdecode(p) for p, _ in pairs if p not in good)
        kept = [(p, index[lab]) for p, lab in pairs if p in good]
        splits[key] = Split(
            len(kept), np.asarray([lab for _, lab in kept], np.int32), np.asarray([p for p, _ in kept], dtype=object)
        )
    if not splits["train"].count:
        raise TfxferError(f"None of the training images listed in {path!r} could be decoded ({len(skipped)} skipped).")
    return splits, class_names, skipped


def tfrecord_files(pattern, image_key="image", label_key="label"):
    """`(splits, class names, skipped records)` of `tf.train.Example` records.

    `pattern` is a glob of training files, or `SPLIT=GLOB` pairs separated by
    commas (`train=a/*.tfrecord,test=b/*.tfrecord`). Each record holds the
    encoded image bytes under `image_key` and an integer or string label under
    `label_key`. The records are read once here, to learn the labels and to
    drop those whose image does not decode; a skipped record is named
    `FILE#INDEX`.
    """
    globs = {}
    for part in pattern.split(","):
        key, sep, value = part.rpartition("=")
        if not sep:
            key, value = "train", part
        if key.strip().lower() not in SPLIT_NAMES:
            raise TfxferError(f"--tfrecord split {key!r} is not one of train, val, validation, test.")
        files = sorted(glob.glob(os.path.expanduser(value.strip())))
        if not files:
            raise TfxferError(f"--tfrecord {value.strip()!r} matches no file.")
        globs[SPLIT_NAMES[key.strip().lower()]] = files
    if "train" not in globs:
        raise TfxferError("--tfrecord needs training records: a plain GLOB, or train=GLOB among the pairs.")

    try:
        scanned = {key: _scan_records(files, image_key, label_key) for key, files in globs.items()}
    except tf.errors.DataLossError as e:
        raise TfxferError(f"A --tfrecord file is damaged or not a TFRecord file ({e.message.splitlines()[0]}).") from None
    kinds = {kind for _, _, kind, _ in scanned.values()}
    if len(kinds) > 1:
        raise TfxferError(f"{label_key!r} is an integer in some --tfrecord files and a string in others; use one kind.")
    raw = sorted({v for values, ok, _, _ in scanned.values() for v, good in zip(values, ok) if good})
    class_names = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    index = {v: i for i, v in enumerate(raw)}
    splits, skipped = {}, []
    for key, (values, ok, kind, names) in scanned.items():
        skipped.extend(name for name, good in zip(names, ok) if not good)
        labels = np.asarray([index[v] for v, good in zip(values, ok) if good], np.int32)
        mask = tf.constant(ok)
        records = (
            _parsed(globs[key], image_key, label_key, kind).enumerate()
            .filter(lambda i, _: tf.gather(mask, i)).map(lambda _, example: example)
        )
        table = _label_table(raw, kind)
        records = records.map(lambda data, value: (decode_image(data), table.lookup(value)), num_parallel_calls=tf.data.AUTOTUNE)
        splits[key] = Split(len(labels), labels=labels, records=records, positions=np.arange(len(labels)))
    if not splits["train"].count:
        raise TfxferError(f"No training record of {pattern!r} holds a decodable image ({len(skipped)} skipped).")
    return splits, class_names, skipped


def _parsed(files, image_key, label_key, kind):
    features = {image_key: tf.io.FixedLenFeature([], tf.string), label_key: tf.io.FixedLenFeature([], kind)}

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, features)
        return example[image_key], example[label_key]

    return tf.data.TFRecordDataset(files).map(parse)


def _label_table(raw, kind):
    keys = tf.constant(raw, tf.string if kind == tf.string else tf.int64)
    values = tf.range(len(raw), dtype=tf.int64)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=-1)


def _scan_records(files, image_key, label_key):
    """`(label values, decodable flags, label dtype, record names)` of every record in `files`."""
    kind = None
    for path in files:
        for serialized in tf.data.TFRecordDataset(path).take(1).as_numpy_iterator():
            kind = _label_kind(tf.train.Example.FromString(serialized), path, image_key, label_key)
            break
        if kind is not None:
            break
    if kind is None:
        raise TfxferError(f"The --tfrecord files {', '.join(files[:3])} hold no readable record; they must be TFRecord "
                          "files of tf.train.Example records.")
    names = [f"{path}#{i}" for path in files for i in range(_count(path))]
    check = _parsed(files, image_key, label_key, kind).map(
        lambda data, value: (value, tf.shape(decode_image(data))[0] > 0)
    )
    # A record that does not decode ends the pass with an error; walk them one at a time past it.
    values, ok = [], []
    iterator = iter(check)
    while True:
        try:
            value, good = next(iterator)
            values.append(value.numpy())
            ok.append(bool(good))
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError:
            values.append(None)
            ok.append(False)
    if len(values) != len(names):
        raise TfxferError(f"The --tfrecord files {', '.join(files[:3])} could not be read to the end; is one truncated?")
    return values, ok, kind, names


def _label_kind(example, path, image_key, label_key):
    features = example.features.feature
    for key in (image_key, label_key):
        if key not in features:
            raise TfxferError(
                f"Records of {path!r} have no feature {key!r}; they hold {', '.join(sorted(features))}: name the "
                "image and label keys with --tfrecord-image-key and --tfrecord-label-key."
            )
    if features[image_key].WhichOneof("kind") != "bytes_list":
        raise TfxferError(f"Feature {image_key!r} of {path!r} is not bytes; it must hold the encoded image (JPEG, PNG...).")
    kind = features[label_key].WhichOneof("kind")
    if kind == "int64_list":
        return tf.int64
    if kind == "bytes_list":
        return tf.string
    raise TfxferError(f"Label feature {label_key!r} of {path!r} is {kind}; it must be an integer or a string.")


def _count(path):
    return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
