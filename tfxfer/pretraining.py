"""`pretrain`: train a backbone on a source dataset with a pretext task.

A pretrain run folder `saved_models/<run>/` holds:

    backbone.weights.h5  the headless backbone of the best epoch (no projection
                         head, decoder or classifier): `finetune --weights <run>`
    backbone.json        its spec: name, image size, preprocessing, method and
                         settings, the source data, the pretext metrics
    config.yaml          the resolved config
    history.csv          per-epoch pretext metrics
    metrics.json         the data's pre-flight report (`tfxfer.preflight`)
    checkpoint/          for --resume
    reconstructions/     (autoencoder) a PNG of inputs over reconstructions per epoch

The methods live in `tfxfer.pretext`; the run plumbing is `tfxfer.runs`.
"""

import dataclasses
import os

import keras

from tfxfer import atomic, budget, distributed, runs, speedups, tracking
from tfxfer.callbacks import (
    DataEpoch, HistoryLogger, LearningRateLog, RunCheckpoint, StopOnNonFinite, ThroughputTimer, random_state,
    tensorboard_callbacks,
)
from tfxfer.backbones.pretrained import save_backbone
from tfxfer.config import PretrainConfig
from tfxfer.errors import TfxferError
from tfxfer.optim import make_optimizer_for
from tfxfer.pretext import get_method

__all__ = ["pretrain", "PretrainResult"]


@dataclasses.dataclass
class PretrainResult:
    run_dir: str
    weights: str
    spec: dict
    history: dict
    model: keras.Model


def pretrain(config, resume=False, overwrite=False, callbacks=(), verbose=1, log=print):
    """Run `config` (a `PretrainConfig`) and return a `PretrainResult`.

    Args:
        resume: continue the interrupted run of the same name from its last
            checkpoint, with its saved config (a conflicting option fails).
        overwrite: delete an existing run folder of the same name first.
        callbacks: extra Keras callbacks for `fit`.
    """
    if not isinstance(config, PretrainConfig):
        raise TypeError("pretrain() takes a PretrainConfig; build one with tfxfer.load_config(kind=PretrainConfig).")
    if config.run.distribute == "multiworker":
        raise TfxferError("--distribute multiworker is for finetune; pretrain on one machine (none or mirrored).")
    get_method(config.pretext.method)  # an unknown method fails before any work
    with runs.Run.open(config, resume, overwrite, log=log) as run:
        config = run.config  # on resume, the saved one
        tracking.check_reachable(config)
        method = get_method(config.pretext.method)
        train, val, test, info, image_size = run.load_data(augment=method.augment(config))
        if method.needs_labels and info.num_classes < 2:
            raise TfxferError(f"--method {method.name} trains on labels, and {info.name} has one class; use simclr or "
                              "autoencoder.")
        model, plain = _build(run, method, info, image_size, train)
        config = run.config  # with the epochs a time budget picked
        run.create()
        monitor, mode = method.monitor(info)
        best_path = run.path("checkpoint", "best_backbone.weights.h5")
        os.makedirs(os.path.dirname(best_path), exist_ok=True)
        checkpoint = RunCheckpoint(run.dir, {"model": model, "optimizer": model.optimizer, "random": random_state(model)},
                                   model.backbone.save_weights, best_path, monitor, mode, class_names=info.class_names)
        initial_epoch = checkpoint.restore() if resume else 0
        if initial_epoch:
            log(f"resuming {config.run.run_name} after epoch {initial_epoch}")
        timer = ThroughputTimer(info.num_examples["train"], config.optim.batch_size)
        tracker = tracking.open_tracker(config, run.dir, run.resume, tags={
            "backbone": config.model.backbone, "weights": config.model.weights, "method": method.name}, log=log)
        with tracking.ending(tracker):
            history = _fit(model, method, train, val, info, run, checkpoint, timer, initial_epoch, callbacks, verbose,
                           tracker)
        plain()  # the backbone is saved as built

        model.backbone.load_weights(best_path)
        best = checkpoint.best_epoch
        logs = ({k: float(v[best - initial_epoch - 1]) for k, v in history.history.items()}
                if best and best > initial_epoch else {})
        spec = runs.backbone_spec(config, info, image_size, method.settings(config), {
            "best_epoch": best, "monitor": monitor, "best_value": checkpoint.best_value, "best_epoch_logs": logs,
            "train_images_per_second": timer.images_per_second, "wall_time_seconds": run.elapsed(),
        }, model.normalization)
        weights = save_backbone(run.dir, model.backbone, spec)
        atomic.write_json(run.path("metrics.json"), {"preflight": info.preflight})
        if tracker:
            tracker.log_metrics({"best_epoch": best}, step=len(runs.read_history(run.dir).get("epoch", [])))
            tracker.log_artifacts(tracking.run_artifacts(run.dir) + [weights])
            tracker.finish()
        log(f"backbone of epoch {best} ({monitor} {checkpoint.best_value}) saved as {weights}; "
            f"fine-tune it with: tfxfer finetune --weights {run.dir} ...")
    return PretrainResult(run.dir, weights, spec, {k: [float(x) for x in v] for k, v in history.history.items()}, model)


def _fit(model, method, train, val, info, run, checkpoint, timer, initial_epoch, callbacks, verbose, tracker):
    """The method's `fit`, with the run's callbacks, and `tracker`'s when tracking."""
    config, log = run.config, run.log
    return model.fit(
        train,
        validation_data=method.validation(val, config) if method.validation else val,
        epochs=config.optim.epochs,
        initial_epoch=initial_epoch,
        # The method's callbacks add metrics (kNN accuracy) that the checkpoint and the log read.
        callbacks=[
            DataEpoch(train), StopOnNonFinite(), *method.callbacks(model, run.dir, val, info, config),
            LearningRateLog(), HistoryLogger(run.path(runs.HISTORY_FILE), initial_epoch), checkpoint, timer,
            *budget.budget_callbacks(config, run.started, run.resume, log),
            *(tensorboard_callbacks(run.path("tensorboard"), train, log) if config.run.tensorboard else []),
            *callbacks, *([tracker.callback(log)] if tracker else []),
        ],
        verbose=verbose,
        shuffle=False,  # the pipeline shuffles, seeded by epoch
    )


def _build(run, method, info, image_size, train):
    """`(model, plain)`: the method's compiled model with the training-time
    speed-ups on (`plain()` takes them off); with a time budget, `run.config`
    gets the epochs it fits."""
    config, log = run.config, run.log
    steps_per_epoch = runs.steps_per_epoch(config, info)
    with distributed.make_strategy(config.run.distribute).scope():
        model = method.build(config, info, image_size)
        if hasattr(model, "training_speedups"):  # a TransferModel's own `fit` then leaves them on
            plain = model.training_speedups(log)
        else:
            plain = speedups.apply(model, log, config.run.cpu_speedups)
        method.compile(model, make_optimizer_for(config.optim, steps_per_epoch), config, info)
        if config.optim.time_budget and not run.resume:
            epochs = budget.time_budget_epochs(config, model, train, steps_per_epoch,
                                               runs.steps_per_epoch(config, info, "val"), run.started, log)
            run.config = config = config.with_options(epochs=epochs)  # the run's copy, which config.yaml saves
            method.compile(model, make_optimizer_for(config.optim, steps_per_epoch), config, info)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    log(f"pretrain: {method.name} on {info.name}, {config.model.backbone} at {image_size}px, "
        f"{config.optim.epochs} epochs of {steps_per_epoch} steps")
    return model, plain
