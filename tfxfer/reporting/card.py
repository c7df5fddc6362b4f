"""`MODEL_CARD.md`: what an export is, written from what its run recorded.

Every fact comes from the run folder (`config.yaml`, `metrics.json`,
`backbone.json`) and the export's own `tfxfer.json`; nothing is asked of the
user. The sections follow Mitchell et al., "Model Cards for Model Reporting"
(2019), cut to what a fine-tuning run knows.
"""

import os

import yaml

from tfxfer import atomic
from tfxfer.preflight import findings
from tfxfer.backbones import get_backbone
from tfxfer.errors import TfxferError

__all__ = ["CARD_FILE", "model_card", "write_model_card"]

CARD_FILE = "MODEL_CARD.md"
# What a reader must know about a licence beyond its name.
_LICENCE_NOTES = {
    "DINOv3 License": "Meta's own licence for the DINOv3 weights, not Apache-2.0: its terms bind this export, "
                      "which is derived from them; read them before you share or ship it",
}


def write_model_card(run_dir, export_dir, format="saved_model", precision="float32", metrics=None, quantized=None):
    """Write `MODEL_CARD.md` into `export_dir` for the finetune run `run_dir`
    (with `metrics`, or its `metrics.json`)."""
    path = os.path.join(export_dir, CARD_FILE)
    atomic.write_text(path, model_card(run_dir, format, precision, metrics, quantized))
    return path


def _head(transfer, classes, metrics):
    if transfer.get("probe") == "knn":
        return (f"- New head: a k-NN vote over the {classes} classes (no backbone weight trained): the {transfer.get('knn_k')} "
                "training images whose features are most cosine-similar vote with weight exp(similarity / "
                f"{transfer.get('knn_temperature')}); the training features it compares with are inside the model.")
    how = "fitted by logistic regression on the backbone's features" if transfer.get("probe") == "linear" else ""
    return (f"- New head: one dense softmax layer over the {classes} classes{', ' + how if how else ''}; "
            f"{_count(metrics.get('trainable_params'))} parameters trained, {_count(metrics.get('frozen_params'))} frozen.")


def model_card(run_dir, format="saved_model", precision="float32", metrics=None, quantized=None):
    """The Markdown text of the model card of the finetune run `run_dir`; `quantized`, for a
    quantized export, is how it scored: `{"quantize", "split", "images", "accuracy", "float_accuracy"}`."""
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    if metrics is None:
        metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    backbone = _read_json(os.path.join(run_dir, "backbone.json"))
    data, model, transfer, optim, run = (config.get(k, {}) for k in ("data", "model", "transfer", "optim", "run"))
    source = backbone.get("source", {})
    classes = source.get("classes") or metrics.get("class_names") or []
    size = backbone.get("image_size") or model.get("image_size")

    origin = _pretrained_on(model.get("backbone"), model.get("weights"))
    lines = [f"# Model card: {run.get('run_name') or os.path.basename(os.path.abspath(run_dir))}", ""]
    lines += [
        f"An image classifier over {len(classes)} classes, fine-tuned with tfxfer from the run folder "
        f"`{os.path.basename(os.path.abspath(run_dir))}`. This card is written from what that run recorded.", "",
        "## Model", "",
        f"- Backbone: `{model.get('backbone')}`, weights from `{_weights(model.get('weights'))}`"
        + (f" ({origin})" if origin else "") + ".",
        *_licence(model.get("backbone"), model.get("weights")),
        _head(transfer, len(classes), metrics),
        f"- This export: {format}, computing in {precision}.",
        "",
        "## Intended input and output", "",
        f"- Input: RGB images as uint8 pixels (0-255), of any size; the model resizes them to {size}x{size} and "
        "applies its backbone's preprocessing inside, so callers send raw pixels and nothing else.",
        "- Output: one probability per class, in this order: " + ", ".join(f"`{c}`" for c in classes) + ".",
    ]
    if format == "saved_model":
        lines.append("- Signatures: `serving_default` takes uint8 images [N, H, W, 3]; `serve_bytes` takes encoded "
                     "JPEG, PNG, BMP, GIF or WebP files [N].")
    lines += ["", "## Training data", ""]
    lines.append(f"- Source: `{source.get('data') or _data_name(data)}`"
                 + (f", classes selected: {', '.join(source['classes_selected'])}" if source.get("classes_selected") else "")
                 + ".")
    counts = metrics.get("num_examples") or source.get("num_images") or {}
    if counts:
        lines.append("- Images: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ".")
    if metrics.get("class_counts"):
        lines.append("- Training images per class: "
                     + ", ".join(f"{c} {n:,}" for c, n in zip(classes, metrics["class_counts"])) + ".")
    selection = []
    if data.get("labels_per_class"):
        selection.append(f"a seeded sample of {data['labels_per_class']} labelled images per class")
    if data.get("max_train_examples"):
        selection.append(f"a seeded sample of {data['max_train_examples']} training images")
    if data.get("folds"):
        selection.append(f"validation is fold {data.get('fold', 0)} of {data['folds']}")
    elif counts and "val" in counts:
        selection.append(f"validation carved per class from train ({data.get('val_fraction')}) unless the source has its own")
    if selection:
        lines.append(f"- Selection (seed {run.get('seed', 0)}): " + "; ".join(selection) + ".")
    skipped = (metrics.get("skipped_files") or {}).get("count", 0)
    lines.append(f"- Unreadable files skipped: {skipped}" + (" (listed in the run's metrics.json)." if skipped else "."))
    if metrics.get("preflight"):
        found = findings(metrics["preflight"])
        lines.append("- Data pre-flight (exact duplicates by content, leaks, labels, class sizes): "
                     + ("; ".join(found) if found else "nothing found") + ".")

    lines += ["", "## Recipe", ""]
    policy = transfer.get("strategy") or transfer.get("unfreeze") or transfer.get("freeze")
    lines.append(f"- Trained part: `{policy}`; BatchNorm `{transfer.get('train_bn')}`; L2-SP alpha "
                 f"{transfer.get('l2sp')}; dropout {transfer.get('dropout')}; label smoothing {transfer.get('label_smoothing')}.")
    lines.append(f"- Optimizer {optim.get('optimizer')}, learning rate {optim.get('lr')} ({optim.get('schedule')}), "
                 f"weight decay {optim.get('weight_decay')}, batch {optim.get('batch_size')}, "
                 f"epochs run {metrics.get('epochs', optim.get('epochs'))} (best: {metrics.get('best_epoch')}, by "
                 f"{transfer.get('monitor')}); augmentation `{data.get('augment')}`; trained in "
                 f"{metrics.get('precision') or run.get('precision')}.")
    extras = []
    if transfer.get("lr_decay", 1.0) != 1.0:
        extras.append(f"layer-wise LR decay {transfer['lr_decay']}")
    if transfer.get("ema"):
        extras.append(f"weight EMA {transfer['ema']}")
    if extras:
        lines.append("- Also: " + ", ".join(extras) + ".")
    lines.append("- The run's `config.yaml` holds every setting; `tfxfer finetune --config config.yaml` repeats it.")

    lines += ["", "## Evaluation", ""]
    split = "test" if "test" in metrics else "val"
    report = metrics.get(split)
    if report:
        where = "the test split" if split == "test" else "the validation split (the data has no test split)"
        lines.append(f"On {where}, {report['num_examples']:,} images:")
        lines.append("")
        lines.append(f"- Accuracy {report['accuracy']:.4f}"
                     + (f", top-{report['top_k']['k']} {report['top_k']['accuracy']:.4f}" if "top_k" in report else "")
                     + f", loss {report['loss']:.4f}, macro recall {report['macro']['recall']:.4f}, macro F1 "
                     f"{report['macro']['f1']:.4f}.")
        if "calibration" in report:
            lines.append(f"- Expected calibration error {report['calibration']['ece']:.4f} (15 bins).")
        if metrics.get("calibration"):
            c = metrics["calibration"]
            lines.append(f"- Probabilities are temperature-scaled (T = {c['temperature']:.3f}, fitted on validation); "
                         f"ECE on {split} before {c.get(split + '_ece_before', float('nan')):.4f}, after "
                         f"{c.get(split + '_ece_after', float('nan')):.4f}.")
        lines += ["", "| class | precision | recall | support |", "|---|---|---|---|"]
        for name in report["class_names"]:
            m = report["per_class"][name]
            lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['support']} |")
    else:
        lines.append("No evaluation was recorded.")
    if quantized:
        scored = "test split" if quantized["split"] == "test" else "validation split (the data has no test split)"
        lines += ["", f"This {quantized['quantize']}-quantized export itself, on {quantized['images']:,} images of the "
                      f"{scored}: accuracy {quantized['accuracy']:.4f}, against {quantized['float_accuracy']:.4f} for "
                      "the float32 model."]

    lines += [
        "", "## Known limits", "",
        f"- It knows only its {len(classes)} classes. Every image gets probabilities over them: an image of "
        "anything else is still given one of them, often with high confidence.",
        "- Its figures hold for data like its test split, which came from the same source as its training images; "
        "expect lower accuracy elsewhere (other cameras, lighting, framing).",
        f"- Small details can be lost: images are resized to {size}x{size} before anything else.",
        "- EXIF orientation: "
        + ("`serve_bytes` turns JPEGs upright by their EXIF tag, as training did; callers of `serving_default` "
           "must decode and turn images upright themselves." if format == "saved_model" else
           "this format takes pixels, so callers must decode images and turn JPEGs upright by their EXIF tag "
           "themselves, as training did."),
    ]
    if quantized:
        lines.append(f"- Quantized to {quantized['quantize']}, its probabilities are held to no tolerance; its accuracy "
                     "against the float32 model's is measured instead (above).")
    elif precision != "float32":
        lines.append(f"- Computing in {precision}, probabilities differ from the float32 model by up to "
                     "the tolerance in `tfxfer.json`.")
    return "\n".join(lines) + "\n"


def _read_json(path):
    return atomic.read_json(path) if os.path.exists(path) else {}


def _weights(weights):
    if weights and os.path.sep in str(weights):
        return os.path.basename(os.path.normpath(weights))
    return weights


def _pretrained_on(backbone, weights):
    if weights in ("imagenet",) and backbone:
        try:
            return get_backbone(backbone).source
        except TfxferError:  # a name registered in another process: the card still gets written
            return ""
    if weights == "none":
        return "random initialization"
    return ""


def _licence(backbone, weights):
    """The card's line on the licence of the pretrained weights it starts from; none from random initialization."""
    if weights in (None, "none") or not backbone:
        return []
    try:
        licence = get_backbone(backbone).licence
    except TfxferError:  # a name registered in another process
        return []
    if not licence:
        return []
    note = _LICENCE_NOTES.get(licence)
    return [f"- Licence of the pretrained backbone weights: {licence}" + (f" ({note})." if note else ".")]


def _data_name(data):
    for key in ("dataset", "data_dir", "csv", "tfrecord"):
        if data.get(key):
            return os.path.basename(os.path.normpath(str(data[key])))
    return "?"


def _count(n):
    return f"{n:,}" if isinstance(n, int) else "?"
