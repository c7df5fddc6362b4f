"""The Keras callbacks of a run: checkpoint and best weights, history.csv,
the data epoch, the NaN guard, throughput and the time budget's guard.

Their order in `fit` matters at the end of an epoch: `HistoryLogger` before
`RunCheckpoint`, whose state.json is the one record of what is finished.
"""

import csv
import io
import math
import os
import time

import keras
import tensorflow as tf

from tfxfer import atomic, owned
from tfxfer.data.pipeline import set_epoch
from tfxfer.errors import TfxferError

__all__ = ["random_state", "RunCheckpoint", "EarlyStop", "LearningRateLog", "tensorboard_callbacks", "HistoryLogger", "DataEpoch", "StopOnNonFinite", "ThroughputTimer", "BudgetGuard"]

CHECKPOINT_STATE = "checkpoint/state.json"


class RunCheckpoint(keras.callbacks.Callback):
    """After each epoch: keep the best on `monitor`, then save `trackables`
    (model, optimizers) and progress, so an interrupted run can resume.

    Args:
        run_dir: the run folder.
        trackables: `{name: object}` for `tf.train.Checkpoint`, or a function
            returning it (when the optimizers are replaced mid-run).
        save_best: called with a path when `monitor` improves; it writes
            the best weights there (`best_path`).
        monitor: a key of the epoch's logs; missing, every epoch is the best.
        mode: `"max"` or `"min"`.
        tie_break: a key of the logs, lower is better, that decides between
            epochs with the same `monitor` value (default: `val_loss` when
            `monitor` is another key). Accuracy on a few validation images
            moves in coarse steps and ties from early epochs on; without it the
            first, least trained epoch of a tie would be kept.
        class_names: the classes in the order of the model's outputs, kept in
            state.json, so a resumed run gives each class the id it trained with.
    """

    def __init__(self, run_dir, trackables, save_best, best_path, monitor="val_accuracy", mode="max", tie_break=None,
                 class_names=None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.run_dir, self.save_best, self.best_path = run_dir, save_best, best_path
        self.monitor, self.mode = monitor, mode
        self.class_names = list(class_names) if class_names is not None else None
        self.tie_break = tie_break if tie_break is not None else ("val_loss" if monitor != "val_loss" else None)
        self.state_path = os.path.join(run_dir, CHECKPOINT_STATE)
        self.best_value, self.best_epoch, self.best_tie = None, None, None
        self._trackables = trackables if callable(trackables) else (lambda: trackables)

    def _checkpoint(self):
        return tf.train.Checkpoint(**self._trackables())

    def _state(self):
        return atomic.read_json(self.state_path)

    def saved_epoch(self):
        """The number of epochs the last checkpoint has done (0 before the first)."""
        return self._state()["epoch"] if os.path.exists(self.state_path) else 0

    def restore(self):
        """Load the last checkpoint; return the number of epochs already done
        (0, and nothing loaded, for a run killed before its first checkpoint)."""
        if not os.path.exists(self.state_path):
            return 0
        state = self._state()
        # Relative to the run folder (older runs stored a path from the working directory): the folder
        # resumes from anywhere, and after it was moved or renamed.
        path = os.path.join(self.run_dir, "checkpoint", os.path.basename(state["checkpoint"]))
        try:
            self._checkpoint().read(path).assert_existing_objects_matched()
        except AssertionError:
            raise TfxferError(
                f"The checkpoint in {self.run_dir} does not hold this run's model and optimizers as this version of "
                "tfxfer lays them out (runs with --lr-decay or --backbone-lr-mult from before its per-stage optimizers "
                "became one MultiOptimizer); finish the run with the version that started it, or start it again."
            ) from None
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_tie = state.get("best_tie")
        return state["epoch"]

    def _improved(self, value, tie):
        if value is None or self.best_value is None:
            return True
        if value == self.best_value and tie is not None and self.best_tie is not None:
            return tie < self.best_tie
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value, tie = (None if logs.get(k) is None else float(logs[k]) for k in (self.monitor, self.tie_break))
        if self._improved(value, tie):
            self.best_value, self.best_epoch, self.best_tie = value, epoch + 1, tie
            with atomic.replacing(self.best_path) as temporary:
                self.save_best(temporary)
        # A new prefix per epoch, and state.json switched to it in one rename:
        # a kill while the checkpoint's files are written leaves the last one whole.
        folder = os.path.join(self.run_dir, "checkpoint")
        path = self._checkpoint().write(os.path.join(folder, f"epoch-{epoch + 1}"))
        atomic.write_json(self.state_path, {
            "epoch": epoch + 1, "checkpoint": os.path.relpath(path, self.run_dir), "monitor": self.monitor,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "best_tie": self.best_tie,
            **({"class_names": self.class_names} if self.class_names is not None else {}),
        })
        keep = os.path.basename(path)
        for name in os.listdir(folder):
            # Also a killed write's leftovers, e.g. TensorFlow's `epoch-N_temp/` folder.
            if name.startswith("epoch-") and name.split(".")[0] != keep:
                owned.remove(os.path.join(folder, name), "checkpoint")


def random_state(model):
    """The state variables of `model`'s random generators (Dropout's). Keras 3
    lists them among the model's variables but a `tf.train.Checkpoint` of the
    model does not save them (measured with Keras 3.15), and a resumed run
    must continue their streams."""
    return [v.value for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


class HistoryLogger(keras.callbacks.Callback):
    """`history.csv`: a row per epoch (`epoch`, then the logs' keys sorted),
    rewritten whole after each epoch. Put it before `RunCheckpoint`: on resume
    the rows past the checkpoint's epoch are dropped, so a row is never lost
    or doubled whenever the run was killed.

    Args:
        path: the CSV file.
        keep_epochs: rows of an earlier run to keep (the checkpoint's epochs);
            `None` starts an empty file.
        extra: a function of the model returning more columns (`{"phase": ...}`).
    """

    def __init__(self, path, keep_epochs=None, extra=None):
        super().__init__()
        self.path, self.extra = path, extra
        self.rows = []
        if keep_epochs and os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["epoch"]) < keep_epochs]

    def on_epoch_end(self, epoch, logs=None):
        row = {key: float(value) for key, value in (logs or {}).items()}
        if self.extra is not None:
            row.update(self.extra(self.model))
        self.rows.append({"epoch": epoch, **dict(sorted(row.items()))})
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic.write_text(self.path, text.getvalue())


class DataEpoch(keras.callbacks.Callback):
    """Before each epoch, set the training pipeline's epoch (`set_epoch`), so
    epoch e sees the same order and augmentations in a resumed run."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        set_epoch(self.dataset, epoch)


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss with one sentence naming the
    epoch and step. Nothing is saved after it: the last checkpoint and best
    weights stay those of the last good epoch."""

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TfxferError(
                f"The training loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}; the run stopped "
                "and kept the checkpoint of its last finished epoch (try a lower --lr or --l2sp)."
            )


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


class BudgetGuard(keras.callbacks.Callback):
    """Stop after an epoch when the next one would end more than half an epoch
    past the deadline: the plan came from ~30 s of steps, and a machine that
    slows down later must still finish (nearly) on time."""

    def __init__(self, deadline, log=print):
        super().__init__()
        self.deadline, self.log = deadline, log
        self.stopped_after = None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        last = epoch + 1 >= self.params.get("epochs", epoch + 2)
        if not last and now + 0.5 * (now - self._began) > self.deadline and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_after = epoch + 1
            self.log(f"time budget: stopping after epoch {epoch + 1}, the next one would end past the budget")



class EarlyStop(keras.callbacks.Callback):
    """Stop when `checkpoint`'s monitored value has not improved for `patience`
    epochs. It reads the best epoch from the checkpoint, which a resumed run
    restores, so a resumed run stops where the unbroken one would have."""

    def __init__(self, checkpoint, patience, log=print):
        super().__init__()
        self.checkpoint, self.patience, self.log = checkpoint, patience, log
        self.stopped_after = None

    def on_epoch_end(self, epoch, logs=None):
        best = self.checkpoint.best_epoch
        if best is not None and epoch + 1 - best >= self.patience and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_after = epoch + 1
            self.log(f"early stopping after epoch {epoch + 1}: no better {self.checkpoint.monitor} for "
                     f"{self.patience} epochs (best: epoch {best}, {self.checkpoint.best_value:.4f})")


class LearningRateLog(keras.callbacks.Callback):
    """Add the learning rate at the end of each epoch to the logs (`lr`, and
    `backbone_lr` with a backbone optimizer: its output stage's with one per
    stage), for history.csv and TensorBoard."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        head = getattr(self.model, "head_optimizer", self.model.optimizer)
        logs["lr"] = _learning_rate(head)
        backbone = getattr(self.model, "backbone_optimizer", None)
        if backbone is not None:
            logs["backbone_lr"] = _learning_rate(backbone, at=head.iterations)


def _learning_rate(optimizer, at=None):
    """`optimizer`'s rate, or its schedule's at step `at`: a frozen stage's
    optimizer takes no steps, and its schedule starts where the head's is
    when the stage starts training (`tfxfer.optim.regrow`)."""
    rate = optimizer.get_config()["learning_rate"] if at is not None else None
    if isinstance(rate, dict):
        return float(keras.ops.convert_to_numpy(keras.optimizers.schedules.deserialize(rate)(at)))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def tensorboard_callbacks(log_dir, dataset, log=print):
    """Keras's TensorBoard callback on `log_dir` (epoch scalars: losses, the
    L2-SP term, metrics, learning rate), and one batch of `dataset`'s training
    images, as the model sees them after augmentation."""

    class BatchImages(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            images = next(iter(dataset))[0]
            while isinstance(images, (tuple, list)):  # a pretext's views: the first
                images = images[0]
            images = tf.reshape(images, (-1, *images.shape[-3:]))  # stacked views [V, B, ...] too
            with tf.summary.create_file_writer(os.path.join(log_dir, "images")).as_default():
                tf.summary.image("a training batch", images, step=0, max_outputs=16)

    try:
        import tensorboard  # noqa: F401  (tf.summary writes through it)
    except ImportError:
        raise TfxferError("--tensorboard needs TensorBoard: pip install 'tfxfer[tensorboard]'.") from None
    log(f"TensorBoard logs in {log_dir}; view them with: tensorboard --logdir {log_dir}")
    return [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, update_freq="epoch"), BatchImages()]
