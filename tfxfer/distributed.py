"""Training under `tf.distribute`: the strategies of `--distribute` and the
epoch loop that runs a `TransferModel` under them.

Keras 3's `fit` does not run under `MultiWorkerMirroredStrategy` (it fails
while building the model symbolically and again when it reduces the metrics
across workers; keras-team/keras#20585), so distributed runs use this loop:
the model's own `train_step`/`test_step` under `strategy.run`, Keras callbacks
called as `fit` calls them, the same history and checkpoints.

What a distributed run keeps from a single-process one:

* **The global batch.** `--batch-size` is the global batch. Every worker
  builds the same seeded pipeline, and from each global batch replica r takes
  the r-th contiguous slice, so one step sees the same images as the
  single-process step. The data loss is weighted by each replica's share of
  the batch (`TransferModel.train_step`), so an uneven last batch gives the
  single-process gradient too.
* **Freezing and L2-SP.** They live in the model's step: frozen weights get
  no gradient on any replica, and the penalty is scaled by 1/replicas, so
  the summed gradients count it once.
* **Stopping.** A callback's `stop_training` after an epoch stops every
  worker at that epoch. Within an epoch, only the loss (the same on every
  worker) may stop training: a NaN raises on all of them.
* **The run folder.** Only the chief writes it. The other workers run the
  same callbacks (saving a checkpoint reads variables that every worker must
  take part in) into a temporary folder that is deleted afterwards.

The cost: every worker decodes and augments the whole global batch and keeps
its slice. The step of a ResNet dwarfs that (`benchmarks/`), and it keeps
the order and augmentations of an image independent of the worker count.
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from tfxfer.errors import TfxferError
from tfxfer.speedups import walk_layers

__all__ = [
    "make_strategy", "is_chief", "worker_folder", "worker_description", "synchronize_batchnorm", "distributed",
    "replica_slices", "with_class_weight", "fit",
]


def make_strategy(distribute):
    """The `tf.distribute` strategy of a `--distribute` choice.

    `multiworker` reads the cluster from `TF_CONFIG` and must be created
    before TensorFlow runs its first op (TensorFlow's rule); the CLI and
    `finetune`/`pretrain` create it first thing.
    """
    if distribute in (None, "none"):
        return tf.distribute.get_strategy()
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    if distribute == "multiworker":
        _check_tf_config()
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except RuntimeError as error:
            raise TfxferError(
                f"--distribute multiworker could not start ({error}); create the run before any other TensorFlow "
                "work in the process (tfxfer finetune does)."
            ) from None
    raise TfxferError(f"Unknown --distribute {distribute!r}; choose none, mirrored or multiworker.")


def _check_tf_config():
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise TfxferError(
            "--distribute multiworker reads the cluster from the TF_CONFIG environment variable, which is not set; "
            "set it on every worker (README: 'Several machines')."
        )
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise TfxferError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}; got ' + repr(text[:200]) + "."
        ) from None
    if not isinstance(workers, list) or not workers:
        raise TfxferError("TF_CONFIG's cluster lists no workers; list every worker's host:port.")


def is_chief(strategy):
    """Whether this process writes the run: always, except on a non-chief
    worker of a multi-worker cluster."""
    extended = strategy.extended
    return bool(getattr(extended, "should_checkpoint", True))


def worker_folder(strategy):
    """`None` for the chief; `.worker-<i>` for the copy of non-chief worker i,
    kept under the output folder until the run ends (a resumed run reads it)."""
    if is_chief(strategy):
        return None
    return f".worker-{strategy.cluster_resolver.task_id}"


def synchronize_batchnorm(model):
    """BatchNorm layers that train use the statistics of the global batch,
    summed over the replicas (Keras's `synchronized`), as one process would."""
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def worker_description(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return f"{strategy.num_replicas_in_sync} replica(s)"
    workers = len(resolver.cluster_spec().as_dict().get("worker", []))
    return (f"{resolver.task_type} {resolver.task_id} of {workers} worker(s), "
            f"{strategy.num_replicas_in_sync} replica(s) in all")


def replica_slices(dataset, first_replica, local_replicas, total_replicas):
    """Per-replica batches of a dataset of global batches: for each global
    batch of n examples, replicas `first_replica ..` (`local_replicas` of them)
    get consecutive slices of `ceil(n / total_replicas)` examples (the last
    ones fewer, possibly none)."""

    def split(*batch):
        batch = batch[0] if len(batch) == 1 else batch
        n = tf.shape(tf.nest.flatten(batch)[0])[0]
        size = (n + total_replicas - 1) // total_replicas

        def take(replica):
            start = tf.minimum(tf.cast(replica, tf.int32) * size, n)
            end = tf.minimum(start + size, n)
            return tf.nest.map_structure(lambda t: t[start:end], batch)

        return tf.data.Dataset.range(first_replica, first_replica + local_replicas).map(take)

    return dataset.flat_map(split)


def distributed(strategy, dataset):
    """`dataset` (of global batches) as a distributed dataset: this worker's
    replicas each take their slice of every global batch."""

    def per_worker(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        sliced = replica_slices(dataset, context.input_pipeline_id * local, local, context.num_replicas_in_sync)
        return sliced.prefetch(tf.data.AUTOTUNE)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return strategy.distribute_datasets_from_function(per_worker, options)


def with_class_weight(dataset, class_weight):
    """`(x, y, w)` with w the weight of each example's class, as `fit(class_weight=)`."""
    if not class_weight:
        return dataset
    table = np.ones(max(class_weight) + 1, np.float32)
    for c, w in class_weight.items():
        table[c] = w
    table = tf.constant(table)

    def weigh(x, y):
        ids = tf.argmax(y, axis=-1) if len(y.shape) == 2 and y.shape[-1] > 1 else tf.reshape(y, (-1,))
        return x, y, tf.gather(table, tf.cast(ids, tf.int32))

    return dataset.map(weigh)


class _Steps:
    """The distributed training and evaluation steps of one phase; a new
    phase (`set_freeze`: new trainable set, regrown optimizers) needs new ones."""

    def __init__(self, model, strategy):
        self.key = _phase_key(model)

        def train(iterator):
            logs = strategy.run(model.train_step, args=(next(iterator),))
            return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

        def test(iterator):
            strategy.run(model.test_step, args=(next(iterator),))

        self.train = tf.function(train)
        self.test = tf.function(test)


def _phase_key(model):
    return (model.freeze, id(model.optimizer), *map(id, getattr(model, "backbone_optimizers", ())))


def _any_worker(strategy, flag):
    """Whether `flag` is set on any worker: a callback that stops on one (on
    its own clock, say) stops them all, at the same epoch."""
    votes = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce("SUM", votes, axis=None)) > 0


PENALTY_LOGS = {"l2sp", "head_l2"}  # training terms, not evaluated


def _metric_logs(model):
    """The model's metrics, read in cross-replica context: each is summed over
    every replica of every worker."""
    return {k: float(v) for k, v in model.get_metrics_result().items()}


def fit(model, strategy, train, validation_data, epochs, initial_epoch=0, callbacks=(), class_weight=None, verbose=1):
    """Train `model` (built and compiled under `strategy`) as `model.fit` would.

    Args:
        train: a finite dataset of global batches `(images, labels)`.
        validation_data: the same, for the end of each epoch.
    Returns:
        the `keras.callbacks.History`.
    """
    with strategy.scope():
        steps = int(train.cardinality())
        val_steps = int(validation_data.cardinality())
        if steps <= 0 or val_steps <= 0:
            raise ValueError("distributed.fit needs finite datasets of known length.")
        # Metrics and loss are built (from the batch's shapes) before the steps are
        # traced, as `fit` does; Keras offers no public call for it, and
        # tests/test_distributed.py fails if this private one changes.
        model._symbolic_build(data_batch=train.element_spec)
        train_data = distributed(strategy, with_class_weight(train, class_weight))
        val_data = distributed(strategy, validation_data)
        history = keras.callbacks.History()
        callback_list = keras.callbacks.CallbackList(
            [*callbacks, history], add_history=False, add_progbar=verbose != 0, model=model, verbose=verbose,
            epochs=epochs, steps=steps,
        )
        model.stop_training = False
        steps_fn = None
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            if steps_fn is None or steps_fn.key != _phase_key(model):
                steps_fn = _Steps(model, strategy)
            iterator = iter(train_data)
            for step in range(steps):
                callback_list.on_train_batch_begin(step)
                logs = {k: float(v) for k, v in steps_fn.train(iterator).items()}
                callback_list.on_train_batch_end(step, logs)
                if model.stop_training:
                    break
            # The epoch's logs: what the step logs (a penalty that is off is
            # not), each summed over all replicas; validation: the data terms.
            logged = set(logs)
            logs = {k: v for k, v in _metric_logs(model).items() if k in logged}
            model.reset_metrics()
            iterator = iter(val_data)
            for _ in range(val_steps):
                steps_fn.test(iterator)
            logs.update({"val_" + k: v for k, v in _metric_logs(model).items() if k in logged - PENALTY_LOGS})
            callback_list.on_epoch_end(epoch, logs)
            if _any_worker(strategy, model.stop_training):
                break
        callback_list.on_train_end(logs if epochs > initial_epoch else None)
    return history
