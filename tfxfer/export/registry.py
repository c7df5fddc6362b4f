"""The export formats by name, and `export_run`: a run's model in a format,
checked against the run's float32 model on the same images."""

import dataclasses
import os
from typing import Callable

import numpy as np

import tfxfer.model  # noqa: F401  (registers TransferModel for load_model)
from tfxfer import atomic, runs
from tfxfer.config import load_config
from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.export.layout import METADATA_FILE, next_version_dir
from tfxfer.export.precision import at_precision, tolerance
from tfxfer.owned import check_export_target
from tfxfer.reporting.card import write_model_card
from tfxfer.runs import RunFolderLock
from tfxfer.runtime import replayed_on_failure

__all__ = ["ExportFormat", "FORMATS", "register_format", "get_format", "export_run", "disk_size"]

@dataclasses.dataclass
class ExportFormat:
    """One export format.

    Args:
        name: what `--format` takes.
        write: `write(model, folder, class_names) -> artifact path`; writes
            into `folder` (a new, empty folder).
        predict: `predict(artifact path, uint8 images [N, S, S, 3]) ->
            probabilities [N, C]`, in the format's own runtime.
        folder: the default folder under the run's `export/`; `None` for the
            numbered versions of TF Serving.
        inputs: what the artifact takes, for `tfxfer.json`.
        file: the file the format writes into its folder (`model.tflite`).
    """

    name: str
    write: Callable
    predict: Callable
    folder: str = None
    inputs: str = ""
    file: str = ""


FORMATS = {}


def register_format(spec):
    FORMATS[spec.name] = spec
    return spec


def get_format(name):
    if name not in FORMATS:
        raise did_you_mean(name, FORMATS, "export format")
    return FORMATS[name]


def export_run(run_dir, format="saved_model", output=None, log=print, precision="float32", quantize=None):
    """Export the best model of the finetune run `run_dir` as `format` (into
    `output`, default `run_dir/export/<format>/`, or the next numbered version
    for `saved_model`), computing in `precision` whatever precision trained
    it. Returns `(artifact path, max |probability difference| from the run's
    float32 model on 16 seeded images)`; over the precision's tolerance
    (`tfxfer.export.precision`: 1e-4 for float32) fails. The float32 model
    is `model.keras` built at float32, whatever versions `export/` holds.

    `quantize` (`int8` or `dynamic`, LiteRT only) writes
    `export/litert-<quantize>/`; int8 is calibrated on 300 of the run's
    training images. A quantized model is held to accuracy, not to the
    probability tolerance: its test accuracy (validation when the run has no
    test split) is measured against the float32 model's, and a drop of
    more than 2 points is printed as a warning.

    A run folder that another command holds (training, resuming) is refused."""

    lock = RunFolderLock(run_dir)
    try:
        free = not os.path.isdir(run_dir) or lock.try_acquire(create=False)
    except OSError:  # a read-only run folder, where nothing can be training
        free = True
    if not free:
        raise TfxferError(f"Run {run_dir} is in use by {lock.holder()}; export it once that command has finished.")
    try:
        return _export_run(run_dir, format, output, log, precision, quantize)
    finally:
        lock.release()


def _export_run(run_dir, format="saved_model", output=None, log=print, precision="float32", quantize=None):
    """`export_run` once the run folder is held."""

    spec = get_format(format)
    if quantize is not None and (format != "litert" or precision != "float32"):
        raise TfxferError("--quantize is for --format litert from the float32 model; export other formats without it.")
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.exists(model_path):
        raise TfxferError(f"{run_dir!r} has no model.keras; pass the folder of a finished tfxfer finetune run.")
    if output:
        _refuse_a_file_name(output, spec)
    export_root = os.path.join(run_dir, "export")
    default = spec.folder + (f"-{quantize}" if quantize else "") if spec.folder else None
    folder = os.path.abspath(output or (os.path.join(export_root, default) if default else next_version_dir(export_root)))
    check_export_target(folder, format)  # before any work: what tfxfer did not write is never replaced
    import keras

    allowed = tolerance(precision)
    trained = keras.models.load_model(model_path, compile=False)
    # The reference is never an earlier export, which may itself be at a reduced precision.
    reference = at_precision(trained, "float32")
    model = reference if precision == "float32" else at_precision(trained, precision)
    class_names = list(model.class_names or [str(i) for i in range(model.num_classes)])
    size = int(model.image_size)
    images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    expected, against = _probabilities(reference, images), "the run's float32 model (model.keras)"

    os.makedirs(os.path.dirname(folder), exist_ok=True)
    options, held = {}, {}
    if quantize:
        data = _run_data(run_dir)
        options = {"quantize": quantize, "calibration": _run_images(data, "train", CALIBRATION_IMAGES)[0]}
    with atomic.replacing(folder) as temporary:
        os.makedirs(temporary)
        # Converters and runtimes print their settings and progress: shown only if they fail.
        with replayed_on_failure():
            artifact = spec.write(model, temporary, class_names, **options)
            got = spec.predict(artifact, images)
            if quantize:
                held = _accuracy_against_float(data, artifact, spec, reference)
        difference = float(np.abs(got - expected).max())
        if not quantize and not difference <= allowed:
            raise TfxferError(
                f"The {format} export in {precision} differs from {against} by {difference:.2e} in probability "
                f"(over the {allowed:g} allowed); it was not kept. Please report this with the run's config.yaml."
            )
        metadata = {
            "format": format, "image_size": size, "class_names": class_names, "backbone": model.backbone_name,
            "inputs": spec.inputs, "outputs": "probabilities float32 [N, classes]",
            "precision": precision, "tolerance": None if quantize else allowed, "max_abs_difference": difference,
            "checked_against": against, "quantize": quantize, **held,
        }
        if format != "saved_model":  # the SavedModel writes its own tfxfer.json
            atomic.write_json(os.path.join(temporary, METADATA_FILE), metadata)
        write_model_card(run_dir, temporary, format, f"{precision}, {quantize}-quantized" if quantize else precision,
                         quantized={"quantize": quantize, **held} if quantize else None)
        name = os.path.relpath(artifact, temporary)
    artifact = os.path.join(folder, name) if name != "." else folder
    if quantize:
        scored, note = ("test", "") if held["split"] == "test" else ("validation", "; the run has no test split")
        log(f"{format} {quantize}: {artifact} ({disk_size(artifact) / 2**20:.2f} MiB); {scored} accuracy "
            f"{held['accuracy']:.4f} against {held['float_accuracy']:.4f} for the float32 model on "
            f"{held['images']} images ({100 * (held['accuracy'] - held['float_accuracy']):+.1f} points{note})")
        if held["float_accuracy"] - held["accuracy"] > MAX_QUANTIZED_DROP:
            log(f"warning: {quantize} quantization costs {100 * (held['float_accuracy'] - held['accuracy']):.1f} points "
                f"of {scored} accuracy (over {100 * MAX_QUANTIZED_DROP:.0f}); try --quantize dynamic, or serve "
                "the float model.")
        return artifact, difference
    log(f"{format}: {artifact} ({disk_size(artifact) / 2**20:.1f} MiB, {precision}); max |probability difference| "
        f"from {against} {difference:.1e} on 16 images (allowed: {allowed:g})")
    return artifact, difference


# Full-integer quantization calibrates activation ranges on this many training images.
CALIBRATION_IMAGES = 300
# A quantized export is measured on at most this many test images ...
CHECK_IMAGES = 2000
# ... and a loss of accuracy over this share is a warning.
MAX_QUANTIZED_DROP = 0.02


def _run_data(run_dir):
    """`(train, val, test, info)` pipelines of the run's own data, without augmentation, read once."""

    config = load_config(os.path.join(run_dir, "config.yaml"))
    try:
        return runs.load_data(config, log=lambda message: None, augment="none")[:4]
    except TfxferError as e:
        raise TfxferError(f"--quantize calibrates and checks on the run's own images, which did not load: {e}") from None


def _run_images(data, split, count):
    """`(images, labels)`: up to `count` uint8 images of a split of `data`
    (`_run_data`; test: validation when there is none). Training images come
    shuffled; from an evaluation split, every k-th image, so that a split
    stored class by class gives every class its share."""
    train, val, test, info = data
    key = split if split != "test" or test is not None else "val"
    chosen = {"train": train, "val": val, "test": test}[key]
    step = 1 if key == "train" else max(1, -(-info.num_examples[key] // count))
    images, labels, seen = [], [], 0
    for batch, y in chosen.as_numpy_iterator():
        keep = (np.arange(seen, seen + len(batch)) % step) == 0
        images.append(batch[keep])
        labels.append(y[keep])
        seen += len(batch)
        if key == "train" and seen >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _accuracy_against_float(data, artifact, spec, reference):
    """Accuracy of the artifact and of the float32 model `reference` on the run's test images (validation
    images when it has no test split; at most CHECK_IMAGES), and the split they came from."""
    split = "test" if data[2] is not None else "val"
    images, labels = _run_images(data, split, CHECK_IMAGES)
    ours, theirs = [], []
    for start in range(0, len(images), 64):
        batch = images[start:start + 64]
        ours.append(spec.predict(artifact, batch).argmax(axis=1))
        theirs.append(_probabilities(reference, batch).argmax(axis=1))
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    return {"accuracy": float((ours == labels).mean()), "float_accuracy": float((theirs == labels).mean()),
            "images": int(len(labels)), "split": split}


def _probabilities(model, images):
    """The Keras `model`'s probabilities of uint8 `images`, as the exports take them: pixels cast to float32."""
    return np.asarray(model(images.astype("float32"), training=False), dtype=np.float32)


def _refuse_a_file_name(output, spec):
    """`--output` names a folder: a name that ends as an export's file does (`model.tflite`) is refused."""
    name = os.path.basename(os.path.normpath(str(output)))
    stem, extension = os.path.splitext(name)
    if stem and extension.lower() in {os.path.splitext(f.file)[1] for f in FORMATS.values() if f.file}:
        folder = os.path.join(os.path.dirname(os.path.normpath(str(output))), stem)
        raise TfxferError(f"--output {output} names a file, but --output takes a folder: pass --output {folder}, "
                          f"and the {spec.name} export writes {spec.file} inside it.")


def disk_size(path):
    """Bytes of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
