"""Run plumbing shared by `finetune` and `pretrain`.

A run is a folder `<output_dir>/<run_name>/` that is never overwritten silently.
It holds the resolved `config.yaml` and a `checkpoint/` to resume from, plus what
each command writes. Here: the folder and its rules, resuming with the saved
config, seeding; the run's
callbacks are `tfxfer.callbacks`, the time budget `tfxfer.budget`.
"""

import contextlib
import csv
import os
import random
import re
import shutil

import keras
import numpy as np
import yaml

from tfxfer import atomic
from tfxfer.backbones.pretrained import apply_pretrained_spec
from tfxfer.config import config_from_flat
from tfxfer.callbacks import CHECKPOINT_STATE
from tfxfer.errors import TfxferError
from tfxfer.runtime import onednn_enabled, set_precision

__all__ = [
    "prepare_run",
    "started",
    "load_data",
    "create_run_dir",
    "seed_everything",
    "set_op_determinism",
    "read_history",
    "default_run_name",
    "backbone_spec",
]

CONFIG_FILE = "config.yaml"


def prepare_run(config, resume=False, overwrite=False, worker=None):
    """`(config, run_dir)` before any work: the run name resolved, the folder
    checked, and on `resume` the saved config with the allowed changes.

    `worker` names the copy of a non-chief worker of a distributed run
    (`tfxfer.distributed.worker_folder`): its run folder is
    `<output_dir>/<worker>/<run_name>`, and the chief's is left alone.

    A resumed run keeps its saved config. An option set explicitly (the
    config's `explicit`, else any non-default value) that differs from the
    saved value is a conflict, except where and how long the run goes on.
    """
    if not resume:
        config.validate()
        apply_pretrained_spec(config)
    config.run.run_name = config.run.run_name or default_run_name(config)
    run_dir = os.path.join(config.run.output_dir, *([worker] if worker else []), config.run.run_name)
    if resume:
        if not os.path.exists(os.path.join(run_dir, CHECKPOINT_STATE)):
            raise TfxferError(f"Run folder {run_dir} has no checkpoint to resume from; start it without --resume.")
        return _resumed_config(config, run_dir), run_dir
    if os.path.exists(run_dir) and not overwrite:
        raise TfxferError(
            f"Run folder {run_dir} already exists; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --run-name."
        )
    return config, run_dir


def default_run_name(config):
    """The run (or study) folder name a command config gets without `--run-name`:

    * finetune: `<data>-<backbone>-<policy>[-l2sp]`, e.g. `cifar10-resnet50-stages2-l2sp`;
      with --unfreeze, the phases' policies (`digits-resnet50-head-full`); with
      --strategy, its name (`digits-resnet50-l2sp0.01`);
    * pretrain: `<data>-<backbone>-<method>`, e.g. `cifar10-resnet9-simclr`;
    * study: `<data>-<backbone>`.
    """
    stem = f"{config.data.source_name()}-{config.model.backbone}"
    if config.COMMAND == "pretrain":
        name = f"{stem}-{config.pretext.method}"
    elif config.COMMAND == "study":
        name = stem
    elif config.transfer.strategy:
        name = f"{stem}-{config.transfer.strategy.replace('@', '').replace('+', '-')}"
    else:
        policy = config.transfer.freeze
        if config.transfer.unfreeze:
            from tfxfer.freezing import parse_unfreeze

            policy = "-".join(str(p.policy) for p in parse_unfreeze(config.transfer.unfreeze))
        name = f"{stem}-{policy}" + ("-l2sp" if config.transfer.l2sp else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(":", ""))


def _resumed_config(config, run_dir):
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        saved_groups = yaml.safe_load(f)
    saved = {k: v for group in saved_groups.values() for k, v in group.items()}
    given = config.flat()
    explicit = config.explicit_options()
    conflicts = [k for k in sorted(explicit) if k not in config.RESUMABLE and given[k] != saved.get(k)]
    if conflicts:
        described = ", ".join(f"--{k.replace('_', '-')} {given[k]} (saved: {saved.get(k)})" for k in conflicts)
        raise TfxferError(
            f"--resume continues {run_dir} with its saved config, and {described} conflicts with it; "
            "drop the flag, or start a new run with another --run-name."
        )
    merged = {**saved, **{k: given[k] for k in explicit if k in config.RESUMABLE}}
    return config_from_flat(merged, type(config))


@contextlib.contextmanager
def started(config, log=print):
    """Seeds, op determinism and the dtype policy for the run; the policy is
    put back to float32 afterwards, so one run does not leak into the next."""
    seed_everything(config.run.seed, config.run.deterministic)
    policy = set_precision(config.run.precision)
    log(f"precision: {policy}, oneDNN {'on' if onednn_enabled() else 'off'}, "
        f"op determinism {'on' if config.run.deterministic else 'off'}")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def load_data(config, log=print, augment=None):
    """`(train, val, test, info, image_size)` for a command config's data group."""
    from tfxfer.backbones import get_backbone
    from tfxfer.data import load_dataset

    data = config.data
    image_size = config.model.image_size or get_backbone(config.model.backbone).default_size
    train, val, test, info = load_dataset(
        data.dataset, data.data_dir, image_size=image_size, batch_size=config.optim.batch_size,
        val_fraction=data.val_fraction, seed=config.run.seed, tfds_data_dir=data.tfds_data_dir,
        train_split=data.train_split, val_split=data.val_split, test_split=data.test_split,
        max_train_examples=data.max_train_examples, augment=data.augment if augment is None else augment,
        classes=data.classes, labels_per_class=data.labels_per_class, folds=data.folds, fold=data.fold,
        count_classes=bool(getattr(getattr(config, "transfer", None), "class_weight", None)),
    )
    counts = ", ".join(f"{k} {v}" for k, v in info.num_examples.items())
    log(f"data: {info.name}, {info.num_classes} classes, {counts} images at {image_size}px")
    if info.skipped_files:
        log(f"skipped {len(info.skipped_files)} unreadable files (listed in metrics.json)")
    if config.optim.batch_size > info.num_examples["train"]:
        log(f"note: --batch-size {config.optim.batch_size} is more than the {info.num_examples['train']} training "
            "images; each epoch is one smaller batch")
    return train, val, test, info, image_size


def create_run_dir(run_dir, config):
    """A fresh run folder holding the resolved config; made once data and model load."""
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    save_config(run_dir, config)


def save_config(run_dir, config):
    atomic.write_text(os.path.join(run_dir, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False))


HISTORY_FILE = "history.csv"


def read_history(run_dir):
    """`{column: [value per epoch]}` of a run's history.csv; numbers as floats."""
    with open(os.path.join(run_dir, HISTORY_FILE), newline="") as f:
        rows = list(csv.DictReader(f))
    history = {}
    for key in rows[0] if rows else []:
        values = [row[key] for row in rows]
        try:
            history[key] = [float(v) for v in values]
        except ValueError:
            history[key] = values
    return history


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and TensorFlow; set TF op determinism either way."""
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    set_op_determinism(deterministic)


def set_op_determinism(enabled):
    """Turn TF op determinism on or off. It is process-wide, so set it both ways:
    one run must not leak into the next (Keras also turns XLA off while it is on)."""
    # The "off" switch has no public name; Keras reads the same private module.
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def backbone_spec(config, info, image_size, settings, metrics):
    """The `backbone.json` of a run: what the backbone is and how it was made."""
    from tfxfer.backbones import get_backbone

    spec = get_backbone(config.model.backbone)
    return {
        "backbone": config.model.backbone,
        "image_size": int(image_size),
        "preprocessing": f"{spec.preprocess.__module__}.{spec.preprocess.__qualname__}",
        "method": getattr(getattr(config, "pretext", None), "method", "finetune"),
        "settings": settings,
        "started_from": config.model.weights,
        "source": {
            "data": info.name,
            "classes": info.class_names,
            "num_images": info.num_examples,
            "classes_selected": info.classes,
            "labels_per_class": info.labels_per_class,
            "seed": config.run.seed,
        },
        "metrics": metrics,
    }
