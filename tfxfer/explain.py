"""Grad-CAM heat-maps (Selvaraju et al. 2017): where a fine-tuned CNN looked.

The map of class c over the backbone's last feature map A (its last
convolutional stage): ReLU(sum_k alpha_k A_k), with alpha_k the spatial mean of
d y_c / d A_k, where y_c is the class's logit (the head before its softmax).
The map is upsampled to the image and scaled to [0, 1].
"""

import os

import numpy as np
import tensorflow as tf

import tfxfer.model  # noqa: F401  (registers TransferModel for load_model)
from tfxfer.data.images import decode_image, not_an_image, resize_uint8
from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.inference import evaluation_split, expand_inputs
from tfxfer.reporting import plots

__all__ = ["grad_cam", "load_run_model", "explain_files", "explain_mistakes"]


def load_run_model(run_dir):
    """The fine-tuned Keras model of a finetune run folder (its `model.keras`)."""
    import keras

    path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(path):
        raise TfxferError(f"{run_dir!r} has no model.keras; Grad-CAM needs the folder of a finished tfxfer finetune run.")
    return keras.models.load_model(path, compile=False)


def grad_cam(model, images, class_ids=None):
    """`(heat-maps [N, S, S] in [0, 1], probabilities [N, C])` of uint8
    `images` [N, S, S, 3] at the model's size, for `class_ids` [N] (default:
    each image's predicted class)."""
    to_features, after = _split_at_last_feature_map(model)
    images = tf.convert_to_tensor(images)
    features = to_features(model.preprocess(images), training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = model.pool(tf.cast(after(features), model.head.kernel.dtype))
        logits = tf.matmul(pooled, model.head.kernel) + model.head.bias
        if class_ids is None:
            class_ids = tf.argmax(logits, axis=1, output_type=tf.int32)
        chosen = tf.gather(logits, tf.cast(class_ids, tf.int32), axis=1, batch_dims=1)
    probabilities = tf.nn.softmax(logits).numpy()
    gradients = tf.cast(tape.gradient(chosen, features), tf.float32)
    alphas = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(alphas * tf.cast(features, tf.float32), axis=-1))
    size = int(images.shape[1])
    cams = tf.image.resize(cams[..., None], (size, size), method="bilinear")[..., 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1)
    # A map that is zero everywhere (no positive evidence) stays zero.
    return cams / np.where(peak > 0, peak, 1.0)[:, None, None], probabilities


def _split_at_last_feature_map(model):
    """`(to_features, after)`: the backbone up to its last 4-D output (its last
    convolutional stage) and the rest of it (identity for a backbone that ends
    there; simplecnn's dense layer otherwise)."""
    import keras

    backbone = model.backbone
    if len(backbone.output.shape) == 4:
        return backbone, lambda x: x
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    # A transformer's tokens are pooled to a vector inside its backbone; the only 4-D
    # tensors before them are the image and its patch embedding, and Grad-CAM over
    # those is gradient times pixels, not where the model looked.
    if len(backbone.output.shape) == 3 or any(len(layer.output.shape) == 3 for layer in layers):
        raise TfxferError(f"Grad-CAM needs a convolutional feature map, and {model.backbone_name} is a token "
                          "(transformer) backbone; explain a run of a CNN backbone such as resnet50, resnet9 or simplecnn.")
    maps = [layer for layer in layers if len(layer.output.shape) == 4]
    if not maps:
        raise TfxferError(f"Grad-CAM needs a feature map, and {model.backbone_name}'s output is a vector with no "
                          "convolutional stage before it; use a CNN backbone.")
    last = maps[-1].output
    return keras.Model(backbone.inputs, last), keras.Model(last, backbone.output)


def explain_files(run_dir, inputs, output_dir, class_name=None, log=print):
    """Write `<name>.gradcam.png` into `output_dir` for each image file of
    `inputs` (files, folders, globs): the image, its heat-map for the
    predicted class (or `class_name`), and the class's probability. Returns
    `[{"file", "class", "probability", "png"} | {"file", "error"}]`."""

    model = load_run_model(run_dir)
    names = list(model.class_names or [str(i) for i in range(model.num_classes)])
    wanted = None
    if class_name is not None:
        if class_name not in names:
            raise did_you_mean(class_name, names, "class")
        wanted = names.index(class_name)
    size = int(model.image_size)
    os.makedirs(output_dir, exist_ok=True)
    results, taken = [], set()
    for path in expand_inputs(inputs):
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = resize_uint8(decode_image(tf.constant(data)), size).numpy()
        except OSError as e:
            results.append({"file": path, "error": f"cannot read {path}: {e.strerror}"})
            continue
        except tf.errors.InvalidArgumentError:
            results.append({"file": path, "error": not_an_image(path, data)})
            continue
        heatmaps, probabilities = grad_cam(model, image[None], None if wanted is None else [wanted])
        class_id = wanted if wanted is not None else int(probabilities[0].argmax())
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in taken:  # two images of one name from two folders: the parent folder tells them apart
            stem = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{stem}"
        while stem in taken:
            stem += "-"
        taken.add(stem)
        png = plots.heatmap(image, heatmaps[0], os.path.join(output_dir, stem + ".gradcam.png"),
                            f"{names[class_id]} {probabilities[0, class_id]:.2f}")
        results.append({"file": path, "class": names[class_id], "probability": float(probabilities[0, class_id]),
                        "png": png})
    return results


def explain_mistakes(model_path, rows, count, split, data, path):
    """`top_losses.png` at `path`: the `count` most confidently wrong of
    `rows` (`tfxfer.evaluation.prediction_rows` of `evaluate`, in the data's
    order), each with its Grad-CAM map for the class predicted."""

    model = load_run_model(model_path)
    names = list(model.class_names or [str(i) for i in range(model.num_classes)])
    wrong = sorted((i for i, r in enumerate(rows) if r["true"] != r["predicted"]), key=lambda i: -rows[i]["probability"])
    picked = wrong[:count]
    if not picked:
        return None
    data = {k: v for k, v in data.items() if k != "batch_size"}
    pipeline, _, _ = evaluation_split(int(model.image_size), split, 256, **data)
    wanted, images, start = set(picked), {}, 0
    for batch, _ in pipeline.as_numpy_iterator():
        for j in range(len(batch)):
            if start + j in wanted:
                images[start + j] = batch[j]
        start += len(batch)
        if len(images) == len(wanted):
            break
    ordered = np.stack([images[i] for i in picked])
    predicted = [names.index(rows[i]["predicted"]) for i in picked]
    heatmaps, _ = grad_cam(model, ordered, predicted)
    return plots.top_losses(
        ordered, [names.index(rows[i]["true"]) for i in picked], predicted, [rows[i]["probability"] for i in picked],
        [rows[i]["loss"] for i in picked], names, path, f"{len(picked)} most confidently wrong, with Grad-CAM",
        heatmaps=heatmaps,
    )
