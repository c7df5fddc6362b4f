"""`--dataset cifar10` offline: tfds's real `cifar10` builder prepares the
dataset from an archive in the real format, put in --tfds-manual-dir."""

import os

import numpy as np

from tests.cifar_archive import ARCHIVE, CLASSES, write_archive
from tests.conftest import run_cli

OPTIONS = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "32"]


def test_cifar10_from_a_manual_archive_runs_through_the_real_builder(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    path, size, digest = write_archive(tmp_path / "manual", per_class=4, test_per_class=5)
    cifar10 = tfds.builder_cls("cifar10")
    url = next(iter(cifar10.url_infos))
    # For this test only: the archive's checksum in place of the real one.
    monkeypatch.setattr(cifar10, "url_infos", {url: checksums.UrlInfo(size=size, checksum=digest, filename=ARCHIVE)})
    result = run_cli("finetune", "--dataset", "cifar10", "--tfds-manual-dir", tmp_path / "manual", "--tfds-data-dir",
                     tmp_path / "tfds", *OPTIONS, "--output-dir", tmp_path / "runs", "--run-name", "c10")
    assert result.exit_code == 0, result.output
    assert "data: cifar10, 10 classes" in result.output and "test 50" in result.output
    builder = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds"))
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 200
    assert builder.info.features["label"].names == CLASSES
    # The builder decoded the planes as the format says: class 0's images are dark, class 9's bright.
    images = {int(label): image for image, label in builder.as_dataset(split="test").map(
        lambda ex: (ex["image"], ex["label"])).as_numpy_iterator()}
    assert np.mean(images[0]) < np.mean(images[9])


def test_a_wrong_archive_names_the_file_and_both_checksums(tmp_path):
    path, size, digest = write_archive(tmp_path / "manual", per_class=1, test_per_class=1)
    result = run_cli("finetune", "--dataset", "cifar10", "--tfds-manual-dir", tmp_path / "manual", "--tfds-data-dir",
                     tmp_path / "tfds", *OPTIONS, "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert f"{path} is not the file tensorflow-datasets expects for 'cifar10': its SHA-256 is {digest}" in result.output
    assert "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd" in result.output
    assert not os.path.exists(tmp_path / "tfds" / "cifar10" / "3.0.2" / "dataset_info.json")


def test_a_manual_dir_without_the_archive_says_which_file(tmp_path):
    (tmp_path / "manual").mkdir()
    result = run_cli("finetune", "--dataset", "cifar10", "--tfds-manual-dir", tmp_path / "manual", *OPTIONS,
                     "--tfds-data-dir", tmp_path / "tfds", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert "lacks what tensorflow-datasets downloads for 'cifar10': cifar-10-binary.tar.gz (from https://" in result.output

