"""`tensorflow-datasets` image-classification datasets, by name."""

import contextlib
import os

import numpy as np
import tensorflow as tf

from tfxfer.data.images import to_rgb
from tfxfer.data.splits import Split
from tfxfer.errors import TfxferError, did_you_mean, is_network_failure

__all__ = ["tfds_dataset"]


def tfds_dataset(name, data_dir, train_split="train", val_split=None, test_split=None, slice_fraction=None, known=(),
                 manual_dir=None):
    """`(splits, class names)` of the tfds dataset `name`.

    Without a validation split, `slice_fraction` carves one from the end of train
    with tfds's own slicing (no pass over the data); otherwise `load_dataset`
    carves it per class after reading the labels.

    `manual_dir` holds the files tfds would download (for cifar10,
    `cifar-10-binary.tar.gz`), placed there by hand: tfds's own builder
    prepares the dataset from them, checksums checked, with no network.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise did_you_mean(name, list(known) + tfds.list_builders(), "dataset") from None
    download_config = None
    if manual_dir is not None and not builder.is_prepared():
        _check_manual_files(builder, name, manual_dir)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        with _few_download_retries():
            builder.download_and_prepare(download_config=download_config)
    except Exception as e:
        if not is_network_failure(e):
            raise
        where = data_dir or "~/tensorflow_datasets"
        if manual_dir is not None:
            raise TfxferError(
                f"tensorflow-datasets still had to download part of {name!r} (no network?); put every file that "
                f"tfds's checksum list for {name!r} names in --tfds-manual-dir {manual_dir}."
            ) from None
        raise TfxferError(
            f"Could not download the tensorflow-datasets data for {name!r} into {where} (no network?); "
            "pass --tfds-data-dir with a folder where it is already prepared, or --data-dir with an image folder."
        ) from None
    image_key, label_key = _image_and_label(builder.info, name)
    class_names = list(builder.info.features[label_key].names)
    available = set(builder.info.splits.keys())
    for split in (train_split, val_split, test_split):
        _check_split(split, available, name)

    if val_split is None and "validation" in available:
        val_split = "validation"
    if val_split is None and slice_fraction:
        # The same examples every time, disjoint from the training slice.
        keep = int(round(100 * (1 - slice_fraction)))
        train_split, val_split = f"{train_split}[:{keep}%]", f"{train_split}[{keep}%:]"
    if test_split is None and "test" in available:
        test_split = "test"

    splits = {}
    for key, split in (("train", train_split), ("val", val_split), ("test", test_split)):
        if split is None:
            continue
        try:
            ds = builder.as_dataset(split=split, shuffle_files=False)
        except (KeyError, ValueError) as e:
            raise TfxferError(f"Split {split!r} of {name!r} is not valid ({e}); its splits are: {', '.join(sorted(available))}.") from None
        records = ds.map(lambda ex: (to_rgb(ex[image_key]), ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE)
        splits[key] = Split(
            _count(builder, split, ds), records=records, read_labels=_label_reader(builder, split, image_key, label_key)
        )
    return splits, class_names


def _check_manual_files(builder, name, manual_dir):
    """Every file `builder` downloads is in `manual_dir`, with the checksum tfds
    registered for it; else one sentence naming the file (and both checksums)."""
    from tensorflow_datasets.core.download import checksums

    if not os.path.isdir(manual_dir):
        raise TfxferError(f"--tfds-manual-dir {manual_dir!r} is not a folder.")
    expected = builder.url_infos or {}
    present = {url: info for url, info in expected.items() if os.path.isfile(os.path.join(manual_dir, info.filename))}
    if expected and not present:
        # A checksum list may name files of several configs or versions; with none of them here, nothing can work.
        wanted = "; ".join(f"{info.filename} (from {url})" for url, info in expected.items())
        raise TfxferError(f"--tfds-manual-dir {manual_dir!r} lacks what tensorflow-datasets downloads for {name!r}: "
                          f"{wanted}; copy it there from a machine with network.")
    for url, info in present.items():
        path = os.path.join(manual_dir, info.filename)
        got = checksums.compute_url_info(path)
        if got.checksum != info.checksum:
            raise TfxferError(
                f"{path} is not the file tensorflow-datasets expects for {name!r}: its SHA-256 is {got.checksum} "
                f"({got.size} bytes), tfds registered {info.checksum} ({info.size} bytes) for {url}."
            )


def _check_split(split, available, name):
    """A split name (with tfds slicing or `+`) whose every part names a split of the dataset."""
    for part in (split or "").split("+"):
        base = part.split("[")[0].strip()
        if base and available and base not in available:
            raise TfxferError(f"{name!r} has no split {base!r}; its splits are: {', '.join(sorted(available))}.")


def _label_reader(builder, split, image_key, label_key):
    """Every record's label in order, read without decoding a single image."""
    import tensorflow_datasets as tfds

    def read():
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
        batches = ds.map(lambda ex: ex[label_key]).batch(8192).as_numpy_iterator()
        chunks = list(batches)
        return np.concatenate(chunks) if chunks else np.array([], np.int64)

    return read


def _count(builder, split, ds):
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        # Split metadata is missing (as in tfds's mock data): count by reading.
        return int(ds.reduce(0, lambda n, _: n + 1))


def _image_and_label(info, name):
    import tensorflow_datasets as tfds

    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        features = info.features
        image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    ok = (
        image_key in info.features
        and label_key in info.features
        and isinstance(info.features[image_key], tfds.features.Image)
        and isinstance(info.features[label_key], tfds.features.ClassLabel)
    )
    if not ok:
        raise TfxferError(f"tensorflow-datasets {name!r} has no image and class-label features; tfxfer needs an image-classification dataset.")
    return image_key, label_key


@contextlib.contextmanager
def _few_download_retries(retries=2):
    """tfds retries a refused connection 10 times with exponential backoff: about
    3.5 minutes (measured) before an offline user learns anything. Use fewer."""
    from tensorflow_datasets.core.download import downloader

    saved = getattr(downloader, "MAX_RETRIES", None)
    if saved is not None:
        downloader.MAX_RETRIES = min(saved, retries)
    try:
        yield
    finally:
        if saved is not None:
            downloader.MAX_RETRIES = saved
