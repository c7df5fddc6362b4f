"""CSV and TFRecord sources: the same splits, selection and skipping as folders."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import _encode, run_cli
from tfxfer.data import load_dataset, load_splits
from tfxfer.errors import TfxferError


def _images(root, n_per_class, classes=("cat", "dog", "owl"), seed=0):
    """PNG files whose mean colour gives the class; `(relative path, class)` pairs."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    pairs = []
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            array = np.clip(rng.normal(40 + 80 * c, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            rel = os.path.join("img", f"{name}-{i}.png")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(_encode(array, "PNG"))
            pairs.append((rel, name))
    return pairs


def _write_csv(path, rows, header="path,label,split"):
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(",".join(r) + "\n" for r in rows))


def test_csv_splits_resolve_relative_paths_and_skip_bad_images(tmp_path):
    pairs = _images(tmp_path, 6)
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    rows = [(p, c, "test" if i % 6 == 5 else "") for i, (p, c) in enumerate(pairs)] + [("img/broken.png", "cat", "train")]
    _write_csv(tmp_path / "labels.csv", rows)
    splits, info = load_splits(csv=str(tmp_path / "labels.csv"), val_fraction=0.25)
    assert info.class_names == ["cat", "dog", "owl"]
    assert info.num_examples["test"] == 3
    assert info.num_examples["train"] + info.num_examples["val"] == 15
    assert [os.path.basename(f) for f in info.skipped_files] == ["broken.png"]
    # A label follows its file: every cat image is darker than every owl image.
    train, _, test, _ = load_dataset(csv=str(tmp_path / "labels.csv"), image_size=16, batch_size=64, val_fraction=0.25)
    images, labels = next(iter(test))
    means = images.numpy().reshape(len(labels), -1).mean(axis=1)
    assert means[labels.numpy() == 0].max() < means[labels.numpy() == 2].min()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("img/cat-0.png", "", "")], "Row 2 of .* has an empty label"),
        ([("img/cat-0.png", "cat", ""), ("img/gone.png", "cat", "")], "Row 3 of .* names 'img/gone.png', which is not a file"),
        # A blank line still counts, as a spreadsheet shows it.
        ([("img/cat-0.png", "cat", ""), ("", "", ""), ("img/gone.png", "cat", "")], "Row 4 of .* names 'img/gone.png'"),
        ([("img/cat-0.png", "cat", "holdout")], "Row 2 of .* has the split 'holdout'; use one of train, training, val, valid, validation, dev, test, testing"),
    ],
)
def test_csv_row_mistakes_name_the_row(tmp_path, rows, message):
    _images(tmp_path, 1)
    _write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(TfxferError, match=message):
        load_splits(csv=str(tmp_path / "labels.csv"))


def test_csv_without_the_columns_says_which(tmp_path):
    _write_csv(tmp_path / "labels.csv", [("a.png", "cat")], header="file,class")
    with pytest.raises(TfxferError, match="lacks the column\\(s\\) label, path"):
        load_splits(csv=str(tmp_path / "labels.csv"))
    _write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(TfxferError, match="has a header and no rows"):
        load_splits(csv=str(tmp_path / "empty.csv"))


def test_a_damaged_tfrecord_file_is_one_sentence(tmp_path):
    pairs = _images(tmp_path, 2)
    _write_records(tmp_path / "a.tfrecord", _record_items(tmp_path, pairs, True))
    data = (tmp_path / "a.tfrecord").read_bytes()
    (tmp_path / "cut.tfrecord").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tfrecord").write_bytes(b"not a record file at all")
    for name, message in (("cut", "cut.tfrecord' is damaged: a record in it is cut short"),
                          ("junk", "junk.tfrecord' is not a TFRecord file; --tfrecord takes TFRecord files")):
        with pytest.raises(TfxferError, match=message):
            load_splits(tfrecord=str(tmp_path / f"{name}.tfrecord"))


def _write_records(path, items):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for data, label, keys in items:
            label_feature = (
                tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()])) if isinstance(label, str)
                else tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
            )
            features = {keys[0]: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])), keys[1]: label_feature}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


def _record_items(tmp_path, pairs, string_labels, keys=("image", "label")):
    names = sorted({c for _, c in pairs})
    return [((tmp_path / p).read_bytes(), c if string_labels else names.index(c) * 10, keys) for p, c in pairs]


@pytest.mark.parametrize("string_labels", [pytest.param(True, marks=pytest.mark.slow), False])
def test_tfrecord_labels_skipping_and_class_selection(tmp_path, string_labels):
    pairs = _images(tmp_path, 5)
    items = _record_items(tmp_path, pairs, string_labels)
    items.insert(3, (b"corrupt bytes", items[0][1], ("image", "label")))
    _write_records(tmp_path / "train-0.tfrecord", items[:8])
    _write_records(tmp_path / "train-1.tfrecord", items[8:])
    pattern = str(tmp_path / "train-*.tfrecord")
    splits, info = load_splits(tfrecord=pattern, val_fraction=0.2)
    assert info.class_names == (["cat", "dog", "owl"] if string_labels else ["0", "10", "20"])
    assert info.skipped_files == [str(tmp_path / "train-0.tfrecord") + "#3"]
    assert info.num_examples["train"] + info.num_examples["val"] == 15

    # --classes keeps the two chosen classes, relabelled in the order given, images with them.
    chosen = "owl,cat" if string_labels else "20,0"
    train, val, _, info = load_dataset(tfrecord=pattern, classes=chosen, image_size=16, batch_size=64, val_fraction=0.2)
    assert info.num_examples["train"] + info.num_examples["val"] == 10
    images, labels = next(iter(train))
    means = images.numpy().reshape(len(labels), -1).mean(axis=1)
    assert means[labels.numpy() == 1].max() < means[labels.numpy() == 0].min()  # cat (1) darker than owl (0)

    # --labels-per-class: a seeded sample of N per class, before validation is carved, as for folders.
    _, info = load_splits(tfrecord=pattern, labels_per_class=3, val_fraction=0.34, seed=1)
    assert info.num_examples["train"] + info.num_examples["val"] == 9 and info.class_counts == [2, 2, 2]


def test_tfrecord_keys_are_configurable_and_missing_ones_named(tmp_path):
    pairs = _images(tmp_path, 2)
    _write_records(tmp_path / "a.tfrecord", _record_items(tmp_path, pairs, True, keys=("image/encoded", "image/class")))
    with pytest.raises(TfxferError, match="no feature 'image'; they hold image/class, image/encoded"):
        load_splits(tfrecord=str(tmp_path / "a.tfrecord"))
    _, info = load_splits(tfrecord=f"train={tmp_path / 'a.tfrecord'},test={tmp_path / 'a.tfrecord'}",
                          tfrecord_keys=("image/encoded", "image/class"))
    assert info.num_examples["test"] == 6
    with pytest.raises(TfxferError, match="matches no file"):
        load_splits(tfrecord=str(tmp_path / "none-*.tfrecord"))


def test_finetune_from_csv_end_to_end(tmp_path):
    pairs = _images(tmp_path, 6)
    _write_csv(tmp_path / "labels.csv", [(p, c, "test" if i % 6 == 5 else "train") for i, (p, c) in enumerate(pairs)])
    result = run_cli(
        "finetune", "--csv", tmp_path / "labels.csv", "--backbone", "tiny", "--weights", "none", "--image-size", "32",
        "--epochs", "1", "--batch-size", "8", "--output-dir", tmp_path / "runs", "--run-name", "csv",
    )
    assert result.exit_code == 0, result.output
    assert "data: labels, 3 classes, train 12, test 3, val 3" in result.output
    assert os.path.exists(tmp_path / "runs" / "csv" / "metrics.json")


@pytest.mark.parametrize("header, separator", [("path, label", ", "), ("path;label", ";"), ("Path\tLabel", "\t"),
                                               (" path | label ", " | ")])
def test_csv_headers_as_spreadsheets_write_them(tmp_path, header, separator):
    pairs = _images(tmp_path, 2, classes=("cat", "dog"))
    (tmp_path / "labels.csv").write_text(header + "\n" + "".join(f"{p}{separator}{c}\n" for p, c in pairs))
    _, info = load_splits(csv=str(tmp_path / "labels.csv"), val_fraction=0.5)
    assert info.class_names == ["cat", "dog"] and info.num_examples == {"train": 2, "val": 2}


def test_csv_columns_are_named_by_options_and_a_header_it_cannot_use_is_quoted(tmp_path):
    from tfxfer.config import load_config

    pairs = _images(tmp_path, 2, classes=("cat", "dog"))
    _write_csv(tmp_path / "labels.csv", pairs, header="file,class")
    with pytest.raises(TfxferError) as error:
        load_splits(csv=str(tmp_path / "labels.csv"))
    assert str(error.value).endswith(
        "labels.csv' lacks the column(s) label, path: its header, read as separated by commas, names 'file', 'class'; "
        "rename the columns, or name yours with --csv-path-column and --csv-label-column."
    )
    # From a config file's data section, as from the flags.
    (tmp_path / "run.yaml").write_text("data:\n  csv_path_column: file\n  csv_label_column: class\n")
    config = load_config(str(tmp_path / "run.yaml"), csv=str(tmp_path / "labels.csv"))
    _, info = load_splits(**config.data.source(), val_fraction=0.5)
    assert info.class_names == ["cat", "dog"] and info.num_examples == {"train": 2, "val": 2}
    with pytest.raises(TfxferError, match="lacks the column\\(s\\) kind: .* name yours with --csv-label-column\\.$"):
        load_splits(csv=str(tmp_path / "labels.csv"), csv_columns=("file", "kind"))


def test_integer_labels_are_classes_in_number_order(tmp_path):
    pairs = _images(tmp_path, 2, classes=("10", "2", "1"))
    _write_csv(tmp_path / "labels.csv", pairs, header="path,label")
    splits, info = load_splits(csv=str(tmp_path / "labels.csv"), val_fraction=0.5)
    assert info.class_names == ["1", "2", "10"]
    rows = {os.path.basename(os.fsdecode(p)): label for p, label in zip(splits["train"].items, splits["train"].labels)}
    assert {name.split("-")[0]: label for name, label in rows.items()} == {"1": 0, "2": 1, "10": 2}

    # TFRecord string labels too; integer labels were numbers already.
    _write_records(tmp_path / "a.tfrecord", _record_items(tmp_path, pairs, True))
    splits, info = load_splits(tfrecord=str(tmp_path / "a.tfrecord"), val_fraction=0.5)
    assert info.class_names == ["1", "2", "10"]
    labels = [int(label) for _, label in splits["train"].examples().concatenate(splits["val"].examples())]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_gzip_tfrecords_are_read_and_other_files_named(tmp_path):
    pairs = _images(tmp_path, 2)
    items = _record_items(tmp_path, pairs, True)
    # What TFX and Beam write: GZIP, in a folder named split=train; and one shard without the .gz in its name.
    (tmp_path / "split=train").mkdir()
    with tf.io.TFRecordWriter(str(tmp_path / "split=train" / "a.tfrecord.gz"), options="GZIP") as writer:
        for data, label, keys in items[:4]:
            writer.write(_example(data, label, keys))
    with tf.io.TFRecordWriter(str(tmp_path / "split=train" / "b.tfrecord"), options="GZIP") as writer:
        for data, label, keys in items[4:]:
            writer.write(_example(data, label, keys))
    _, info = load_splits(tfrecord=str(tmp_path / "split=train" / "*"), val_fraction=0.5)
    assert info.class_names == ["cat", "dog", "owl"] and info.num_examples == {"train": 3, "val": 3}
    assert not info.skipped_files

    _write_csv(tmp_path / "labels.csv", pairs, header="path,label")
    with pytest.raises(TfxferError) as error:
        load_splits(tfrecord=str(tmp_path / "labels.csv"))
    assert str(error.value) == (f"{str(tmp_path / 'labels.csv')!r} is not a TFRecord file but a CSV file (pass it with "
                                "--csv); --tfrecord takes TFRecord files (plain or GZIP) of tf.train.Example records.")
    with pytest.raises(TfxferError, match="'vali=x/\\*' matches no file; a SPLIT=GLOB pair names train, val or test"):
        load_splits(tfrecord="vali=x/*")


def _example(data, label, keys):
    features = {keys[0]: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                keys[1]: tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()]))}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()
