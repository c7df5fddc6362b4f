"""Predict and evaluate with exported SavedModels (and with ImageNet-head backbones).

Everything here goes through the exported SavedModel, the artifact that is
served, so a reported number is the number a client would get.
"""

import glob
import os

import numpy as np
import tensorflow as tf

from tfxfer.data.images import not_an_image
from tfxfer.errors import TfxferError, is_network_failure
from tfxfer.export.layout import find_export, load_export

__all__ = ["find_export", "load_export", "expand_inputs", "predict_files", "predict_imagenet", "evaluate_export"]


def expand_inputs(inputs):
    """Files from `inputs`: files as given, folders walked (sorted, no hidden
    files), glob patterns (`**` too) matched. A pattern that matches nothing
    stays, so that it is reported."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif not os.path.exists(item) and any(c in item for c in "*?["):
            files.extend(sorted(glob.glob(item, recursive=True)) or [item])
        else:
            files.append(item)
    return files


# Files sent to serve_bytes at once; a batch with a bad file is retried one by one.
PREDICT_BATCH = 32


def predict_files(model_path, inputs, top=5, version=None):
    """One dict per file of `inputs` (see `expand_inputs`): `{"file", "top":
    [(class name, probability), ...]}`, or `{"file", "error"}` for a file
    that cannot be read or is not an image. The other files are predicted.
    `version` picks a run's SavedModel version (`find_export`)."""
    loaded, metadata = load_export(model_path, need_tfxfer=True, version=version)
    serve = loaded.signatures["serve_bytes"]
    names = metadata["class_names"]

    def ranked(path, probabilities):
        order = np.argsort(probabilities)[::-1][:top]
        return {"file": path, "top": [(names[i], float(probabilities[i])) for i in order]}

    results = []
    files = expand_inputs(inputs)
    for start in range(0, len(files), PREDICT_BATCH):
        chunk, data = [], []
        for path in files[start:start + PREDICT_BATCH]:
            try:
                data.append(_read(path))
                chunk.append(path)
            except TfxferError as e:
                results.append({"file": path, "error": str(e)})
        try:
            batch = serve(image_bytes=tf.constant(data))["probabilities"].numpy() if data else []
            results.extend(ranked(p, row) for p, row in zip(chunk, batch))
        except tf.errors.InvalidArgumentError:
            for path, one in zip(chunk, data):
                try:
                    results.append(ranked(path, serve(image_bytes=tf.constant([one]))["probabilities"].numpy()[0]))
                except tf.errors.InvalidArgumentError:
                    results.append({"file": path, "error": not_an_image(path, one)})
    order = {path: i for i, path in enumerate(files)}
    return sorted(results, key=lambda r: order.get(r["file"], len(files)))


def predict_imagenet(backbone, weights, files, top=5):
    """Top-`top` ImageNet classes from a backbone with its 1000-class ImageNet head."""
    from keras.applications import imagenet_utils

    from tfxfer.backbones import KERAS_CACHE, get_backbone
    from tfxfer.data.images import decode_image, resize_uint8

    spec = get_backbone(backbone)
    size = spec.default_size
    try:
        if weights == "imagenet":
            model = spec.builder(weights="imagenet", include_top=True)
        else:
            model = spec.builder(weights=None, include_top=True)
            model.load_weights(weights)
        images = np.stack([resize_uint8(decode_image(_read(p)), size).numpy() for p in files]).astype("float32")
        probabilities = model.predict(spec.preprocess(images), verbose=0)
        decoded = imagenet_utils.decode_predictions(probabilities, top=top)
    except Exception as e:
        if not is_network_failure(e):
            raise
        raise TfxferError(
            "Could not download the ImageNet weights or class index (no network?); "
            f"put them in {KERAS_CACHE} or pass --model with a fine-tuned run."
        ) from None
    return [[(name, float(p)) for _, name, p in row] for row in decoded]


def tta_views(images, mode):
    """The test-time views of a batch of uint8 images [N, S, S, 3]: itself and
    its mirror image (`flip`), and with `flip_crop` also four crops shifted by
    S/8 (reflect-padded, as training's pad-and-crop) and their mirror images."""
    views = [images]
    if mode == "flip_crop":
        size = int(images.shape[1])
        pad = max(1, size // 8)
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        for dy, dx in ((0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad)):
            views.append(padded[:, dy:dy + size, dx:dx + size])
    return views + [tf.image.flip_left_right(v) for v in views]


def evaluate_export(model_path, dataset=None, data_dir=None, split="test", batch_size=64, top_k=5, tta="none",
                    version=None, **data_args):
    """Evaluate an exported model on a split; returns `(report, export_dir,
    rows)`, where `rows` are `tfxfer.evaluation.prediction_rows`: one per
    image, with its file (or `<data>:<split>:<index>` for arrays and tfds).

    With `tta` (`flip` or `flip_crop`), `report["tta"]` holds the accuracy,
    loss and calibration of the probabilities averaged over `tta_views`, and
    the gain over the plain accuracy; the rest of the report is plain.
    `version` picks a run's SavedModel version (`find_export`)."""
    from tfxfer.evaluation import TTA_MODES, classification_report, prediction_rows

    loaded, metadata = load_export(model_path, need_tfxfer=True, version=version)
    size = metadata["image_size"]
    chosen, items, info = evaluation_split(size, split, batch_size, dataset=dataset, data_dir=data_dir,
                                           model_classes=metadata["class_names"], **data_args)
    if list(info.class_names) != list(metadata["class_names"]):
        raise TfxferError(
            f"The data's classes ({', '.join(info.class_names)}) differ from the model's "
            f"({', '.join(metadata['class_names'])}); evaluate on data with the model's classes."
        )
    if tta not in TTA_MODES:
        raise TfxferError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}.")
    serve = loaded.signatures["serving_default"]
    labels, probabilities, averaged = [], [], []
    for images, y in chosen.as_numpy_iterator():
        probabilities.append(serve(images=tf.constant(images))["probabilities"].numpy())
        if tta != "none":
            views = tta_views(tf.constant(images), tta)
            averaged.append(np.mean([serve(images=v)["probabilities"].numpy() for v in views], axis=0))
        labels.append(y)
    labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)
    report = classification_report(labels, probabilities, info.class_names, top_k)
    report["split"], report["data"], report["preflight"] = split, info.name, info.preflight
    if tta != "none":
        with_tta = classification_report(labels, np.concatenate(averaged), info.class_names, top_k)
        report["tta"] = {
            "mode": tta, "views": len(tta_views(tf.zeros([1, size, size, 3], tf.uint8), tta)),
            "accuracy": with_tta["accuracy"], "gain": with_tta["accuracy"] - report["accuracy"],
            "loss": with_tta["loss"], "calibration": with_tta["calibration"],
        }
    files = items or [f"{info.name}:{split}:{i}" for i in range(len(labels))]
    return report, metadata["export_dir"], prediction_rows(files, labels, probabilities, info.class_names)


def evaluation_split(size, split, batch_size=64, dataset=None, data_dir=None, **data_args):
    """`(batched pipeline, image files or None, DatasetInfo)` of one split of
    the data that `evaluate`'s data options describe, in a fixed order; the
    data's pre-flight report is `info.preflight` (a leak fails unless `allow_leaks`)."""
    from tfxfer import preflight
    from tfxfer.data import load_splits
    from tfxfer.data.pipeline import build_pipeline
    from tfxfer.data.splits import SPLIT_NAMES

    data_args = dict(data_args)
    keys = (data_args.pop("tfrecord_image_key", "image"), data_args.pop("tfrecord_label_key", "label"))
    data_args["csv_columns"] = (data_args.pop("csv_path_column", "path"), data_args.pop("csv_label_column", "label"))
    allow_leaks = data_args.pop("allow_leaks", False)
    splits, info = load_splits(dataset, data_dir, image_size=size, tfrecord_keys=keys, **data_args)
    info.preflight = preflight.check(splits, info, allow_leaks)
    key = SPLIT_NAMES.get(split.lower())
    if key not in splits:
        raise TfxferError(f"{info.name} has no {split!r} split here; choose --split test, val or train.")
    pipeline = build_pipeline(splits[key], size, batch_size, training=False, seed=data_args.get("seed", 0))
    return pipeline, info.files.get(key), info


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TfxferError(f"Cannot read image {path!r}: {e.strerror}.") from None
