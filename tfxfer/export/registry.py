"""The export formats by name, and `export_run`: a run's model in a format,
checked against its SavedModel on the same images."""

import dataclasses
import os
from typing import Callable

import numpy as np

from tfxfer import atomic
from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.reporting.card import write_model_card

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
    """

    name: str
    write: Callable
    predict: Callable
    folder: str = None
    inputs: str = ""


FORMATS = {}


def register_format(spec):
    FORMATS[spec.name] = spec
    return spec


def get_format(name):
    if name not in FORMATS:
        raise did_you_mean(name, FORMATS, "export format")
    return FORMATS[name]


def export_run(run_dir, format="saved_model", output=None, log=print, precision="float32"):
    """Export the best model of the finetune run `run_dir` as `format` (into
    `output`, default `run_dir/export/<format>/`, or the next numbered version
    for `saved_model`), computing in `precision` whatever precision trained
    it. Returns `(artifact path, max |probability difference| from the run's
    SavedModel on 16 seeded images)`; over the precision's tolerance
    (`tfxfer.export.precision`: 1e-4 for float32) fails."""
    from tfxfer.export.layout import METADATA_FILE, load_export, next_version_dir
    from tfxfer.export.precision import at_precision, tolerance

    spec = get_format(format)
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.exists(model_path):
        raise TfxferError(f"{run_dir!r} has no model.keras; pass the folder of a finished tfxfer finetune run.")
    import keras

    import tfxfer.model  # noqa: F401  (registers TransferModel for load_model)

    allowed = tolerance(precision)
    model = at_precision(keras.models.load_model(model_path, compile=False), precision)
    class_names = list(model.class_names or [str(i) for i in range(model.num_classes)])
    size = int(model.image_size)
    images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    try:
        reference, _ = load_export(run_dir, need_tfxfer=True)
        expected = reference.signatures["serving_default"](images=images)["probabilities"].numpy()
        against = "its SavedModel"
    except TfxferError:
        expected, against = model.predict(images, verbose=0), "the Keras model (the run has no SavedModel)"

    export_root = os.path.join(run_dir, "export")
    folder = output or (os.path.join(export_root, spec.folder) if spec.folder else next_version_dir(export_root))
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with atomic.replacing(folder) as temporary:
        os.makedirs(temporary)
        artifact = spec.write(model, temporary, class_names)
        got = spec.predict(artifact, images)
        difference = float(np.abs(got - expected).max())
        if not difference <= allowed:
            raise TfxferError(
                f"The {format} export in {precision} differs from {against} by {difference:.2e} in probability "
                f"(over the {allowed:g} allowed); it was not kept. Please report this with the run's config.yaml."
            )
        metadata = {
            "format": format, "image_size": size, "class_names": class_names, "backbone": model.backbone_name,
            "inputs": spec.inputs, "outputs": "probabilities float32 [N, classes]",
            "precision": precision, "tolerance": allowed, "max_abs_difference": difference, "checked_against": against,
        }
        if format != "saved_model":  # the SavedModel writes its own tfxfer.json
            atomic.write_json(os.path.join(temporary, METADATA_FILE), metadata)
        write_model_card(run_dir, temporary, format, precision)
        name = os.path.relpath(artifact, temporary)
    artifact = os.path.join(folder, name) if name != "." else folder
    log(f"{format}: {artifact} ({disk_size(artifact) / 2**20:.1f} MiB, {precision}); max |probability difference| "
        f"from {against} {difference:.1e} on 16 images (allowed: {allowed:g})")
    return artifact, difference


def disk_size(path):
    """Bytes of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
