"""`finetune`: one run from a `FinetuneConfig` to a run folder.

A run folder `saved_models/<run>/` holds:

    config.yaml        the resolved config
    checkpoint/        weights + optimizer state after the last epoch (resume)
    best.weights.h5    the weights of the best epoch on --monitor (validation accuracy)
    adapters.npz       with --lora: the best epoch's adapters and head alone (`tfxfer.lora`)
    history.csv        per-epoch training and validation metrics
    model.keras        the best model, for continued training with tfxfer
    learning_curves.png, confusion_matrix.png
    test_predictions.npz  test labels and probabilities of the best model
    export/<version>/  the SavedModel to serve (needs only TensorFlow)
    metrics.json       validation and test reports of the best model, the data's pre-flight

The test split is touched once, at the end, by the best-on-validation model.
The run folder, seeding, checkpoints and the time budget are `tfxfer.runs`.
"""

import contextlib
import dataclasses
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfxfer import atomic, budget, distributed, feature_cache, lora, owned, preflight, runs, speedups, tracking
from tfxfer.averaging import AveragedWeights, WeightAverage
from tfxfer.callbacks import (
    DataEpoch, EarlyStop, HistoryLogger, LearningRateLog, RunCheckpoint, StopOnNonFinite, ThroughputTimer, random_state,
    tensorboard_callbacks,
)
from tfxfer.backbones.pretrained import save_backbone
from tfxfer.backbones.registry import rebuild_weights
from tfxfer.config import FinetuneConfig
from tfxfer.errors import TfxferError
from tfxfer.evaluation import (
    apply_temperature, calibrate_head, classification_report, format_report, prediction_rows, write_predictions,
)
from tfxfer.freezing import UnfreezeSchedule, parse_unfreeze, phase_at, resolve_phases, resolve_train_bn
from tfxfer.export import METADATA_FILE, next_version_dir, versions
from tfxfer.export.precision import at_precision
from tfxfer.export.saved_model import write_saved_model
from tfxfer.losses import class_weights
from tfxfer.model import TransferModel
from tfxfer.optim import inner
from tfxfer.reporting.card import write_model_card
from tfxfer.compiling import compile_run, compiled_model, objective

__all__ = ["finetune", "RunResult", "predict_dataset"]


@dataclasses.dataclass
class RunResult:
    run_dir: str
    export_dir: str
    history: dict
    metrics: dict
    model: keras.Model


def finetune(config, resume=False, overwrite=False, callbacks=(), verbose=1, log=print, tracking_parent=None):
    """Run `config` (a `FinetuneConfig`) and return a `RunResult`.

    Args:
        resume: continue the interrupted run of the same name from its last
            checkpoint, with its saved config (a conflicting option fails).
        overwrite: replace an existing run folder of the same name (a folder
            that holds anything but a tfxfer run is refused).
        callbacks: extra Keras callbacks for `fit`.
        tracking_parent: with `tracking: mlflow`, the MLflow run id to nest
            this run under (a study's).
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError("finetune() takes a FinetuneConfig; build one with tfxfer.load_config().")
    strategy = distributed.make_strategy(config.run.distribute)  # before any TensorFlow op
    worker = distributed.worker_folder(strategy)
    with runs.Run.open(config, resume, overwrite, worker, log) as run:
        tracking.check_reachable(run.config)
        if run.config.run.distribute != "none":
            log(f"distribute: {run.config.run.distribute}, {distributed.worker_description(strategy)}")
        train, val, test, info, image_size = run.load_data()
        _check_data(run.config, info, log)
        if run.config.transfer.probe:  # fitted in one pass: one epoch, and no rate to find (the lr is never used)
            optim = run.config.optim
            run.config = run.config.with_options(epochs=1, lr=0.01 if optim.lr == "auto" else optim.lr)
        finding = _auto_lr(run, train, info, image_size) if run.config.optim.lr == "auto" else None
        model, schedule, plain, parameters = _build(run, info, image_size, train, strategy)
        run.create()
        if finding:
            from tfxfer.reporting.plots import lr_range

            lr_range(finding, run.path("lr_find.png"))
        tracker = None
        if distributed.is_chief(strategy):
            tracker = tracking.open_tracker(run.config, run.dir, run.resume, tracking_parent, _tags(run.config), log)
        if tracker:
            callbacks = (*callbacks, tracker.callback(log))
        checkpoint, timer, fit_callbacks, initial_epoch = _callbacks(run, model, schedule, train, info, callbacks)
        with tracking.ending(tracker):
            histories = _train(run, model, strategy, schedule, checkpoint, fit_callbacks, initial_epoch, train, val,
                               info, verbose, test)
            plain()  # evaluation and export get the model as built
            if not distributed.is_chief(strategy):
                result = RunResult(run.dir, None, _history_dict(histories), {}, model)
            else:
                if run.config.run.distribute != "none":
                    model = _local_copy(model, run.config, runs.steps_per_epoch(run.config, info))
                result = _finish(run, model, checkpoint, val, test, info, image_size, histories,
                                 {"train_images_per_second": timer.images_per_second, **parameters})
                if tracker:
                    tracking.log_finished_run(tracker, run.dir, result.metrics)
    if worker:
        # A non-chief worker's copy of the run only served the collectives.
        owned.remove(run.dir, "run")
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(run.dir))
        log(f"{worker}: training done; the chief wrote the run folder")
    return result


def _tags(config):
    """What a tracker can filter runs by: the backbone, where its weights came from, and the strategy."""
    transfer = config.transfer
    return {"backbone": config.model.backbone, "weights": config.model.weights,
            "strategy": transfer.strategy or transfer.probe or transfer.unfreeze or transfer.freeze}


def _check_data(config, info, log):
    if info.num_classes < 2:
        raise TfxferError(f"{info.name} has a single class ({info.class_names[0]}); a classifier needs at least two.")
    val_images = info.num_examples["val"]
    if config.transfer.monitor == "val_accuracy" and val_images < 50:
        log(f"note: {val_images} validation images: val_accuracy moves in steps of {100 / val_images:.0f} "
            "points and ties across epochs; a tie goes to the epoch with the lower val_loss")
    if config.run.distribute != "none" and config.optim.time_budget:
        raise TfxferError("--time-budget is not available with --distribute yet; give --epochs.")
    if config.run.distribute != "none" and config.transfer.feature_cache not in ("auto", "off"):
        raise TfxferError("--feature-cache is not available with --distribute; drop it (auto turns it off).")


def _build(run, info, image_size, train, strategy):
    """`(model, schedule, plain, parameters)`: the compiled model with the
    training-time speed-ups applied (`plain()` takes them off), the freeze
    schedule as `[(start epoch, policy)]` and the parameter counts it starts
    with. `run.config` gets the epochs a time budget fits and the policy the
    run starts with."""
    config, log = run.config, run.log
    train_bn, why = resolve_train_bn(config.transfer.train_bn, config.model.weights)
    steps = runs.steps_per_epoch(config, info)
    with strategy.scope():
        model = compiled_model(config, info, image_size, train_bn)
        plain = model.training_speedups(log)
        phases = parse_unfreeze(config.transfer.unfreeze) if config.transfer.unfreeze else None
        if config.optim.time_budget and not run.resume and not config.transfer.probe:  # a probe's one epoch is set
            if phases:  # plan with the slowest step: the last phase's
                model.set_freeze(phases[-1].policy)
            epochs = budget.time_budget_epochs(config, model, train, steps, runs.steps_per_epoch(config, info, "val"),
                                               run.started, log)
            run.config = config = config.with_options(epochs=epochs)
            model.set_freeze(config.first_policy())
            compile_run(model, config, steps)  # the schedule spans the epochs picked
        schedule = resolve_phases(phases, config.optim.epochs) if phases else [(0, config.first_policy())]
        if phases:
            log("unfreeze: " + ", ".join(f"{policy} from epoch {start + 1}" for start, policy in schedule))
    parameters = {"trainable_params": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
                  "frozen_params": sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)}
    log(f"model: {config.model.backbone} ({config.model.weights} weights), freeze {model.freeze}: "
        f"{parameters['trainable_params']:,} trainable and {parameters['frozen_params']:,} frozen parameters")
    if model.lora_rank:
        log(lora.describe(model, config.transfer.l2sp))
    elif any(isinstance(layer, keras.layers.BatchNormalization) for layer in speedups.walk_layers(model.backbone)):
        log(f"BatchNorm: {'trains' if train_bn else 'frozen'} ({why})")
    else:
        # A scale named gamma is what Keras's and KerasHub's LayerNorm and GroupNorm hold (nested
        # inside KerasHub's encoders, where no public walk of the layers reaches).
        normalised = any(w.path.endswith("/gamma") for w in model.backbone.weights)
        kept = ("its normalisation layers (LayerNorm) keep no running statistics and train with their blocks"
                if normalised else "it has no normalisation layer")
        log(f"BatchNorm: none in {config.model.backbone}; {kept}, so --train-bn changes nothing")
    if not run.resume:
        # The saved config says what the run starts with.
        run.config = config.with_options(freeze=str(config.first_policy()))
    return model, schedule, plain, parameters


def _auto_lr(run, train, info, image_size):
    """`--lr auto`: the range test of `tfxfer lr-find` on the run's setup; its
    suggestion becomes the lr of `run.config` (and so of config.yaml). Returns
    the finding."""
    from tfxfer.lr_find import lr_find

    config = run.config
    if config.run.distribute != "none":
        raise TfxferError("--lr auto is not available with --distribute; run tfxfer lr-find first and pass its --lr.")
    finding = lr_find(config, data=(train, info, image_size), log=run.log)
    run.config = config = config.with_options(lr=float(f"{finding.suggestion:.2g}"))
    run.log(f"--lr auto: lr {config.optim.lr:g} (plot: lr_find.png)")
    keras.backend.clear_session()
    runs.seed_everything(config.run.seed, config.run.deterministic)  # the run starts as it would without the test
    return finding


def _callbacks(run, model, schedule, train, info, extra):
    """`(checkpoint, throughput timer, callbacks, initial epoch)`; on resume the
    checkpoint is restored."""
    config, log = run.config, run.log
    monitor = config.transfer.monitor
    average = WeightAverage(model, config.transfer.ema) if config.transfer.ema is not None else None
    # A LoRA run keeps its best adapters apart too: Keras's weights file holds them merged.
    save = lora.saving_adapters(model, run.path(lora.ADAPTERS_FILE), model.save_weights) if model.lora_rank else (
        model.save_weights)
    save_best = average.save_averaged(save) if average else save
    checkpoint = RunCheckpoint(run.dir, lambda: _trackables(model, average), save_best, run.path(BEST_WEIGHTS),
                               monitor=monitor, mode="min" if monitor.endswith("loss") else "max",
                               class_names=info.class_names)
    initial_epoch = 0
    if run.resume:
        # The checkpoint holds the optimizers of the phase of its last epoch; the
        # next phase, if one begins now, regrows them as an unbroken run does.
        model.set_freeze(phase_at(schedule, max(checkpoint.saved_epoch() - 1, 0)))
        initial_epoch = checkpoint.restore()
        log(f"resuming {config.run.run_name} after epoch {initial_epoch}, freeze {model.freeze}")
    timer = ThroughputTimer(info.num_examples["train"], config.optim.batch_size)
    callbacks = [
        UnfreezeSchedule(schedule, log), StopOnNonFinite(), LearningRateLog(),
        HistoryLogger(run.path(runs.HISTORY_FILE), initial_epoch, extra=lambda m: {"phase": m.freeze}),
        checkpoint, timer, *budget.budget_callbacks(config, run.started, run.resume, log), *extra,
    ]
    if average:
        log(f"weight EMA: decay {config.transfer.ema}; validation, the best epoch, the test metrics and the export "
            "use the averaged weights")
        callbacks.insert(0, AveragedWeights(average))  # first: it swaps the averages in before others evaluate
    if config.transfer.early_stopping:
        callbacks.append(EarlyStop(checkpoint, config.transfer.early_stopping, log))
    if config.run.tensorboard:
        callbacks += tensorboard_callbacks(run.path("tensorboard"), train, log)
    return checkpoint, timer, callbacks, initial_epoch


def _train(run, model, strategy, schedule, checkpoint, callbacks, initial_epoch, train, val, info, verbose, test=None):
    """Fit from `initial_epoch`: the cached-feature epochs of a frozen backbone
    first, then the rest; returns the Keras histories. `test` is only for the
    pre-flight's feature check."""
    config, log = run.config, run.log
    class_weight = class_weights(config, info, log)
    is_distributed = config.run.distribute != "none"
    histories, cached_epochs = [], 0
    if config.transfer.probe:
        return [_fit_probe(model, config, train, val, initial_epoch, callbacks, log)]
    # Adapters train inside the backbone: its features change every step, so none are cached.
    if not is_distributed and not model.lora_rank and feature_cache.use_feature_cache(
            config.transfer.feature_cache, config.first_policy(), config.data.augment, log):
        cached_epochs = schedule[1][0] if len(schedule) > 1 else config.optim.epochs
    if initial_epoch < cached_epochs:
        histories.append(_fit_cached(model, config, train, val, initial_epoch, cached_epochs, callbacks, verbose, log,
                                     class_weight, info.num_classes, test, info))
        initial_epoch = cached_epochs
    if is_distributed:
        distributed.synchronize_batchnorm(model)
        histories.append(distributed.fit(
            model, strategy, train, val, epochs=config.optim.epochs, initial_epoch=initial_epoch,
            callbacks=[DataEpoch(train), *callbacks], verbose=verbose, class_weight=class_weight,
        ))
    elif initial_epoch < config.optim.epochs and not (histories and histories[-1].model.stop_training):
        histories.append(model.fit(
            train, validation_data=val, epochs=config.optim.epochs, initial_epoch=initial_epoch,
            callbacks=[DataEpoch(train), *callbacks], verbose=verbose, class_weight=class_weight,
            shuffle=False,  # the pipeline shuffles, seeded by epoch
        ))
    return histories


def _finish(run, model, checkpoint, val, test, info, image_size, histories, facts):
    """The best epoch's weights evaluated, saved and exported; `metrics.json`,
    with `facts` (parameter counts, throughput) beside the reports."""
    config, log = run.config, run.log
    if model.lora_rank and os.path.exists(run.path(lora.ADAPTERS_FILE)):
        # Exact, in float32: Keras loads an adapted kernel merged in its compute dtype, its adapters zeroed.
        lora.load_adapters(model, run.path(lora.ADAPTERS_FILE))
    elif os.path.exists(run.path(BEST_WEIGHTS)):
        with warnings.catch_warnings():
            # Keras's weights file carries the optimizers too; a best epoch from an
            # earlier phase had fewer slots, and only the model's weights matter here.
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            model.load_weights(run.path(BEST_WEIGHTS))
    metrics = {
        "run": config.run.run_name,
        "best_epoch": checkpoint.best_epoch,
        "epochs": len(runs.read_history(run.dir).get("epoch", [])),
        "trainable_params": facts["trainable_params"],
        "frozen_params": facts["frozen_params"],
        "num_examples": info.num_examples,
        "skipped_files": {"count": len(info.skipped_files), "files": info.skipped_files},
        "class_counts": info.class_counts,
        "preflight": info.preflight,
        "precision": keras.mixed_precision.global_policy().name,
        "train_images_per_second": facts["train_images_per_second"],
    }
    top_k = config.transfer.top_k
    val_predictions = predict_dataset(model.predict, val)
    test_predictions = predict_dataset(model.predict, test) if test is not None else None
    if config.transfer.calibrate:
        metrics["calibration"] = calibrate_head(model, val_predictions, test_predictions, log)
        # What the scaled head now computes, without a second pass over the data.
        temperature = metrics["calibration"]["temperature"]
        val_predictions = (val_predictions[0], apply_temperature(val_predictions[1], temperature))
        if test is not None:
            test_predictions = (test_predictions[0], apply_temperature(test_predictions[1], temperature))
    metrics["val"] = classification_report(*val_predictions, info.class_names, top_k)
    log(format_report(metrics["val"], "validation (best epoch)"))
    if test is not None:
        labels, probabilities = test_predictions
        metrics["test"] = classification_report(labels, probabilities, info.class_names, top_k)
        log(format_report(metrics["test"], "test"))
        atomic.write_npz(run.path(PREDICTIONS), labels=labels, probabilities=probabilities)
        files = info.files.get("test") or [f"{info.name}:test:{i}" for i in range(len(labels))]
        write_predictions(run.path("predictions.csv"), prediction_rows(files, labels, probabilities, info.class_names))
    _plot_run(run.dir, config.run.run_name, metrics, info.class_names)
    with atomic.replacing(run.path("model.keras")) as temporary:
        model.save(temporary)
    settings = {"freeze": config.transfer.freeze, "unfreeze": config.transfer.unfreeze, "l2sp": config.transfer.l2sp,
                "train_bn": model.train_bn}
    spec_metrics = {"val_accuracy": metrics["val"]["accuracy"], "best_epoch": checkpoint.best_epoch}
    if test is not None:
        spec_metrics["test_accuracy"] = metrics["test"]["accuracy"]
    exported = at_precision(model, "float32")  # the export computes in float32 whatever precision trained it
    # From the float32 copy: a LoRA backbone would write its merged kernels in its compute dtype.
    save_backbone(run.dir, exported.backbone,
                  runs.backbone_spec(config, info, image_size, settings, spec_metrics, model.normalization))
    if not os.path.exists(run.path("metrics.json")):  # a finished run's export is served: never replaced
        _remove_unfinished_export(run.path("export"))
    export_dir = write_saved_model(exported, next_version_dir(run.path("export")), info.class_names, origin="finetune")
    metrics["export_dir"] = export_dir
    metrics["export_max_abs_diff"] = _round_trip(exported, export_dir, test if test is not None else val)
    log(f"SavedModel round trip: max |probability difference| {metrics['export_max_abs_diff']:.2e} on one batch")
    metrics["wall_time_seconds"] = run.elapsed()
    write_model_card(run.dir, export_dir, metrics=metrics)
    atomic.write_json(run.path("metrics.json"), metrics)  # last: a run with metrics.json is complete
    summary = f"validation accuracy {metrics['val']['accuracy']:.4f}"
    if test is not None:
        summary += f", test accuracy {metrics['test']['accuracy']:.4f}"
    log(f"{summary}; run folder {run.dir}, SavedModel {export_dir} ({metrics['wall_time_seconds']} s)")
    return RunResult(run.dir, export_dir, _history_dict(histories), metrics, model)


def _remove_unfinished_export(export_root):
    """The version an earlier attempt of this run wrote as it finished. Killed after its export
    and before `metrics.json`, the run finishes again on resume: its export replaces that
    version instead of joining it as a second one. Other versions (`tfxfer export`) stay."""
    for version in versions(export_root):
        folder = os.path.join(export_root, str(version))
        try:
            origin = atomic.read_json(os.path.join(folder, METADATA_FILE)).get("origin")
        except (OSError, ValueError):
            continue
        if origin == "finetune":
            owned.remove(folder, "export")


BEST_WEIGHTS = "best.weights.h5"
PREDICTIONS = "test_predictions.npz"  # labels and probabilities of the test split, in its order


def _plot_run(run_dir, run_name, metrics, class_names):
    """`learning_curves.png` from history.csv, `confusion_matrix.png` of test (else validation)."""
    from tfxfer.reporting import plots

    plots.learning_curves({run_name: [runs.read_history(run_dir)]}, os.path.join(run_dir, "learning_curves.png"), run_name)
    split = "test" if "test" in metrics else "val"
    report = metrics[split]
    plots.reliability({split: report["calibration"]}, os.path.join(run_dir, "reliability.png"),
                      f"{run_name}: {split}, {report['num_examples']} images")
    plots.confusion_matrix(
        report["confusion_matrix"], class_names, os.path.join(run_dir, "confusion_matrix.png"),
        f"{run_name}: {split}, accuracy {report['accuracy']:.3f} ({report['num_examples']} images)",
    )


def _fit_cached(model, config, train, val, initial_epoch, epochs, callbacks, verbose, log, class_weight, num_classes,
                test=None, info=None):
    """Epochs `initial_epoch..epochs` of a frozen backbone: the head trains on
    features computed once (`tfxfer.feature_cache`); with a cache folder, the
    pre-flight's near-duplicate check compares them with the test split's."""
    started = time.time()
    setting = config.transfer.feature_cache
    if config.data.augment != "none":
        train = runs.load_data(config, log=lambda message: None, augment="none")[0]
    train_features, train_labels = feature_cache.cached_features(model, train, setting, "train", log)
    val_features, val_labels = feature_cache.cached_features(model, val, setting, "validation", log)
    log(f"feature cache: {len(train_labels):,} train and {len(val_labels):,} validation features of size "
        f"{train_features.shape[1]} in {time.time() - started:.1f} s; the head trains on them for epochs "
        f"{initial_epoch + 1}-{epochs}")
    preflight.check_cached_features(model, train_features, test, setting, info, log)
    head = feature_cache.HeadModel(model)
    loss, metrics = objective(config, num_classes)
    # The run's own optimizer where it is the head's (its loss scale is checkpointed), else the head's part of it.
    own = model.head_optimizer is inner(model.optimizer)
    head.compile(optimizer=model.optimizer if own else model.head_optimizer, loss=loss, metrics=metrics, jit_compile=config.run.jit_compile)
    batch_size, seed = config.optim.batch_size, config.run.seed
    features = feature_cache.feature_dataset(train_features, train_labels, batch_size, True, seed)
    return head.fit(
        features, validation_data=feature_cache.feature_dataset(val_features, val_labels, batch_size, False, seed),
        epochs=epochs, initial_epoch=initial_epoch, callbacks=[DataEpoch(features), *callbacks], verbose=verbose,
        class_weight=class_weight, shuffle=False,
    )


def _fit_probe(model, config, train, val, initial_epoch, callbacks, log):
    """The one epoch of a probe run: the head fitted on features (`feature_cache.fit_probe`), then the epoch's
    callbacks (history, checkpoint, tracking) as `fit` would call them; a `History` of it."""
    history = keras.callbacks.History()
    if initial_epoch >= 1:
        return history
    if config.data.augment != "none":
        log(f"{config.transfer.probe} probe: features of un-augmented images; --augment {config.data.augment} does not apply")
        train = runs.load_data(config, log=lambda message: None, augment="none")[0]
    logs = feature_cache.fit_probe(model, train, val, config.transfer.feature_cache, config.transfer.monitor,
                                   config.run.seed, log)
    hooks = keras.callbacks.CallbackList([*callbacks, history], model=model, epochs=1, steps=1, verbose=0)
    hooks.on_train_begin()
    hooks.on_epoch_begin(0)
    hooks.on_epoch_end(0, logs)
    hooks.on_train_end(logs)
    return history


def _local_copy(model, config, steps_per_epoch):
    """The trained model outside the distribution strategy, for the chief's
    evaluation and export: under `MultiWorkerMirroredStrategy`, `predict` would
    split the data among the workers, which have finished."""
    local = TransferModel.from_config({**model.get_config(), "weights": rebuild_weights(model.weights_source)})
    local.weights_source = model.weights_source
    local.set_weights(model.get_weights())
    compile_run(local, config, steps_per_epoch)
    return local


def _trackables(model, average=None):
    """What a checkpoint holds; the optimizers change when a phase begins."""
    trackables = {"model": model, "optimizer": model.optimizer, "random": random_state(model)}
    if model.head_optimizer is not model.optimizer:
        # A MultiOptimizer's own optimizers are not checkpoint dependencies of it: each is named here.
        trackables["head_optimizer"] = model.head_optimizer
    if average is not None:
        trackables["ema"] = average.state
    for i, optimizer in enumerate(model.backbone_optimizers):
        trackables["backbone_optimizer" + (f"_{i}" if i else "")] = optimizer
    return trackables


def predict_dataset(predict, dataset):
    """Labels and predicted probabilities over a batched `(images, labels)` dataset."""
    labels = np.concatenate([y for _, y in dataset.as_numpy_iterator()])
    probabilities = np.asarray(predict(dataset.map(lambda x, y: x), verbose=0))
    return labels, probabilities


def _round_trip(exported, export_dir, dataset):
    """Largest difference, on the first batch of `dataset`, between the SavedModel
    loaded back and the model in memory that was exported (`exported`, called
    eagerly: no function to trace for one batch)."""
    images, _ = next(dataset.as_numpy_iterator())
    served = tf.saved_model.load(export_dir).signatures["serving_default"](images=tf.constant(images))
    expected = keras.ops.convert_to_numpy(exported(images, training=False))
    return float(np.abs(served["probabilities"].numpy() - expected).max())


def _history_dict(histories):
    merged = {}
    for history in histories:
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(float(v) for v in values)
    return merged
