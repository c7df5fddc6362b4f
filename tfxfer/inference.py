"""Predict and evaluate with exported SavedModels (and with ImageNet-head backbones).

Everything here goes through the exported SavedModel, the artifact that is
served, so a reported number is the number a client would get.
"""

import json
import os

import numpy as np
import tensorflow as tf

from tfxfer.errors import TfxferError, is_network_failure
from tfxfer.export import versions

__all__ = ["find_export", "load_export", "predict_files", "predict_imagenet", "evaluate_export"]

METADATA = "tfxfer.json"


def find_export(path):
    """The SavedModel folder for a run folder, its `export/` folder, or a version folder."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for root in (os.path.join(path, "export"), path):
        numbered = versions(root)
        if numbered:
            return os.path.join(root, str(max(numbered)))
    raise TfxferError(f"No SavedModel under {path!r}; pass a run folder (saved_models/<run>) or an export folder.")


def load_export(path):
    """`(loaded SavedModel, metadata dict)` for `path` (see `find_export`)."""
    export_dir = find_export(path)
    loaded = tf.saved_model.load(export_dir)
    metadata_path = os.path.join(export_dir, METADATA)
    metadata = {}
    if os.path.exists(metadata_path):
        with open(metadata_path) as f:
            metadata = json.load(f)
    metadata["export_dir"] = export_dir
    return loaded, metadata


def predict_files(model_path, files, top=5):
    """Top-`top` `(class name, probability)` lists for image `files`, one per file."""
    loaded, metadata = load_export(model_path)
    serve = loaded.signatures["serve_bytes"]
    names = metadata.get("class_names")
    results = []
    for path in files:
        probabilities = serve(image_bytes=tf.constant([_read(path)]))["probabilities"].numpy()[0]
        order = np.argsort(probabilities)[::-1][:top]
        results.append([(names[i] if names else str(i), float(probabilities[i])) for i in order])
    return results


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


def evaluate_export(model_path, dataset=None, data_dir=None, split="test", batch_size=64, **data_args):
    """Evaluate an exported model on a split; returns `(report, export_dir)`."""
    from tfxfer.data import load_dataset
    from tfxfer.evaluation import classification_report

    loaded, metadata = load_export(model_path)
    if "image_size" not in metadata:
        raise TfxferError(f"{metadata['export_dir']} has no {METADATA}; it was not exported by tfxfer.")
    train, val, test, info = load_dataset(
        dataset, data_dir, image_size=metadata["image_size"], batch_size=batch_size, **data_args
    )
    chosen = {"train": train, "val": val, "validation": val, "test": test}.get(split)
    if chosen is None:
        raise TfxferError(f"{info.name} has no {split!r} split here; choose --split test, val or train.")
    if list(info.class_names) != list(metadata["class_names"]):
        raise TfxferError(
            f"The data's classes ({', '.join(info.class_names)}) differ from the model's "
            f"({', '.join(metadata['class_names'])}); evaluate on data with the model's classes."
        )
    serve = loaded.signatures["serving_default"]
    labels, probabilities = [], []
    for images, y in chosen.as_numpy_iterator():
        probabilities.append(serve(images=tf.constant(images))["probabilities"].numpy())
        labels.append(y)
    report = classification_report(np.concatenate(labels), np.concatenate(probabilities), info.class_names)
    report["split"], report["data"] = split, info.name
    return report, metadata["export_dir"]


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TfxferError(f"Cannot read image {path!r}: {e.strerror}.") from None
