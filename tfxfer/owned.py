"""Deleting only what tfxfer made.

A folder that tfxfer is about to replace or remove is first checked against
what tfxfer itself writes there. Anything else in it (a user's notes, another
model's weights, an export made by hand) means the folder is not tfxfer's to
delete, and the command stops with one sentence instead.
"""

import json
import os
import shutil

from tfxfer.errors import TfxferError
from tfxfer.export.layout import METADATA_FILE

__all__ = ["EXPORT_ENTRIES", "foreign_entries", "check_export_target", "remove_export"]

# What an export folder of each kind holds: the artefact, its metadata and its model card.
_COMMON = {METADATA_FILE, "MODEL_CARD.md"}
EXPORT_ENTRIES = {
    "saved_model": _COMMON | {"saved_model.pb", "fingerprint.pb", "variables", "assets"},
    "onnx": _COMMON | {"model.onnx"},
    "litert": _COMMON | {"model.tflite"},
}


def foreign_entries(folder, allowed):
    """The names in `folder` that are not in `allowed`, sorted."""
    return sorted(set(os.listdir(folder)) - set(allowed))


def _export_format(folder):
    try:
        with open(os.path.join(folder, METADATA_FILE)) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    # The tfxfer.json that a SavedModel writes for itself names no format.
    return metadata.get("format") or ("saved_model" if os.path.exists(os.path.join(folder, "saved_model.pb")) else None)


def check_export_target(folder, format):
    """Refuse (TfxferError) a folder that an export of `format` may not replace:
    it may be missing, empty, or a previous tfxfer export of the same format
    holding nothing else."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise TfxferError(f"{folder} is a file; pass --output with a folder for the {format} export (made if missing).")
    entries = os.listdir(folder)
    if not entries:
        return
    foreign = foreign_entries(folder, EXPORT_ENTRIES[format])
    if foreign or _export_format(folder) != format:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = f"holds {shown}, which" if foreign else "is not a previous tfxfer export of this format and"
        raise TfxferError(f"{folder} {what} the {format} export would replace; pass --output with a new or empty "
                          "folder, or with that of an earlier export of the same format.")


def remove_export(folder, format="saved_model"):
    """Delete the export folder `folder` if it holds a tfxfer export of `format` and
    nothing else; return the bytes freed (0, and nothing deleted, otherwise)."""
    if not os.path.isdir(folder) or _export_format(folder) != format:
        return 0
    if foreign_entries(folder, EXPORT_ENTRIES[format]):
        return 0
    freed = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    shutil.rmtree(folder)
    return freed
