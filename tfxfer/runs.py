"""Run plumbing shared by `finetune` and `pretrain`.

A run is a folder `<output_dir>/<run_name>/` that is never overwritten silently.
It holds the resolved `config.yaml` and a `checkpoint/` to resume from, plus what
each command writes. Here: the folder's life, resuming with the saved config,
seeding; the folder's name, lock and leftovers are `tfxfer.run_folder`, the
run's callbacks `tfxfer.callbacks`, the time budget `tfxfer.budget`.
"""

import contextlib
import csv
import os
import random
import re
import time

import keras
import numpy as np
import yaml

from tfxfer import atomic, owned
from tfxfer.backbones.pretrained import SPEC_FILE, with_pretrained_spec
from tfxfer.config import config_from_flat
from tfxfer.callbacks import CHECKPOINT_STATE
from tfxfer.errors import TfxferError
from tfxfer.owned import LOCK_FILE
from tfxfer.run_folder import RunFolderLock, check_run_name, in_use, remove_leftovers
from tfxfer.runtime import onednn_enabled, set_precision

__all__ = [
    "Run",
    "RunFolderLock",
    "check_run_name",
    "load_data",
    "steps_per_epoch",
    "seed_everything",
    "set_op_determinism",
    "read_history",
    "default_run_name",
    "resolved_config",
    "backbone_spec",
]

CONFIG_FILE = "config.yaml"


def _missing_ancestor(path):
    """The top-most folder of `path` that does not exist yet (what `makedirs` will make), or `None`."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _only_lock(run_dir):
    """A folder holding nothing but a lock file: a run that died before it began."""
    return os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {LOCK_FILE}


def _foreign_entries(run_dir):
    """What in `run_dir` tfxfer did not write; a folder without tfxfer's `config.yaml` is foreign entirely."""
    entries = set(os.listdir(run_dir)) - {LOCK_FILE}
    unknown = [found for entry in sorted(entries) for found in owned.foreign(os.path.join(run_dir, entry), "run entry")]
    if unknown:
        return unknown
    try:
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        saved = None
    if entries and not (isinstance(saved, dict) and {"data", "model", "run"} <= set(saved)):
        return [CONFIG_FILE + (" (not a tfxfer config)" if CONFIG_FILE in entries else " (missing)")]
    return []


class Run:
    """The life of one run folder, shared by `finetune` and `pretrain`:

        with Run.open(config, resume, overwrite, log=log) as run:   # checked and locked
            train, val, test, info, image_size = run.load_data()
            ...                                                      # build the model
            run.create()                                             # the folder, with config.yaml
            ...                                                      # train, evaluate, export

    `open` resolves the run name, validates the config (or, on resume, reads
    the saved one) and takes the folder's lock before anything is written.
    `run.config` is the run's own copy: what the run decides later goes into
    a new copy there (before `create` saves it), never into the caller's. A
    fresh run writes nothing in the folder until `create`; a run that fails
    before it leaves no folder behind. Seeds, op determinism and the dtype
    policy are set while the block runs and put back after it.
    """

    def __init__(self, config, run_dir, resume, log, made_folder, lock):
        self.config, self.dir, self.resume, self.log = config, run_dir, resume, log
        self.started = time.time()
        self._made_folder, self._lock, self.created = made_folder, lock, resume

    @classmethod
    def open(cls, config, resume=False, overwrite=False, worker=None, log=print):
        """Check and lock the run folder of `config`; see `Run`.

        `worker` names the copy of a non-chief worker of a distributed run
        (`tfxfer.distributed.worker_folder`): its run folder is
        `<output_dir>/<worker>/<run_name>`, and the chief's is left alone.

        A resumed run keeps its saved config. An option set explicitly (the
        config's `explicit`, else any non-default value) that differs from the
        saved value is a conflict, except where and how long the run goes on.
        """
        config = resolved_config(config, resume)
        check_run_name(config.run.run_name)
        run_dir = os.path.join(config.run.output_dir, *([worker] if worker else []), config.run.run_name)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise TfxferError(f"{run_dir} is a file, not a run folder; choose another --run-name or --output-dir.")
        lock = RunFolderLock(run_dir)
        exists = os.path.isdir(run_dir) and not _only_lock(run_dir)
        if os.path.isdir(run_dir) and not lock.try_acquire(create=False):
            raise in_use(run_dir, lock)
        try:
            if resume:
                # A run killed before its first checkpoint resumes from its saved config, at epoch 0.
                if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
                    raise TfxferError(f"Run folder {run_dir} holds no run to resume from; start it without --resume.")
                config = _resumed_config(config, run_dir)
            elif exists and not overwrite:
                raise TfxferError(f"Run folder {run_dir} already exists; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --run-name.")
            elif exists:
                foreign = _foreign_entries(run_dir)
                if foreign:
                    raise TfxferError(f"--overwrite replaces only a tfxfer run folder, and {run_dir} holds "
                                      f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; "
                                      "move it away or choose another --run-name.")
            made_folder = _missing_ancestor(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            if not lock.try_acquire(create=True):  # another run made the folder a moment ago
                raise in_use(run_dir, lock)
            lock.stamp()
            remove_leftovers(run_dir)
        except BaseException:
            lock.release()
            raise
        return cls(config, run_dir, resume, log, made_folder, lock)

    def __enter__(self):
        seed_everything(self.config.run.seed, self.config.run.deterministic)
        policy, why = set_precision(self.config.run.precision)
        self.log(f"precision: {policy} ({why}), oneDNN {'on' if onednn_enabled() else 'off'}, "
                 f"op determinism {'on' if self.config.run.deterministic else 'off'}")
        return self

    def __exit__(self, exc_type, exc, traceback):
        keras.mixed_precision.set_global_policy("float32")  # one run must not leak into the next
        if self.created and exc is not None and isinstance(exc, Exception) and not os.path.isdir(self.dir):
            # Every later write fails (history.csv first): say what happened once, not how.
            self._lock.release()
            raise TfxferError(f"Run folder {self.dir} was removed while the run was working, and its checkpoints "
                              "with it; start the run again.") from None
        if not self.created and os.path.isdir(self.dir) and _only_lock(self.dir):
            # Failed before it began: leave the output folder as it was.
            self._lock.release()
            with contextlib.suppress(OSError):
                owned.remove(os.path.join(self.dir, LOCK_FILE), "run entry")
                folder = os.path.abspath(self.dir)
                while self._made_folder and os.path.commonpath([folder, self._made_folder]) == self._made_folder:
                    os.rmdir(folder)  # only the folders this run made, and only empty ones
                    folder = os.path.dirname(folder)
        self._lock.release()
        return False

    def load_data(self, augment=None):
        """`(train, val, test, info, image_size)` of the run's data, checked by the
        pre-flight (`tfxfer.preflight`): its block is logged, its report is `info.preflight`."""
        from tfxfer import preflight

        allow = self.config.data.allow_leaks
        trained = trained_classes(self.dir) if self.resume else None

        def load(classes):
            return load_data(self.config, self.log if classes is trained else (lambda message: None), augment,
                             lambda splits, info: preflight.check(splits, info, allow), model_classes=classes)

        train, val, test, info, image_size = load(trained)
        if self.resume and trained is None and list(info.class_names) != sorted(info.class_names):
            # A run interrupted before its checkpoint recorded the class order trained in text order,
            # the only order there was then: integer class names keep it.
            train, val, test, info, image_size = load(sorted(info.class_names))
        for line in preflight.describe(info.preflight):
            self.log(line)
        return train, val, test, info, image_size

    def create(self):
        """Make the folder the run's own: an overwritten run's files go, the
        resolved config is written. A resumed run keeps its folder."""
        if self.resume:
            return
        for entry in os.listdir(self.dir):
            if entry != LOCK_FILE and owned.remove(os.path.join(self.dir, entry), "run entry") is None:
                # Checked when the run opened; something was added since.
                raise TfxferError(f"--overwrite replaces only what tfxfer wrote, and {self.dir} now holds "
                                  f"{', '.join(owned.foreign(os.path.join(self.dir, entry), 'run entry'))}; "
                                  "move it away and run again.")
        save_config(self.dir, self.config)
        self.created = True

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def elapsed(self):
        return round(time.time() - self.started, 1)


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
        if config.transfer.lora is not None:
            policy = f"lora{config.transfer.lora}"
        if config.transfer.probe:
            policy = config.transfer.probe
        name = f"{stem}-{policy}" + ("-l2sp" if config.transfer.l2sp else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace(":", ""))


def resolved_config(config, resume=False):
    """`config` as a run of it starts: validated, with the backbone and image
    size of a pretrained `--weights` run folder (a resumed run reads both from
    its saved config instead), and with its run name. A copy where any of
    that changes it; the caller's config stays as it was."""
    if not resume:
        config = with_pretrained_spec(config.validate())
    if not config.run.run_name:
        config = config.with_options(run_name=default_run_name(config))
    return config


def _resumed_config(config, run_dir):
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        saved_groups = yaml.safe_load(f)
    saved = {k: v for group in saved_groups.values() for k, v in group.items()}
    given = config.flat()
    explicit = config.explicit_options()
    conflicts = [k for k in sorted(explicit) if k not in config.RESUMABLE and given[k] != saved.get(k)
                 and not _same_lora_start(k, given, saved)]
    if conflicts:
        described = ", ".join(f"--{k.replace('_', '-')} {given[k]} (saved: {saved.get(k)})" for k in conflicts)
        raise TfxferError(
            f"--resume continues {run_dir} with its saved config, and {described} conflicts with it; "
            "drop the flag, or start a new run with another --run-name."
        )
    merged = {**saved, **{k: given[k] for k in explicit if k in config.RESUMABLE}}
    return config_from_flat(merged, type(config))


def _same_lora_start(key, given, saved):
    """A plain LoRA run starts training its adapters whether `--freeze` says
    head (as it did before `lora` was a policy) or lora: the same run."""
    return (key == "freeze" and given.get("lora") is not None and not given.get("unfreeze")
            and {str(given[key]), str(saved.get(key))} <= {"head", "lora"})


def trained_classes(run_dir):
    """The class names a run trained with, in their order, as its checkpoint
    (or, from a finished run of an earlier version, its metrics or backbone
    spec) recorded them; `None` where nothing did."""
    for name, keys in ((CHECKPOINT_STATE, ("class_names",)), ("metrics.json", ("val", "class_names")),
                       (SPEC_FILE, ("source", "classes"))):
        try:
            value = atomic.read_json(os.path.join(run_dir, name))
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if value:
            return list(value)
    return None


def load_data(config, log=print, augment=None, check=None, model_classes=None):
    """`(train, val, test, info, image_size)` for a command config's data group;
    `check` and `model_classes` (a resumed run's classes, which the data must
    have) as `tfxfer.data.load_dataset`'s."""
    from tfxfer.backbones import get_backbone
    from tfxfer.data import load_dataset

    data = config.data
    image_size = config.model.image_size or get_backbone(config.model.backbone).default_size
    train, val, test, info = load_dataset(
        **data.source(), image_size=image_size, batch_size=config.optim.batch_size,
        val_fraction=data.val_fraction, seed=config.run.seed, tfds_data_dir=data.tfds_data_dir,
        train_split=data.train_split, val_split=data.val_split, test_split=data.test_split,
        max_train_examples=data.max_train_examples, augment=data.augment if augment is None else augment,
        classes=data.classes, labels_per_class=data.labels_per_class, folds=data.folds, fold=data.fold,
        count_classes=bool(getattr(getattr(config, "transfer", None), "class_weight", None)), check=check,
        model_classes=model_classes,
    )
    if model_classes is not None and list(info.class_names) != list(model_classes):
        new, gone = (sorted(set(a) - set(b)) for a, b in ((info.class_names, model_classes), (model_classes, info.class_names)))
        raise TfxferError(
            f"The classes of {info.name} differ from the ones the run trained on (new: {', '.join(new) or 'none'}; "
            f"missing: {', '.join(gone) or 'none'}); resume it on the data it started with."
        )
    if not info.num_examples.get("train"):
        raise TfxferError(f"{info.name} has no training image left after the selection; it needs at least one per class.")
    if not info.num_examples.get("val"):
        raise TfxferError(
            f"{info.name} leaves no image to validate on ({info.num_examples['train']} training images): the "
            "validation split is carved per class, so each class needs at least 2 labelled images "
            "(--labels-per-class 2 or more), or give a validation split (a val/ folder, --val-split)."
        )
    counts = ", ".join(f"{k} {v}" for k, v in info.num_examples.items())
    log(f"data: {info.name}, {info.num_classes} classes, {counts} images at {image_size}px")
    if info.sources:
        log("splits: " + ", ".join(f"{key} {where}" for key, where in info.sources.items()))
    if info.skipped_files:
        log(f"skipped {len(info.skipped_files)} unreadable files (listed in metrics.json)")
    if config.optim.batch_size > info.num_examples["train"]:
        log(f"note: --batch-size {config.optim.batch_size} is more than the {info.num_examples['train']} training "
            "images; each epoch is one smaller batch")
    return train, val, test, info, image_size


def steps_per_epoch(config, info, split="train"):
    """Batches in an epoch of `split` (the last one may be smaller)."""
    return -(-info.num_examples[split] // config.optim.batch_size)


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


def backbone_spec(config, info, image_size, settings, metrics, normalization=None):
    """The `backbone.json` of a run: what the backbone is and how it was made
    (and the pixel normalization its weights came with, when not the registry's)."""
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
        **({"normalization": normalization} if normalization is not None else {}),
    }
