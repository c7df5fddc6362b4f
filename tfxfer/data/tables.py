"""Labelled images listed in a CSV file or stored in TFRecord files.

Both give the same `Split`s as an image folder, so selection, the pipeline and
the skipping of undecodable images work alike. Class names are the distinct
labels in `class_order`, as folder names are: as numbers when all are integers.
"""

import csv
import glob
import os

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from tfxfer.data.images import decode_image
from tfxfer.data.splits import SPLIT_NAMES, Split, class_order
from tfxfer.errors import TfxferError

__all__ = ["csv_table", "tfrecord_files", "SPLIT_NAMES"]

# The separators a CSV may use: commas, semicolons (Excel where the decimal mark is a comma), tabs, bars.
SEPARATORS = ",;\t|"
_SEPARATOR_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "bars"}
_GZIP_MAGIC = b"\x1f\x8b"


def csv_table(path, path_column="path", label_column="label"):
    """`(splits, class names)` of a CSV with a path and a label column, and
    optionally `split` (train, val, test or their other names; empty is
    train). Relative paths are from the CSV's folder. Column names match
    without surrounding spaces or case; the separator is the one of
    `SEPARATORS` the header uses most. The files are not decoded yet."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = f.readline()
            separator = max(SEPARATORS, key=header.count) if any(c in header for c in SEPARATORS) else ","
            f.seek(0)
            reader = csv.reader(f, delimiter=separator, skipinitialspace=True)
            fields = [name.strip() for name in next(reader, [])]
            # Each row with its line in the file, as a spreadsheet numbers it (the header is row 1).
            rows = [(reader.line_num, dict(zip([name.lower() for name in fields], values)))
                    for values in reader if any(v.strip() for v in values)]
    except FileNotFoundError:
        raise TfxferError(f"CSV file {path!r} does not exist; pass --csv with a file of path,label rows.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TfxferError(f"Cannot read {path!r} as CSV ({e}); it needs a header row with the columns path and label.") from None
    path_key, label_key = path_column.strip().lower(), label_column.strip().lower()
    columns = {name.lower() for name in fields}
    missing = [name for name, key in ((path_column, path_key), (label_column, label_key)) if key not in columns]
    if missing:
        options = " and ".join(option for option, key in (("--csv-path-column", path_key), ("--csv-label-column", label_key))
                               if key not in columns)
        read = ", ".join(repr(name) for name in fields) or "nothing"
        raise TfxferError(
            f"{path!r} lacks the column(s) {', '.join(sorted(missing))}: its header, read as separated by "
            f"{_SEPARATOR_NAMES[separator]}, names {read}; rename the columns, or name yours with {options}."
        )
    root = os.path.dirname(os.path.abspath(path))
    by_split = {}
    for number, row in rows:
        label = (row.get(label_key) or "").strip()
        file = (row.get(path_key) or "").strip()
        split = (row.get("split") or "").strip().lower() or "train"
        if not label:
            raise TfxferError(f"Row {number} of {path!r} has an empty label; give every row a class name.")
        if split not in SPLIT_NAMES:
            raise TfxferError(
                f"Row {number} of {path!r} has the split {row.get('split')!r}; use one of {', '.join(SPLIT_NAMES)}."
            )
        full = os.path.join(root, file)
        if not file or not os.path.isfile(full):
            raise TfxferError(f"Row {number} of {path!r} names {file!r}, which is not a file (looked for {full!r}).")
        by_split.setdefault(SPLIT_NAMES[split], []).append((os.fsencode(full), label))
    if not rows:
        raise TfxferError(f"{path!r} has a header and no rows; add one path,label row per image.")
    if not by_split.get("train"):
        raise TfxferError(f"{path!r} has no training rows; rows without a split value are training rows.")
    class_names = class_order({label for pairs in by_split.values() for _, label in pairs})
    index = {name: i for i, name in enumerate(class_names)}
    splits = {
        key: Split(len(pairs), np.asarray([index[label] for _, label in pairs], np.int32),
                   np.asarray([p for p, _ in pairs], dtype=object), unchecked=True)
        for key, pairs in by_split.items()
    }
    return splits, class_names


def tfrecord_files(pattern, image_key="image", label_key="label"):
    """`(splits, class names, skipped records)` of `tf.train.Example` records.

    `pattern` is a glob of training files, or `SPLIT=GLOB` pairs separated by
    commas (`train=a/*.tfrecord,test=b/*.tfrecord`); a part is a pair only when
    what comes before its first `=` is a split name, so `split=train/*.tfrecord`
    is a path. Files are plain or GZIP TFRecord files, told apart by their
    first bytes. Each record holds the encoded image bytes under `image_key`
    and an integer or string label under `label_key`. The records are read
    once here, to learn the labels and to drop those whose image does not
    decode; a skipped record is named `FILE#INDEX`.
    """
    globs = {}
    for part in pattern.split(","):
        key, sep, value = part.partition("=")
        split = SPLIT_NAMES.get(key.strip().lower()) if sep else None
        if split is None:
            split, value = "train", part
        files = sorted(f for f in glob.glob(os.path.expanduser(value.strip())) if os.path.isfile(f))
        if not files:
            hint = "; a SPLIT=GLOB pair names train, val or test before the =" if "=" in value else ""
            raise TfxferError(f"--tfrecord {value.strip()!r} matches no file{hint}.")
        known = globs.setdefault(split, [])
        known.extend(f for f in files if f not in known)
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
    if kinds == {tf.string}:
        raw = [name.encode() for name in class_order(v.decode() for v in raw)]
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

    return _records(files).map(parse)


def _records(files):
    """The serialized records of `files`, each file read plain or as GZIP, as its first bytes say."""
    kinds = [_compression(path) for path in files]
    if len(set(kinds)) == 1:
        return tf.data.TFRecordDataset(files, compression_type=kinds[0])
    pairs = tf.data.Dataset.from_tensor_slices((files, kinds))
    return pairs.flat_map(lambda path, kind: tf.data.TFRecordDataset(path, compression_type=kind))


def _compression(path):
    with open(path, "rb") as f:
        return "GZIP" if f.read(2) == _GZIP_MAGIC else ""


def _unreadable(path):
    """The sentence for a file whose records cannot be read: not a TFRecord file at all, or a damaged one."""
    try:
        _records([path]).take(1).reduce(np.int64(0), lambda n, _: n + 1)
    except tf.errors.OpError:
        hint = " but a CSV file (pass it with --csv)" if path.lower().endswith(".csv") else ""
        return TfxferError(f"{path!r} is not a TFRecord file{hint}; --tfrecord takes TFRecord files (plain or GZIP) of "
                           "tf.train.Example records.")
    return TfxferError(f"--tfrecord file {path!r} is damaged: a record in it is cut short or corrupted; write it again.")


def _label_table(raw, kind):
    keys = tf.constant(raw, tf.string if kind == tf.string else tf.int64)
    values = tf.range(len(raw), dtype=tf.int64)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=-1)


def _scan_records(files, image_key, label_key):
    """`(label values, decodable flags, label dtype, record names)` of every record in `files`."""
    kind = None
    for path in files:
        try:
            first = list(_records([path]).take(1).as_numpy_iterator())
        except tf.errors.OpError:
            raise _unreadable(path) from None
        for serialized in first:
            try:
                example = tf.train.Example.FromString(serialized)
            except DecodeError:
                raise TfxferError(f"The records of {path!r} are not tf.train.Example records; --tfrecord takes "
                                  "TFRecord files of tf.train.Example records.") from None
            kind = _label_kind(example, path, image_key, label_key)
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
    try:
        return int(_records([path]).reduce(np.int64(0), lambda n, _: n + 1))
    except tf.errors.OpError:
        raise _unreadable(path) from None
