"""Deleting only what tfxfer made.

Every deletion in tfxfer goes through `remove`, which first checks the path
against what tfxfer itself writes there: a temporary of `tfxfer.atomic`, a
checkpoint, an export, an entry of a run folder. Anything else (a user's notes,
another model's weights, an export made by hand) is not tfxfer's to delete: it
stays, and a command that was about to replace it stops with one sentence.
"""

import json
import os
import shutil

from tfxfer.errors import TfxferError

__all__ = ["EXPORT_ENTRIES", "OWNERS", "RUN_FILES", "LOCK_FILE", "foreign", "foreign_entries", "check_export_target",
           "remove", "remove_export"]

# Named here, not imported from tfxfer.export: `tfxfer.atomic` deletes through this module.
METADATA_FILE = "tfxfer.json"
LOCK_FILE = ".lock"
# What a run folder may hold: what finetune, pretrain, lr-find and evaluate write there.
RUN_FILES = frozenset({
    "config.yaml", "history.csv", "checkpoint", "best.weights.h5", "model.keras", "metrics.json", "export",
    "learning_curves.png", "confusion_matrix.png", "reliability.png", "reliability-test.png", "reliability-val.png",
    "reliability-train.png", "test_predictions.npz", "predictions.csv", "tensorboard", "backbone.weights.h5",
    "backbone.json", "reconstructions", "mlflow.json", "MODEL_CARD.md", "explain", "top_losses.png", "lr_find.png",
    "adapters.npz",
})
TEMPORARY_PREFIX = "tmp-"  # `tfxfer.atomic`'s names: tmp-<pid>-<name>

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


def _temporary(path):
    # tmp-<pid>-<name>, as tfxfer.atomic names them: a user's tmp-notes.txt is not one.
    name = os.path.basename(path)
    pid = name[len(TEMPORARY_PREFIX):].partition("-")[0]
    return [] if name.startswith(TEMPORARY_PREFIX) and pid.isdigit() else [name]


def _checkpoint(path):
    # `epoch-N.index`, `epoch-N.data-*`, and TensorFlow's `epoch-N_temp/` of a killed write.
    name, parent = os.path.basename(path), os.path.basename(os.path.dirname(os.path.abspath(path)))
    return [] if name.startswith("epoch-") and parent == "checkpoint" else [name]


def _export(path):
    if not os.path.isdir(path):
        return [os.path.basename(path)]
    format = _export_format(path)
    if format is None:
        return [f"{os.path.basename(path)} (not a tfxfer export)"]
    return foreign_entries(path, EXPORT_ENTRIES[format])


def _run_entry(path):
    name = os.path.basename(path)
    if not _temporary(path) or name == LOCK_FILE:
        return []
    if name not in RUN_FILES:
        return [name]
    if name == "export" and os.path.isdir(path):
        # Versions and format folders that tfxfer wrote; an export made by hand in there is the user's.
        return [f"export/{entry}" for entry in sorted(os.listdir(path))
                if _temporary(entry) and _export(os.path.join(path, entry))]
    return []


def _run(path):
    if not os.path.isdir(path):
        return [os.path.basename(path)]
    return [f for entry in sorted(os.listdir(path)) for f in _run_entry(os.path.join(path, entry))]


# What each kind of deletion may remove: a check that returns what in `path` tfxfer did not write.
OWNERS = {
    "temporary": _temporary,  # a half-written file or folder of tfxfer.atomic, or one it replaced
    "checkpoint": _checkpoint,  # an epoch's checkpoint files that a later one superseded
    "export": _export,  # one export: a SavedModel version, export/onnx, export/litert
    "run entry": _run_entry,  # one entry of a run folder, replaced by --overwrite
    "run": _run,  # a whole run folder: a non-chief worker's copy
}


def foreign(path, owner):
    """What in `path` tfxfer did not write, by the rules of `owner` (one of `OWNERS`); empty when it may go."""
    return OWNERS[owner](path) if os.path.lexists(path) else []


def remove(path, owner):
    """Delete the file or folder `path` if it is tfxfer's by the rules of `owner`
    (one of `OWNERS`): the one place tfxfer deletes. Returns the bytes freed;
    `None`, with nothing deleted, when `path` holds anything tfxfer did not write
    (see `foreign`). A path that is already gone frees 0."""
    if not os.path.lexists(path):
        return 0
    if foreign(path, owner):
        return None
    if os.path.isdir(path) and not os.path.islink(path):
        freed = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        shutil.rmtree(path, ignore_errors=True)
        return freed
    freed = os.path.getsize(path) if os.path.isfile(path) else 0
    os.remove(path)
    return freed


def remove_export(folder, format="saved_model"):
    """Delete the export folder `folder` if it holds a tfxfer export of `format` and
    nothing else; return the bytes freed (0, and nothing deleted, otherwise)."""
    if not os.path.isdir(folder) or _export_format(folder) != format:
        return 0
    return remove(folder, "export") or 0
