"""Pretrained backbones that tfxfer runs leave behind, and how `finetune` finds them.

Every `pretrain` and `finetune` run folder holds:

    backbone.weights.h5   the headless backbone (no projection head, decoder or classifier)
    backbone.json         its spec: backbone name, image size, preprocessing,
                          how it was trained, on what data, with what result

`--weights RUN_FOLDER` (or the `.h5` file beside its `backbone.json`) starts a
backbone from them; the backbone name and image size default from the spec.
"""

import json
import os

from tfxfer import atomic
from tfxfer.errors import TfxferError

__all__ = ["is_preset_folder", "WEIGHTS_FILE", "SPEC_FILE", "save_backbone", "read_spec", "find_pretrained", "with_pretrained_spec"]

WEIGHTS_FILE = "backbone.weights.h5"
SPEC_FILE = "backbone.json"
# A finetune run's whole-model files, which `--weights` does not take.
RUN_MODEL_FILES = ("model.keras", "best.weights.h5")


def save_backbone(run_dir, backbone, spec):
    """Write `backbone`'s weights and `spec` (a dict) into `run_dir`, atomically.

    A KerasHub backbone's architecture comes from its preset, not from the
    registry entry alone, so its config goes into the spec as `architecture`.
    """
    hub = [layer for layer in backbone.layers if layer.name == "hub"]
    if hub:
        spec = {**spec, "architecture": hub[0].get_config()}
    weights = os.path.join(run_dir, WEIGHTS_FILE)
    with atomic.replacing(weights) as temporary:
        backbone.save_weights(temporary)
    atomic.write_json(os.path.join(run_dir, SPEC_FILE), spec)
    return weights


def is_preset_folder(weights):
    """True when `weights` is a folder written by KerasHub's `save_to_preset`."""
    return isinstance(weights, str) and os.path.isfile(os.path.join(weights, "config.json"))


# What KerasHub's `ImageConverter.save_to_preset` writes beside a preset's config.json.
IMAGE_CONVERTER_FILE = "image_converter.json"


def input_normalization(weights):
    """`{"scale", "offset"}` that the weights were trained with, when they say
    so: a KerasHub preset folder's image converter (pixels * scale + offset),
    or what a tfxfer run recorded from one; `None` keeps the registry's
    preprocessing of the backbone."""
    if not isinstance(weights, str):
        return None
    if is_preset_folder(weights):
        path = os.path.join(weights, IMAGE_CONVERTER_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                converter = json.load(f).get("config", {})
        except (OSError, ValueError) as e:
            raise TfxferError(f"Cannot read {path} ({e}); the preset folder is damaged.") from None
        if converter.get("scale") is None:
            return None
        return {"scale": converter["scale"], "offset": converter.get("offset") or 0.0}
    found = find_pretrained(weights)
    return found[1].get("normalization") if found else None


def find_pretrained(weights):
    """`(weights file, spec dict)` when `weights` names a run folder or a
    `backbone.weights.h5` beside its spec; `None` for anything else."""
    if not isinstance(weights, str) or weights in ("imagenet", "none"):
        return None
    if is_preset_folder(weights):
        return None
    if os.path.isdir(weights):
        folder = weights
        if not os.path.exists(os.path.join(folder, SPEC_FILE)):
            raise TfxferError(
                f"{weights!r} is a folder without {SPEC_FILE}; pass the folder of a `tfxfer pretrain` or "
                "`tfxfer finetune` run, a KerasHub preset folder, or a weights file."
            )
    elif os.path.basename(weights) == WEIGHTS_FILE and os.path.exists(os.path.join(os.path.dirname(weights), SPEC_FILE)):
        folder = os.path.dirname(weights)
    elif os.path.basename(weights) in RUN_MODEL_FILES and os.path.exists(os.path.join(os.path.dirname(weights) or ".", SPEC_FILE)):
        raise TfxferError(
            f"--weights {weights} is a finetune run's whole model (backbone and head); to start from its backbone, "
            f"pass the run folder: --weights {os.path.dirname(weights) or '.'}."
        )
    else:
        return None
    return os.path.join(folder, WEIGHTS_FILE), read_spec(folder)


def read_spec(folder):
    path = os.path.join(folder, SPEC_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise TfxferError(f"Cannot read {path} ({e}); the run folder is damaged or incomplete.") from None
    if not os.path.exists(os.path.join(folder, WEIGHTS_FILE)):
        raise TfxferError(f"{folder} has {SPEC_FILE} but no {WEIGHTS_FILE}; the run did not finish.")
    return spec


def with_pretrained_spec(config):
    """With `--weights RUN_FOLDER`: a copy of the command config with the
    backbone and image size of the folder's `backbone.json`; one set to
    another value fails. Without, `config` itself."""
    found = find_pretrained(config.model.weights)
    if not found:
        return config
    _, spec = found
    explicit = config.explicit_options()
    for key in ("backbone", "image_size"):
        value = getattr(config.model, key)
        if key in explicit and value is not None and value != spec[key]:
            flag = "--" + key.replace("_", "-")
            raise TfxferError(
                f"{flag} {value} conflicts with --weights {config.model.weights}, a {spec['backbone']} backbone "
                f"pretrained at {spec['image_size']} px; drop {flag}."
            )
    return config.with_options(backbone=spec["backbone"], image_size=spec["image_size"])
