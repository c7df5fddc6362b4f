"""`finetune`: one run from a `FinetuneConfig` to a run folder.

A run folder `saved_models/<run>/` holds:

    config.yaml        the resolved config
    checkpoint/        weights + optimizer state after the last epoch (resume)
    best.weights.h5    the weights of the best epoch on validation accuracy
    history.csv        per-epoch training and validation metrics
    model.keras        the best model, for continued training with tfxfer
    export/<version>/  the SavedModel to serve (needs only TensorFlow)
    metrics.json       validation and test reports of the best model

The test split is touched once, at the end, by the best-on-validation model.
"""

import dataclasses
import json
import os
import random
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

from tfxfer.config import FinetuneConfig, default_run_name
from tfxfer.data import load_dataset
from tfxfer.errors import TfxferError
from tfxfer.evaluation import classification_report, format_report
from tfxfer.export import export_saved_model, next_version_dir
from tfxfer.model import build_model
from tfxfer.optim import make_optimizers
from tfxfer.runtime import onednn_enabled, set_precision

__all__ = ["finetune", "RunResult", "seed_everything", "set_op_determinism", "predict_dataset"]


@dataclasses.dataclass
class RunResult:
    run_dir: str
    export_dir: str
    history: dict
    metrics: dict
    model: keras.Model


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and TensorFlow; optionally make TF ops deterministic."""
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


def finetune(config, resume=False, overwrite=False, callbacks=(), verbose=1, log=print):
    """Run `config` (a `FinetuneConfig`) and return a `RunResult`.

    Args:
        resume: continue an interrupted run from its last checkpoint.
        overwrite: delete an existing run folder of the same name first.
        callbacks: extra Keras callbacks for `fit`.
    """
    config = config.validate() if isinstance(config, FinetuneConfig) else FinetuneConfig(**config).validate()
    config.run_name = config.run_name or default_run_name(config)
    run_dir = _check_run_dir(config, resume, overwrite)
    started = time.time()
    seed_everything(config.seed, config.deterministic)
    policy = set_precision(config.precision)
    log(f"precision: {policy}, oneDNN {'on' if onednn_enabled() else 'off'}, op determinism {'on' if config.deterministic else 'off'}")
    try:
        return _run(config, run_dir, resume, callbacks, verbose, log, started)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _run(config, run_dir, resume, callbacks, verbose, log, started):
    from tfxfer.backbones import get_backbone

    image_size = config.image_size or get_backbone(config.backbone).default_size
    train, val, test, info = load_dataset(
        config.dataset,
        config.data_dir,
        image_size=image_size,
        batch_size=config.batch_size,
        val_fraction=config.val_fraction,
        seed=config.seed,
        tfds_data_dir=config.tfds_data_dir,
        train_split=config.train_split,
        val_split=config.val_split,
        test_split=config.test_split,
        max_train_examples=config.max_train_examples,
        augment=config.augment,
    )
    counts = ", ".join(f"{k} {v}" for k, v in info.num_examples.items())
    log(f"data: {info.name}, {info.num_classes} classes, {counts} images at {image_size}px")
    if info.skipped_files:
        log(f"skipped {len(info.skipped_files)} unreadable files (listed in metrics.json)")

    strategy = tf.distribute.MirroredStrategy() if config.distribute == "mirrored" else tf.distribute.get_strategy()
    steps_per_epoch = -(-info.num_examples["train"] // config.batch_size)
    with strategy.scope():
        model = build_model(
            config.backbone,
            num_classes=info.num_classes,
            weights=config.weights,
            image_size=image_size,
            freeze=config.freeze,
            train_bn=config.train_bn,
            bn_momentum=config.bn_momentum,
            dropout=config.dropout,
            l2sp=config.l2sp,
            l2sp_scope=config.l2sp_scope,
            head_l2=config.head_l2,
            class_names=info.class_names,
        )
        head_optimizer, backbone_optimizer = make_optimizers(config, model, steps_per_epoch)
        model.compile(
            optimizer=head_optimizer,
            backbone_optimizer=backbone_optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=config.jit_compile,
        )
        if not head_optimizer.built:
            head_optimizer.build(model.trainable_weights)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    log(
        f"model: {config.backbone} ({config.weights} weights), freeze {config.freeze}: "
        f"{trainable:,} trainable and {frozen:,} frozen parameters"
    )
    if config.weights == "none" and not config.train_bn:
        log("note: random-init weights with frozen BatchNorm rarely train well; consider --train-bn")

    if not resume:
        _create_run_dir(run_dir, config)
    checkpoint = RunCheckpoint(run_dir, model)
    initial_epoch = checkpoint.restore() if resume else 0
    if initial_epoch:
        log(f"resuming {config.run_name} after epoch {initial_epoch}")
    timer = ThroughputTimer(info.num_examples["train"], config.batch_size)
    history = model.fit(
        train,
        validation_data=val,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        callbacks=[checkpoint, timer, keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=resume), *callbacks],
        verbose=verbose,
    )

    if os.path.exists(checkpoint.best_path):
        model.load_weights(checkpoint.best_path)
    metrics = {
        "run": config.run_name,
        "best_epoch": checkpoint.best_epoch,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "num_examples": info.num_examples,
        "skipped_files": {"count": len(info.skipped_files), "files": info.skipped_files},
        "train_images_per_second": timer.images_per_second,
    }
    metrics["val"] = classification_report(*predict_dataset(model.predict, val), info.class_names)
    log(format_report(metrics["val"], "validation (best epoch)"))
    if test is not None:
        metrics["test"] = classification_report(*predict_dataset(model.predict, test), info.class_names)
        log(format_report(metrics["test"], "test"))
    model.save(os.path.join(run_dir, "model.keras"))
    export_dir = export_saved_model(model, next_version_dir(os.path.join(run_dir, "export")), info.class_names)
    metrics["export_dir"] = export_dir
    metrics["export_max_abs_diff"] = _round_trip(model, export_dir, test if test is not None else val)
    log(f"SavedModel round trip: max |probability difference| {metrics['export_max_abs_diff']:.2e} on one batch")
    metrics["wall_time_seconds"] = round(time.time() - started, 1)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    summary = f"validation accuracy {metrics['val']['accuracy']:.4f}"
    if test is not None:
        summary += f", test accuracy {metrics['test']['accuracy']:.4f}"
    log(f"{summary}; run folder {run_dir}, SavedModel {export_dir} ({metrics['wall_time_seconds']} s)")
    return RunResult(run_dir, export_dir, _history_dict(history), metrics, model)


def predict_dataset(predict, dataset):
    """Labels and predicted probabilities over a batched `(images, labels)` dataset."""
    labels = np.concatenate([y for _, y in dataset.as_numpy_iterator()])
    probabilities = np.asarray(predict(dataset.map(lambda x, y: x), verbose=0))
    return labels, probabilities


def _round_trip(model, export_dir, dataset):
    """Largest difference between the exported and the in-memory model on one batch."""
    images, _ = next(dataset.as_numpy_iterator())
    served = tf.saved_model.load(export_dir).signatures["serving_default"](images=tf.constant(images))
    return float(np.abs(served["probabilities"].numpy() - model.predict(images, verbose=0)).max())


def _history_dict(history):
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def _check_run_dir(config, resume, overwrite):
    """Fail before any work if the run folder is missing (resume) or taken."""
    run_dir = os.path.join(config.output_dir, config.run_name)
    if resume and not os.path.exists(os.path.join(run_dir, RunCheckpoint.STATE)):
        raise TfxferError(f"Run folder {run_dir} has no checkpoint to resume from; start it without --resume.")
    if not resume and os.path.exists(run_dir) and not overwrite:
        raise TfxferError(
            f"Run folder {run_dir} already exists; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --run-name."
        )
    return run_dir


def _create_run_dir(run_dir, config):
    """A fresh run folder holding the resolved config, made once data and model load."""
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


class RunCheckpoint(keras.callbacks.Callback):
    """After each epoch: keep the best weights on validation accuracy, then save
    weights, optimizer state and progress so an interrupted run can resume.

    The L2-SP anchors are not saved: a resumed run rebuilds them from the
    weights source, as the original run did.
    """

    STATE = "checkpoint/state.json"

    def __init__(self, run_dir, model):
        super().__init__()
        self.run_dir = run_dir
        self.best_path = os.path.join(run_dir, "best.weights.h5")
        self.state_path = os.path.join(run_dir, self.STATE)
        self.best_accuracy = -1.0
        self.best_epoch = None
        trackables = {"model": model, "optimizer": model.optimizer}
        if model.backbone_optimizer is not None:
            trackables["backbone_optimizer"] = model.backbone_optimizer
        self._checkpoint = tf.train.Checkpoint(**trackables)

    def restore(self):
        """Load the last checkpoint; return the number of epochs already done."""
        with open(self.state_path) as f:
            state = json.load(f)
        self._checkpoint.read(state["checkpoint"]).assert_existing_objects_matched()
        self.best_accuracy, self.best_epoch = state["best_accuracy"], state["best_epoch"]
        return state["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("val_accuracy", -1.0)
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = float(accuracy), epoch + 1
            self.model.save_weights(self.best_path)
        path = self._checkpoint.write(os.path.join(self.run_dir, "checkpoint", "last"))
        state = {"epoch": epoch + 1, "checkpoint": path, "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch}
        with open(self.state_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(self.state_path + ".tmp", self.state_path)  # atomic: never a half-written state


class ThroughputTimer(keras.callbacks.Callback):
    """Training images per second of the last epoch, without validation and
    without the epoch's first step (which includes tracing and warm-up)."""

    def __init__(self, images_per_epoch, batch_size):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.batch_size = batch_size
        self.images_per_second = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self._start = time.perf_counter()
        else:
            self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self._end is not None:
            timed_images = self.images_per_epoch - self.batch_size
            self.images_per_second = round(timed_images / (self._end - self._start), 1)
