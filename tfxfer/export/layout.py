"""Where exports live in a run folder, read by the exporters and by inference.

    <run>/export/<n>/          SavedModel versions, TF Serving's layout
    <run>/export/<format>/     the other formats (onnx, litert)
    tfxfer.json                beside every export: image size, class names,
                               backbone, inputs, precision
"""

import json
import os

from tfxfer.errors import TfxferError

__all__ = ["METADATA_FILE", "find_export", "load_export", "next_version_dir", "versions"]

METADATA_FILE = "tfxfer.json"


def versions(export_root):
    """The numbered versions under `export_root` (TF Serving layout), as ints."""
    if not os.path.isdir(export_root):
        return []
    return [int(d) for d in os.listdir(export_root) if d.isdigit()]


def next_version_dir(export_root):
    """`export_root/<n+1>`, where n is the highest numbered version already there."""
    return os.path.join(export_root, str(max(versions(export_root), default=0) + 1))


def find_export(path):
    """The SavedModel folder for a run folder, its `export/` folder, or a version folder."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for root in (os.path.join(path, "export"), path):
        numbered = versions(root)
        if numbered:
            return os.path.join(root, str(max(numbered)))
    raise TfxferError(f"No SavedModel under {path!r}; pass a run folder (saved_models/<run>) or an export folder.")


def load_export(path, need_tfxfer=False):
    """`(loaded SavedModel, metadata dict)` for `path` (see `find_export`).
    With `need_tfxfer`, a SavedModel without tfxfer's metadata and signatures
    is refused in one sentence."""
    import tensorflow as tf

    export_dir = find_export(path)
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
