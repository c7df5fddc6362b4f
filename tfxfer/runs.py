"""Run plumbing shared by `finetune` and `pretrain`.

A run is a folder `<output_dir>/<run_name>/` that is never overwritten silently.
It holds the resolved `config.yaml` and a `checkpoint/` to resume from, plus what
each command writes. Here: the folder and its rules, resuming with the saved
config, seeding, the distribution strategy and the time budget; the run's
callbacks are `tfxfer.callbacks`.
"""

import contextlib
import csv
import os
import random
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

from tfxfer import atomic
from tfxfer.config import config_from_flat, parse_duration
from tfxfer.callbacks import CHECKPOINT_STATE, BudgetGuard
from tfxfer.errors import TfxferError
from tfxfer.runtime import onednn_enabled, set_precision

__all__ = [
    "prepare_run",
    "started",
    "load_data",
    "create_run_dir",
    "seed_everything",
    "set_op_determinism",
    "plan_epochs",
    "measure_seconds_per_step",
    "apply_time_budget",
    "read_history",
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
        config.use_pretrained_spec()
    config.run.run_name = config.run.run_name or config.default_run_name()
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


# Evaluating a batch costs about a third of a training step (forward only).
EVAL_STEP_SHARE = 1 / 3


def plan_epochs(budget_seconds, seconds_per_step, steps_per_epoch, eval_steps_per_epoch=0, spent_seconds=0.0):
    """How many whole epochs fit in what is left of the budget (at least 1)."""
    per_epoch = seconds_per_step * (steps_per_epoch + EVAL_STEP_SHARE * eval_steps_per_epoch)
    return max(1, int((budget_seconds - spent_seconds) // per_epoch))


def measure_seconds_per_step(model, dataset, seconds=30.0, max_steps=500):
    """The mean time of a training step, over about `seconds` of real steps
    after one warm-up step. The model's and its optimizers' variables are put
    back afterwards, so the measurement trains nothing."""
    optimizers = [o for o in (model.optimizer, getattr(model, "backbone_optimizer", None)) if o is not None]
    for optimizer in optimizers:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    variables = list(model.variables) + [v for o in optimizers for v in o.variables]
    saved = [v.numpy() for v in variables]
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())
            if len(ends) > 2 and ends[-1] - ends[1] > seconds:
                self.model.stop_training = True

    model.fit(dataset.repeat(), steps_per_epoch=max_steps, epochs=1, callbacks=[Clock()], verbose=0, shuffle=False)
    for variable, value in zip(variables, saved):
        variable.assign(value)
    # The mean, not the median: wall time includes the occasional slow step
    # (measured: the median under-read a 20-minute run's steps by 30%).
    return (ends[-1] - ends[1]) / (len(ends) - 2) if len(ends) > 2 else ends[-1] - ends[0]


def budget_callbacks(config, started, resume, log=print):
    """`[BudgetGuard]` for a fresh run with a time budget, else `[]`."""
    if not config.optim.time_budget or resume:
        return []
    return [BudgetGuard(started + parse_duration(config.optim.time_budget), log)]


def apply_time_budget(config, model, train, steps_per_epoch, eval_steps_per_epoch, started, log=print):
    """With `--time-budget`: measure the step, fix the epochs that fit, save the
    choice in `config` (whose schedule must then be built). Returns the epochs."""
    budget = parse_duration(config.optim.time_budget)
    seconds_per_step = measure_seconds_per_step(model, train)
    spent = time.time() - started
    epochs = plan_epochs(budget, seconds_per_step, steps_per_epoch, eval_steps_per_epoch, spent)
    log(
        f"time budget {config.optim.time_budget}: {seconds_per_step:.3f} s a step, {steps_per_epoch} steps an epoch, "
        f"{spent:.0f} s spent on start-up and measuring -> {epochs} epochs"
    )
    config.optim.epochs = epochs
    return epochs


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
