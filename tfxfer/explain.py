"""Grad-CAM heat-maps (Selvaraju et al. 2017): where a fine-tuned network looked.

The map of class c over the backbone's last feature map A (a CNN's last
convolutional stage, or a transformer's patch tokens laid out on their grid):
ReLU(sum_k alpha_k A_k), with alpha_k the spatial mean of d y_c / d A_k, where
y_c is the class's logit (the head before its softmax). The map is upsampled
to the image and scaled to [0, 1].
"""

import os

import numpy as np
import tensorflow as tf

import tfxfer.model  # noqa: F401  (registers TransferModel for load_model)
from tfxfer.backbones import get_backbone
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
    if getattr(model, "probe", None) == "knn":
        # Grad-CAM weighs a feature map by a class logit's gradient; a k-NN head's votes have no logit.
        raise TfxferError("Grad-CAM follows the gradient of a class logit, and a knn probe votes by its nearest "
                          "training images instead; explain a run with a dense head (linear, head or any fine-tuning).")
    to_features, after, to_grid = _split_at_last_feature_map(model)
    images = tf.convert_to_tensor(images)
    features = to_features(model.preprocess(images))
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = model.pool(tf.cast(after(features), model.head.kernel.dtype))
        logits = tf.matmul(pooled, model.head.kernel) + model.head.bias
        if class_ids is None:
            class_ids = tf.argmax(logits, axis=1, output_type=tf.int32)
        chosen = tf.gather(logits, tf.cast(class_ids, tf.int32), axis=1, batch_dims=1)
    probabilities = tf.nn.softmax(logits).numpy()
    gradients = to_grid(tf.cast(tape.gradient(chosen, features), tf.float32))
    alphas = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(alphas * to_grid(tf.cast(features, tf.float32)), axis=-1))
    size = int(images.shape[1])
    cams = tf.image.resize(cams[..., None], (size, size), method="bilinear")[..., 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1)
    # A map that is zero everywhere (no positive evidence) stays zero.
    return cams / np.where(peak > 0, peak, 1.0)[:, None, None], probabilities


def _split_at_last_feature_map(model):
    """`(to_features, after, to_grid)`: the backbone up to its last feature
    map, the rest of it, and what lays that map out as `[N, H, W, channels]`
    (identity for a CNN's map; patch tokens onto their grid for a transformer)."""
    import keras

    backbone = model.backbone
    if any(layer.name == "hub" for layer in backbone.layers):
        return _split_at_last_tokens(model)
    if len(backbone.output.shape) == 4:
        return _inference(backbone), lambda x: x, lambda x: x
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    # Tokens pooled inside a backbone that is not a KerasHub one: no grid is known for
    # them, and the only 4-D tensors before them are the image and its patch embedding,
    # where Grad-CAM is gradient times pixels, not where the model looked.
    if len(backbone.output.shape) == 3 or any(len(layer.output.shape) == 3 for layer in layers):
        raise TfxferError(f"Grad-CAM needs a feature map or patch tokens on a known grid, and {model.backbone_name} "
                          "has neither; explain a run of a CNN or KerasHub backbone such as resnet50 or vit_b16.")
    maps = [layer for layer in layers if len(layer.output.shape) == 4]
    if not maps:
        raise TfxferError(f"Grad-CAM needs a feature map, and {model.backbone_name}'s output is a vector with no "
                          "convolutional stage before it; use a CNN backbone.")
    last = maps[-1].output
    return _inference(keras.Model(backbone.inputs, last)), keras.Model(last, backbone.output), lambda x: x


def _inference(network):
    return lambda x: network(x, training=False)


def _split_at_last_tokens(model):
    """`_split_at_last_feature_map` of a KerasHub backbone: its embedding,
    blocks and final layers run one by one, in the order its family lists
    them, cut where the pooled vector last reads the patch tokens."""
    import keras

    family = get_backbone(model.backbone_name).builder.family
    backbone, hub, size = model.backbone, model.backbone.get_layer("hub"), int(model.image_size)
    layers, blocks = [layer for layer, _ in family.units(backbone)], family.blocks(hub)
    # Swin's mean reads every output token, and SigLIP's attention-pooling head (its last
    # layer) the tokens after the final norm: the map is of the tokens they read, as a CNN's
    # is of its last stage. A class token is pooled alone after the final norm, which works
    # token by token, so there the patch tokens have zero gradient: they reach the class
    # token through the last block's attention, and the map is of that block's input.
    cut = {"mean": len(layers), "pooled": len(layers) - 1}.get(family.pool, layers.index(blocks[-1]))
    config = hub.get_config()
    extra = {}
    if getattr(hub, "rope_embedding", None) is not None:  # DINOv3's blocks also take where each patch sits
        extra = {"position_embeddings": hub.rope_embedding(tf.zeros((1, size, size, 3))),
                 "num_prefix_tokens": 1 + config.get("num_register_tokens", 0)}
    # The wrapper's own pooling, from the backbone's tokens to its vector: the wrapper with
    # its backbone replaced by a layer that passes the tokens on.
    tokens_in = keras.layers.Lambda(lambda x: next(iter(x.values())) if isinstance(x, dict) else x)
    pool = keras.models.clone_model(backbone, input_tensors=keras.Input(hub.output.shape[1:]),
                                    clone_function=lambda layer: tokens_in if layer is hub else layer)

    def run(part, x):
        for layer in part:
            x = layer(x, training=False, **(extra if any(layer is block for block in blocks) else {}))
            x = x[0] if isinstance(x, (tuple, list)) else x  # DeiT's blocks also return attention scores
        return x

    def to_tokens(x):
        tokens = run(layers[:cut], x)
        # A family whose forward pass is more than its layers in a row (a new KerasHub
        # version, say) would give a map of another network: refused, not drawn.
        expected = np.asarray(backbone(x, training=False), np.float32)
        if not np.allclose(np.asarray(pool(run(layers[cut:], tokens)), np.float32), expected, rtol=1e-3,
                           atol=1e-3 * max(1.0, float(np.abs(expected).max()))):
            raise TfxferError(f"Grad-CAM could not retrace {model.backbone_name}'s layers one by one (they give "
                              "another output than the backbone); explain a run of a CNN backbone or of vit_b16.")
        return tokens

    side = _patch_grid(config, size)

    def to_grid(tokens):
        # KerasHub puts the class token, DeiT's distillation token and the register tokens
        # before the patches, which follow in row-major order.
        patches = tokens[:, int(tokens.shape[1]) - side * side:]
        return tf.reshape(patches, (-1, side, side, int(tokens.shape[-1])))

    return to_tokens, (lambda tokens: pool(run(layers[cut:], tokens))), to_grid


def _patch_grid(config, size):
    """The side of the patch grid of a KerasHub backbone's last tokens, for `size`-pixel images."""
    patch = config["patch_size"]
    side = size // (patch[0] if isinstance(patch, (list, tuple)) else patch)
    # Swin merges each 2x2 patches into one after every stage but the last.
    return side // 2 ** (len(config.get("depths", ())) - 1) if "depths" in config else side


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
