"""Hostile inputs: each gets one clear sentence (or is skipped and counted), and
no finished work is lost."""

import errno
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfxfer
from tests.conftest import run_cli, write_class_folder, write_splits


def _good(path, size=24, seed=0, mode="RGB", fmt=None, **save):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    image.save(path, format=fmt, **save)
    return image


def _folder(root, per_class=6):
    write_class_folder(str(root), classes=("cat", "dog"), per_class=per_class)
    return root


# --- image folders ------------------------------------------------------------------------------


def test_truncated_empty_and_fake_jpegs_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "data")
    _good(root / "cat" / "whole.jpg", fmt="JPEG")
    data = (root / "cat" / "whole.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("a text file named .jpg")
    *_, info = tfxfer.load_dataset(data_dir=str(root), image_size=32)
    assert sorted(os.path.basename(f) for f in info.skipped_files) == ["empty.jpg", "notes.jpg", "truncated.jpg"]
    assert sum(info.num_examples.values()) == 2 * 6 + 1


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "png16", "palette_png_with_transparency"])
def test_unusual_encodings_decode_to_the_right_rgb(tmp_path, kind):
    from tfxfer.data.images import decode_image

    path = tmp_path / "image"
    if kind == "cmyk_jpeg":
        _good(path, mode="CMYK", fmt="JPEG", quality=95)
    elif kind == "png16":
        rng = np.random.default_rng(0)
        grey16 = rng.integers(0, 65536, (24, 24, 1), dtype=np.uint16)
        path.write_bytes(tf.io.encode_png(grey16).numpy())
    else:
        _good(path, mode="P", fmt="PNG", transparency=0)
    decoded = decode_image(tf.io.read_file(str(path))).numpy().astype(int)
    if kind == "png16":
        expected = np.repeat(grey16 >> 8, 3, axis=-1).astype(int)  # 16 -> 8 bits, grey -> RGB
    else:
        expected = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 3, "colours differ from what Pillow reads"


def test_a_huge_image_is_resized_not_refused(tmp_path):
    root = _folder(tmp_path / "data")
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(root / "cat" / "huge.jpg", quality=50)
    train, val, _, info = tfxfer.load_dataset(data_dir=str(root), image_size=32, batch_size=64, val_fraction=0.2)
    assert not info.skipped_files
    images = np.concatenate([x for x, _ in train.as_numpy_iterator()] + [x for x, _ in val.as_numpy_iterator()])
    assert images.shape[1:] == (32, 32, 3)
    assert np.any(np.all(np.abs(images.astype(int) - [200, 30, 30]).max(axis=-1) <= 3, axis=(1, 2)))


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    root = _folder(tmp_path / "data")
    name = os.fsdecode(b"caf\xe9-latin1.png")  # Latin-1 bytes: not valid UTF-8
    _good(os.path.join(root, "dog", name), fmt="PNG")
    *_, info = tfxfer.load_dataset(data_dir=str(root), image_size=32)
    assert not info.skipped_files and sum(info.num_examples.values()) == 13


def test_an_empty_class_folder_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "owl").mkdir()
    with pytest.raises(tfxfer.TfxferError, match=r"'owl' under .* hold no readable images; add images or remove"):
        tfxfer.load_dataset(data_dir=str(root))


def test_a_single_class_is_refused_before_training(tmp_path):
    write_class_folder(str(tmp_path / "data"), classes=("cat",), per_class=6)
    result = run_cli("finetune", "--data-dir", tmp_path / "data", "--backbone", "tiny", "--weights", "none",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1 and "single class (cat); a classifier needs at least two" in result.output
    assert not (tmp_path / "runs").exists()


def test_class_sets_that_differ_between_splits(tmp_path):
    root = write_splits(tmp_path / "data", train=6, test=2, classes=("cat", "dog", "owl"))
    # test/ without owl is fine: those classes just have no test images.
    os.rename(os.path.join(root, "test", "owl"), tmp_path / "owl-test")
    _, _, test, info = tfxfer.load_dataset(data_dir=root, image_size=32)
    assert info.num_examples["test"] == 4 and info.class_names == ["cat", "dog", "owl"]
    # A class that train/ lacks cannot be learnt: one sentence.
    write_class_folder(os.path.join(root, "test"), classes=("bat",), per_class=2)
    with pytest.raises(tfxfer.TfxferError, match="class folders that train/ lacks: bat"):
        tfxfer.load_dataset(data_dir=root)


def test_symlink_loops_and_broken_links_end_the_scan(tmp_path):
    root = _folder(tmp_path / "data")
    os.symlink(root / "cat", root / "cat" / "loop")  # a folder that contains itself
    os.symlink(root / "dog" / "self.png", root / "dog" / "self.png")  # a link to itself
    *_, info = tfxfer.load_dataset(data_dir=str(root), image_size=32)
    assert sum(info.num_examples.values()) == 12
    assert [os.path.basename(f) for f in info.skipped_files] == ["self.png"]


@pytest.mark.slow
def test_a_folder_of_100000_files_shows_a_progress_bar(tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    tiny = tf.io.encode_png(np.zeros((2, 2, 3), np.uint8)).numpy()
    for i in range(100_000):
        with open(root / ("cat", "dog")[i % 2] / f"{i:06d}.png", "wb") as f:
            f.write(tiny)
    *_, info = tfxfer.load_dataset(data_dir=str(root), image_size=8)
    assert sum(info.num_examples.values()) == 100_000
    out = capsys.readouterr().out
    assert "checking 100,000 image files" in out and "100000/100000" in out


# --- tensorflow-datasets ------------------------------------------------------------------------


def _tiny_tfds_builders():
    """Two datasets tfds prepares offline, from a generator: one labelled, one not."""
    import tensorflow_datasets as tfds

    def examples(n, labelled):
        for i in range(n):
            example = {"image": np.full((8, 8, 3), 20 * i, np.uint8)}
            yield i, {**example, "label": i % 2} if labelled else example

    class Generated(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        def _generate_examples(self, n, labelled):
            return examples(n, labelled)

    class TfxferTinyLabelled(Generated):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(names=["a", "b"])}
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10, True), "test": self._generate_examples(4, True)}

    class TfxferTinyUnlabelled(Generated):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10, False)}

    return TfxferTinyLabelled, TfxferTinyUnlabelled


_TINY_TFDS = _tiny_tfds_builders()


def test_tfds_unknown_name_missing_split_and_a_dataset_without_labels(tmp_path):
    with pytest.raises(tfxfer.TfxferError, match="did you mean 'cifar10'"):
        tfxfer.load_dataset("cifar_10")
    data = str(tmp_path / "tfds")
    train, val, test, info = tfxfer.load_dataset("tfxfer_tiny_labelled", tfds_data_dir=data, image_size=8, val_fraction=0.2)
    assert info.num_examples == {"train": 8, "val": 2, "test": 4}  # prepared offline: the real tfds path
    with pytest.raises(tfxfer.TfxferError, match=r"'tfxfer_tiny_labelled' has no split 'tarin'; its splits are: test, train\."):
        tfxfer.load_dataset("tfxfer_tiny_labelled", tfds_data_dir=data, train_split="tarin")
    with pytest.raises(tfxfer.TfxferError, match="'tfxfer_tiny_unlabelled' has no image and class-label features"):
        tfxfer.load_dataset("tfxfer_tiny_unlabelled", tfds_data_dir=data)


# --- config and command line --------------------------------------------------------------------


@pytest.mark.parametrize("alpha, message", [("-0.1", "l2sp must be >= 0, got -0.1."), ("nan", "l2sp must be a number, got NaN.")])
def test_negative_or_nan_alpha_is_one_sentence(alpha, message):
    result = run_cli("finetune", "--dataset", "digits", "--l2sp", alpha)
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_batch_larger_than_the_dataset_trains_with_a_note(tmp_path):
    root = _folder(tmp_path / "data", per_class=4)
    result = run_cli("finetune", "--data-dir", root, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "64", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "--batch-size 64 is more than the" in result.output


def test_an_image_size_too_small_says_the_minimum():
    with pytest.raises(tfxfer.TfxferError, match="resnet50 needs images of at least 32 px, got 28; pass --image-size 32"):
        tfxfer.create_backbone("resnet50", weights=None, image_size=28)


def test_weights_of_another_architecture_are_one_sentence(tmp_path):
    path = str(tmp_path / "other.weights.h5")
    tfxfer.create_backbone("simplecnn", weights=None, image_size=32).save_weights(path)
    with pytest.raises(tfxfer.TfxferError, match="does not fit backbone resnet9 .* same architecture") as info:
        tfxfer.create_backbone("resnet9", weights=path, image_size=32)
    assert "\n" not in str(info.value)


def test_an_output_folder_that_cannot_be_written(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    args = ["finetune", "--data-dir", root, "--backbone", "tiny", "--weights", "none", "--epochs", "1", "--image-size", "32"]
    (tmp_path / "a-file").write_text("")  # a file where the output folder should be
    result = run_cli(*args, "--output-dir", tmp_path / "a-file")
    assert result.exit_code == 1 and "Cannot write" in result.output and "--output-dir" in result.output

    def refused(path, *a, **k):  # what a read-only folder answers (the tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr("tfxfer.runs.os.makedirs", refused)
    result = run_cli(*args, "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1 and "Cannot write" in result.output and "Permission denied" in result.output


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    from tfxfer import atomic

    root = _folder(tmp_path / "data")
    args = ["finetune", "--data-dir", root, "--backbone", "tiny", "--weights", "none", "--epochs", "3",
            "--image-size", "32", "--batch-size", "4", "--output-dir", tmp_path / "runs", "--run-name", "r"]
    original, writes = atomic.write_json, []

    def filling(path, data):
        writes.append(path)
        if path.endswith("state.json") and len([w for w in writes if w.endswith("state.json")]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(path, data)

    monkeypatch.setattr(atomic, "write_json", filling)
    result = run_cli(*args)
    assert result.exit_code == 1 and "No space left on device" in result.output and "--resume" in result.output
    state = json.loads((tmp_path / "runs" / "r" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    monkeypatch.setattr(atomic, "write_json", original)
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming r after epoch 1" in resumed.output


# --- predict, evaluate and serving --------------------------------------------------------------


# These read the run shared by the whole suite (tests/conftest.py) and write only under tmp_path.
def test_predict_on_a_file_that_is_not_an_image(finished_run, shared_data, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    good = next((shared_data / "test" / "cat").iterdir())
    result = run_cli("predict", "--model", finished_run, tmp_path / "notes.txt", good)
    assert result.exit_code == 1
    assert "notes.txt is not an image (JPEG, PNG, BMP, GIF or WebP)" in result.output
    assert str(good) in result.output  # the good file is still predicted


def test_a_savedmodel_tfxfer_did_not_write(shared_data, tmp_path):
    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return {"y": x * 2}

    foreign = str(tmp_path / "foreign")
    plain = Plain()
    tf.saved_model.save(plain, foreign, signatures=plain.__call__)
    image = next((shared_data / "test" / "cat").iterdir())
    for command in (["predict", "--model", foreign, image], ["evaluate", "--model", foreign, "--data-dir", shared_data]):
        result = run_cli(*command)
        assert result.exit_code == 1 and "not exported by tfxfer" in result.output, result.output


def test_a_run_folder_without_export(shared_data, tmp_path):
    (tmp_path / "empty-run").mkdir()
    result = run_cli("evaluate", "--model", tmp_path / "empty-run", "--data-dir", shared_data)
    assert result.exit_code == 1 and "No SavedModel under" in result.output


def test_serve_bytes_refuses_bytes_that_are_not_an_image(finished_run, shared_data):
    serve = tf.saved_model.load(str(finished_run / "export" / "1")).signatures["serve_bytes"]
    good = next((shared_data / "test" / "cat").iterdir()).read_bytes()
    for junk, message in ((b"plain text", "Unknown image file format"), (b"GIF89a but not really", "Invalid GIF data")):
        # The whole request fails with the decoder's reason; no probabilities come back for it.
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(image_bytes=tf.constant([good, junk]))
    assert serve(image_bytes=tf.constant([good]))["probabilities"].shape == (1, 3)
