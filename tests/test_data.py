import os

import numpy as np
import pytest
import tensorflow as tf

import tfxfer
from tests.conftest import write_class_folder
from tfxfer.data import load_splits


def _all(ds):
    images, labels = zip(*ds.unbatch().as_numpy_iterator())
    return np.stack(images), np.array(labels)


def test_image_folder_reads_every_kind_and_skips_bad_files(image_folder):
    train, val, test, info = tfxfer.load_dataset(data_dir=image_folder, image_size=32, batch_size=5, val_fraction=0.25)
    assert info.class_names == ["cat", "dog"]
    assert test is None
    assert sorted(os.path.basename(p) for p in info.skipped_files) == ["corrupt.jpg", "notes.txt"]
    assert info.num_examples == {"train": 18, "val": 6}
    images, labels = _all(train)
    assert images.shape == (18, 32, 32, 3) and images.dtype == np.uint8
    # Each class has its own brightness (see write_class_folder), grayscale and RGBA included.
    assert images[labels == 0].mean() < images[labels == 1].mean()


def test_carved_validation_is_deterministic_and_disjoint(image_folder):
    def split_images():
        train, val, _, _ = tfxfer.load_dataset(data_dir=image_folder, image_size=32, val_fraction=0.25, seed=3)
        return _all(train)[0], _all(val)[0]

    train_a, val_a = split_images()
    train_b, val_b = split_images()
    np.testing.assert_array_equal(np.sort(val_a.reshape(len(val_a), -1), 0), np.sort(val_b.reshape(len(val_b), -1), 0))
    train_rows = {row.tobytes() for row in train_a.reshape(len(train_a), -1)}
    assert not any(row.tobytes() in train_rows for row in val_a.reshape(len(val_a), -1))


def test_train_val_test_layout(tmp_path):
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_class_folder(str(tmp_path / split), per_class=4, seed=seed)
    train, val, test, info = tfxfer.load_dataset(data_dir=str(tmp_path), image_size=32, batch_size=4)
    assert info.num_examples == {"train": 8, "val": 8, "test": 8}
    assert _all(test)[0].shape == (8, 32, 32, 3)


def test_train_and_test_layout_carves_validation(tmp_path):
    write_class_folder(str(tmp_path / "train"), per_class=10)
    write_class_folder(str(tmp_path / "test"), per_class=3, seed=5)
    _, _, test, info = tfxfer.load_dataset(data_dir=str(tmp_path), image_size=32, val_fraction=0.2)
    assert info.num_examples == {"train": 16, "val": 4, "test": 6}


def test_training_shuffle_and_augmentation_repeat_with_the_seed(image_folder):
    def first_epoch():
        train, *_ = tfxfer.load_dataset(data_dir=image_folder, image_size=32, augment="flip_crop", seed=7)
        return _all(train)

    a, b = first_epoch(), first_epoch()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_digits_is_built_in():
    train, val, test, info = tfxfer.load_dataset("digits", image_size=32)
    assert info.num_examples == {"train": 1295, "val": 142, "test": 360}
    images, labels = next(train.as_numpy_iterator())
    assert images.shape[1:] == (32, 32, 3) and images.max() > 200 and set(labels) <= set(range(10))


def test_tfds_names_go_through_tensorflow_datasets():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        train, val, test, info = tfxfer.load_dataset("cifar10", image_size=32, batch_size=4, test_split="test")
        images, labels = next(train.as_numpy_iterator())
    assert info.num_classes == 10
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert test is not None


def test_tfds_carves_validation_with_split_slicing(monkeypatch):
    import tensorflow_datasets as tfds

    asked = []

    def recording(self, split=None, **kwargs):
        asked.append(split)
        return original(self, split=split, **kwargs)

    with tfds.testing.mock_data(num_examples=20):
        original = tfds.core.DatasetBuilder.as_dataset  # the mock's
        monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", recording)
        tfxfer.load_dataset("cifar10", image_size=32, val_fraction=0.2, test_split="test")
    assert asked == ["train[:80%]", "train[80%:]", "test"]


def test_tfds_offline_says_what_to_do(tmp_path):
    with pytest.raises(tfxfer.TfxferError) as info:
        tfxfer.load_dataset("cifar10", tfds_data_dir=str(tmp_path))
    message = str(info.value)
    assert "--tfds-data-dir" in message and "--data-dir" in message and "\n" not in message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "cifar1O"}, "did you mean 'cifar10'"),
        ({"data_dir": "/no/such/folder"}, "does not exist"),
        ({"name": "digits", "augment": "flop"}, "did you mean 'flip'"),
        ({"name": "digits", "val_fraction": 1.5}, "between 0 and 1"),
    ],
)
def test_bad_data_arguments_fail_clearly(kwargs, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        tfxfer.load_dataset(**kwargs)


def test_decode_handles_grayscale_and_rgba():
    from tfxfer.data.images import decode_image

    gray = tf.io.encode_png(tf.zeros((5, 7, 1), tf.uint8))
    rgba = tf.io.encode_png(tf.fill((5, 7, 4), tf.constant(9, tf.uint8)))
    assert decode_image(gray).shape == (5, 7, 3)
    assert decode_image(rgba).numpy().max() == 9 and decode_image(rgba).shape == (5, 7, 3)


def test_grayscale_tfds_datasets_become_rgb():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        train, _, _, info = tfxfer.load_dataset("mnist", image_size=32, batch_size=4)
        images, _ = next(train.as_numpy_iterator())
    assert images.shape == (4, 32, 32, 3) and info.num_classes == 10



def test_epoch_length_is_known_for_the_progress_bar(image_folder):
    train, val, _, _ = tfxfer.load_dataset(data_dir=image_folder, image_size=32, batch_size=4, val_fraction=0.25, max_train_examples=10)
    assert int(train.cardinality()) == 3 and int(val.cardinality()) == 2


def test_max_train_examples_is_one_sample_for_every_epoch(image_folder):
    train, *_ = tfxfer.load_dataset(data_dir=image_folder, image_size=32, max_train_examples=7, cache=False, seed=1)
    first, second = (sorted(img.tobytes() for img in _all(train)[0]) for _ in range(2))
    assert len(first) == 7 and first == second


def test_classes_and_labels_per_class_select_before_validation_is_carved(tmp_path):
    write_class_folder(str(tmp_path / "train"), classes=("ant", "bee", "cat", "dog"), per_class=20)
    write_class_folder(str(tmp_path / "test"), classes=("ant", "bee", "cat", "dog"), per_class=3, seed=1)
    train, val, test, info = tfxfer.load_dataset(
        data_dir=str(tmp_path), image_size=32, batch_size=4, classes="dog,bee", labels_per_class=10, val_fraction=0.2, seed=4
    )
    assert info.class_names == ["dog", "bee"] and info.classes == ["dog", "bee"] and info.labels_per_class == 10
    # 10 labelled images per class, then 2 of each carved out as validation.
    assert info.num_examples == {"train": 16, "val": 4, "test": 6}
    for ds, per_class in ((train, 8), (val, 2), (test, 3)):
        labels = _all(ds)[1]
        assert sorted(labels.tolist()) == [0] * per_class + [1] * per_class
    # Relabelled, not copied: "dog" (dark in write_class_folder: class 3) is now 0.
    images, labels = _all(test)
    assert images[labels == 0].mean() > images[labels == 1].mean()


def test_labels_per_class_is_seeded(tmp_path):
    write_class_folder(str(tmp_path), per_class=12)

    def chosen(seed):
        splits, _ = load_splits(data_dir=str(tmp_path), labels_per_class=5, seed=seed)
        return sorted(splits["train"].items.tolist() + splits["val"].items.tolist())

    assert chosen(1) == chosen(1) and chosen(1) != chosen(2) and len(chosen(1)) == 10


def test_tfds_class_selection_reads_labels_without_copying():
    import tensorflow_datasets as tfds

    # 100 random mock labels over 10 classes: each class has its 2 (mock data is seeded).
    with tfds.testing.mock_data(num_examples=100):
        train, val, test, info = tfxfer.load_dataset("mnist", image_size=32, batch_size=4, classes="3,7", labels_per_class=2)
        labels = _all(train)[1].tolist() + _all(val)[1].tolist()
        test_labels = set(_all(test)[1].tolist()) if test is not None else {0, 1}
    assert info.class_names == ["3", "7"] and test_labels <= {0, 1}
    assert sorted(labels) == [0, 0, 1, 1]
    assert int(train.cardinality()) >= 0  # the progress bar knows the epoch length


@pytest.mark.parametrize(
    "kwargs, message",
    [({"classes": "cat,dgo"}, "did you mean 'dog'"), ({"classes": "cat"}, "at least two"), ({"labels_per_class": 0}, "at least 1")],
)
def test_bad_selection_fails_clearly(image_folder, kwargs, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        tfxfer.load_dataset(data_dir=image_folder, **kwargs)


@pytest.mark.parametrize("cache", [True, False])
def test_each_epoch_has_its_own_order_and_set_epoch_replays_it(image_folder, cache):
    """What a resumed run relies on: epoch e's batches depend on the seed and e
    only, not on how many passes this pipeline (or process) made before."""
    from tfxfer.data.pipeline import set_epoch

    def passes(n, start=0):
        train = tfxfer.load_dataset(data_dir=image_folder, image_size=16, batch_size=4, seed=3, augment="flip_crop", cache=cache)[0]
        set_epoch(train, start)
        return [np.concatenate([x for x, _ in train.as_numpy_iterator()]) for _ in range(n)]

    first = passes(3)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    resumed = passes(1, start=2)  # a new pipeline, as after a restart
    np.testing.assert_array_equal(resumed[0], first[2])
