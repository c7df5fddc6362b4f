"""Where exports live in a run folder, read by the exporters and by inference.

    <run>/export/<n>/          SavedModel versions, TF Serving's layout
    <run>/export/<format>/     the other formats (onnx, litert)
    tfxfer.json                beside every export: image size, class names,
                               backbone, inputs, precision
"""

import json
import os

from tfxfer.errors import TfxferError
from tfxfer.owned import METADATA_FILE

__all__ = ["METADATA_FILE", "describe_export", "find_export", "load_export", "next_version_dir",
           "precision_of_export", "versions"]



def versions(export_root):
    """The numbered versions under `export_root` (TF Serving layout), as ints."""
    if not os.path.isdir(export_root):
        return []
    return [int(d) for d in os.listdir(export_root) if d.isdigit()]


def next_version_dir(export_root):
    """`export_root/<n+1>`, where n is the highest numbered version already there."""
    return os.path.join(export_root, str(max(versions(export_root), default=0) + 1))


def precision_of_export(export_dir):
    """The precision `export_dir`'s tfxfer.json records, or `None`."""
    try:
        with open(os.path.join(export_dir, METADATA_FILE)) as f:
            return json.load(f).get("precision")
    except (OSError, ValueError, AttributeError):
        return None


def find_export(path, version=None):
    """The SavedModel folder for a run folder, its `export/` folder, or a
    version folder. Of a run's versions: `version` when given, else the
    newest in float32 (an export at reduced precision is served only when
    asked for, or when there is nothing else)."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        if version is not None:
            raise TfxferError(f"{path} is a single SavedModel version; drop --version, or pass the run folder to "
                              "choose among its versions.")
        return path
    for root in (os.path.join(path, "export"), path):
        numbered = sorted(versions(root))
        if not numbered:
            continue
        if version is not None:
            if version not in numbered:
                listed = "its only version is" if len(numbered) == 1 else "its versions are"
                raise TfxferError(f"{path} has no export version {version}; {listed} {', '.join(map(str, numbered))}.")
            return os.path.join(root, str(version))
        recorded = {n: precision_of_export(os.path.join(root, str(n))) for n in numbered}
        # Exports older than the precision field come next: most were float32.
        chosen = [n for n in numbered if recorded[n] == "float32"] or [n for n in numbered if recorded[n] is None]
        return os.path.join(root, str(max(chosen or numbered)))
    raise TfxferError(f"No SavedModel under {path!r}; pass a run folder (saved_models/<run>) or an export folder.")


def describe_export(export_dir):
    """One line on the SavedModel `export_dir` that is about to serve: its
    folder, version and precision, and the run's other versions."""
    root, name = os.path.split(os.path.normpath(os.path.abspath(export_dir)))
    what = precision_of_export(export_dir) or "precision not recorded"
    if name.isdigit():
        others = [n for n in sorted(versions(root)) if str(n) != name]
        what = f"version {name}, {what}"
        if others:
            listed = ", ".join(f"{n} {precision_of_export(os.path.join(root, str(n))) or '(precision not recorded)'}"
                               for n in others)
            what += f"; other versions: {listed}; choose with --version"
    return f"model: {export_dir} ({what})"


def load_export(path, need_tfxfer=False, version=None):
    """`(loaded SavedModel, metadata dict)` for `path` (see `find_export`).
    With `need_tfxfer`, a SavedModel without tfxfer's metadata and signatures
    is refused in one sentence."""
    import tensorflow as tf

    export_dir = find_export(path, version)
    metadata_path = os.path.join(export_dir, METADATA_FILE)
    metadata = {}
    if os.path.exists(metadata_path):
        with open(metadata_path) as f:
            metadata = json.load(f)
    if need_tfxfer and "class_names" not in metadata:
        raise TfxferError(f"{export_dir} has no {METADATA_FILE}: it was not exported by tfxfer; pass a run folder of tfxfer finetune.")
    loaded = tf.saved_model.load(export_dir)
    if need_tfxfer and not {"serving_default", "serve_bytes"} <= set(loaded.signatures):
        raise TfxferError(f"{export_dir} lacks the serve_bytes signature: it was not exported by tfxfer; pass a run folder of tfxfer finetune.")
    metadata["export_dir"] = export_dir
    return loaded, metadata
