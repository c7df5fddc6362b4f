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


@pytest.mark.parametrize("layout", [("Train", "Test"), ("training", "testing"), ("train", "valid", "test"),
                                    ("TRAIN", "Dev"), ("train", "Validation")])
def test_split_folders_go_by_their_common_names_in_any_case(tmp_path, layout):
    for name, seed in zip(layout, range(3)):
        write_class_folder(str(tmp_path / name), classes=("cat", "dog"), per_class=3 if seed else 6, size=8, seed=seed)
    _, info = load_splits(data_dir=str(tmp_path), val_fraction=0.34)
    assert info.class_names == ["cat", "dog"]  # never "Test" and "Train"
    assert info.sources["train"] == layout[0] + "/"
    own_val = next((name for name in layout[1:] if name.lower() in ("valid", "dev", "validation")), None)
    if own_val:  # the folder is the validation split, whole; train is not carved
        assert info.num_examples["train"] == 12 and info.num_examples["val"] == 6
        assert info.sources["val"] == own_val + "/"
    else:
        assert info.num_examples["train"] == 8 and info.num_examples["val"] == 4
        assert info.sources["val"] == "carved from train (34% per class)"
    test = next((name for name in layout[1:] if name.lower().startswith("test")), None)
    assert info.num_examples.get("test") == (6 if test else None) and info.sources.get("test") == (test and test + "/")


@pytest.mark.parametrize("folders, message", [
    (("train", "val", "valid"), "has two validation folders, val/ and valid/; merge them into one or rename the other."),
    (("Training", "train"), "has two training folders, Training/ and train/"),
    (("Test", "Val"), "holds the split folder(s) Test/, Val/ and no training folder; add train/ (or training/)"),
])
def test_split_folders_that_cannot_be_read_as_splits_are_one_sentence(tmp_path, folders, message):
    for name in folders:
        write_class_folder(str(tmp_path / name), classes=("cat", "dog"), per_class=2, size=8)
    with pytest.raises(tfxfer.TfxferError) as error:
        load_splits(data_dir=str(tmp_path))
    assert message in str(error.value)


def test_class_folders_named_by_numbers_sort_as_numbers(tmp_path):
    write_class_folder(str(tmp_path), classes=("10", "2", "1"), per_class=2, size=8)
    splits, info = load_splits(data_dir=str(tmp_path), val_fraction=0.5)
    assert info.class_names == ["1", "2", "10"]
    folder_of = {os.fsdecode(p).split(os.sep)[-2]: label for p, label in zip(splits["train"].items, splits["train"].labels)}
    assert folder_of == {"1": 0, "2": 1, "10": 2}
    # Mixed names stay text: "10" before "2" before "cat".
    write_class_folder(str(tmp_path), classes=("cat",), per_class=2, size=8)
    assert load_splits(data_dir=str(tmp_path), val_fraction=0.5)[1].class_names == ["1", "10", "2", "cat"]


def test_a_models_class_order_is_kept_when_the_data_has_the_same_classes(tmp_path):
    """What evaluate and --resume pass: a run from before numbers sorted as numbers keeps its class ids."""
    write_class_folder(str(tmp_path), classes=("1", "2", "10"), per_class=4, size=8)
    splits, info = load_splits(data_dir=str(tmp_path), model_classes=["1", "10", "2"], labels_per_class=2, seed=3)
    assert info.class_names == ["1", "10", "2"]
    for split in splits.values():
        names = [os.fsdecode(p).split(os.sep)[-2] for p in split.items]
        assert [info.class_names[label] for label in split.labels] == names
    # The same per-class sample as a run that listed the classes in that order itself.
    same, _ = load_splits(data_dir=str(tmp_path), classes="1,10,2", labels_per_class=2, seed=3)
    assert sorted(splits["train"].items.tolist()) == sorted(same["train"].items.tolist())
    # Other classes than the model's: left as they are, for the caller to refuse.
    assert load_splits(data_dir=str(tmp_path), model_classes=["1", "2", "3"])[1].class_names == ["1", "2", "10"]


def test_selection_comes_before_the_decode_check_which_replaces_a_bad_pick(tmp_path, monkeypatch):
    from tfxfer.data import folders

    write_class_folder(str(tmp_path / "train"), classes=("cat", "dog"), per_class=30, size=8)
    write_class_folder(str(tmp_path / "test"), classes=("cat", "dog"), per_class=2, size=8, seed=1)
    checked = []

    def counting(paths):
        checked.extend(paths)
        return decodable(paths)

    decodable = folders.decodable
    monkeypatch.setattr(folders, "decodable", counting)
    splits, info = load_splits(data_dir=str(tmp_path), max_train_examples=5, val_fraction=0.1, seed=4)
    # Only the files used are decoded: the 5 picked, the 6 carved for validation and the 4 test images, not all 64.
    assert len(checked) == 5 + 6 + 4 and info.num_examples == {"train": 5, "test": 4, "val": 6}
    picked = splits["train"].items.tolist()
    assert load_splits(data_dir=str(tmp_path), max_train_examples=5, val_fraction=0.1, seed=4)[0]["train"].items.tolist() == picked

    # A picked file that does not decode is skipped, reported, and replaced by the next of the same seeded order.
    with open(picked[2], "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    splits, info = load_splits(data_dir=str(tmp_path), max_train_examples=5, val_fraction=0.1, seed=4)
    assert info.skipped_files == [os.fsdecode(picked[2])] and splits["train"].count == 5
    assert set(picked) - set(splits["train"].items.tolist()) == {picked[2]}

    # --labels-per-class: N readable images per class, and only those (and validation carved from them) decoded.
    checked.clear()
    splits, info = load_splits(data_dir=str(tmp_path / "train"), labels_per_class=3, val_fraction=0.34, seed=1)
    assert info.class_counts == [2, 2] and info.num_examples["val"] == 2 and len(checked) <= 6 + 1


def test_data_paths_given_to_the_library_expand_home_and_variables(tmp_path, monkeypatch):
    write_class_folder(str(tmp_path / "images"), per_class=2, size=8)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IMAGES", "images")
    _, info = load_splits(data_dir="~/$IMAGES", val_fraction=0.5)
    assert info.class_names == ["cat", "dog"] and info.files["train"][0].startswith(str(tmp_path / "images"))


def test_two_class_selections_of_records_compose_their_label_maps():
    # A resumed run's class order, then --classes: records keep their source labels, so the
    # second map must apply on top of the first, or the images arrive with permuted labels.
    import tensorflow as tf

    from tfxfer.data.splits import Split, align_classes, select_classes

    source = np.array([0, 1, 2, 0, 1, 2], np.int64)  # classes a, b, c in the source
    images = tf.constant(np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1))  # image i carries its index
    records = tf.data.Dataset.from_tensor_slices((images, source))
    splits = {"train": Split(6, records=records, read_labels=lambda: source)}
    splits, names = align_classes(splits, ["a", "b", "c"], ["c", "a", "b"])  # the model's order
    splits, names = select_classes(splits, names, "b,c")
    got = {int(image[0, 0, 0]): int(label) for image, label in splits["train"].examples()}
    assert names == ["b", "c"] and got == {1: 0, 4: 0, 2: 1, 5: 1}
    assert splits["train"].labels.tolist() == [got[i] for i in sorted(got)]


def test_a_class_none_of_whose_files_decode_is_an_error_with_labels_per_class_too(tmp_path):
    from tests.conftest import write_class_folder
    from tfxfer.data import load_splits

    write_class_folder(str(tmp_path), classes=("cat", "dog"), per_class=4)
    os.makedirs(tmp_path / "owl")
    for i in range(3):
        (tmp_path / "owl" / f"{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(tfxfer.TfxferError, match="No training image of 'owl' .* could be decoded"):
        load_splits(data_dir=str(tmp_path), labels_per_class=2, seed=0)
