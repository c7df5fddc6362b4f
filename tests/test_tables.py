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
        ([("img/cat-0.png", "cat", "holdout")], "Row 2 of .* has the split 'holdout'; use train, val, validation or test"),
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
    for name, message in (("cut", "damaged or not a TFRecord file"), ("junk", "damaged or not a TFRecord file|no readable record")):
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
