"""The transfer model: raw uint8 pixels -> preprocessing -> backbone -> new head.

`TransferModel` is a plain Keras model: `compile()` and `fit()` work as usual.
It adds two things to Keras's training:

* the L2-SP penalty (`tfxfer.penalties.L2SP`), added to the data loss by
  `compute_loss` in training only and logged as its own metric `l2sp` (and
  `head_l2`);
* optional optimizers of the backbone's own (`compile(backbone_optimizer=)`):
  one for the whole backbone, or one per stage (layer-wise learning-rate
  decay), so each part has its own learning rate without scaling gradients,
  which Adam would undo. They become one `keras.optimizers.MultiOptimizer`,
  which maps each backbone weight's path to its stage's optimizer, so Keras's
  own step, loss scaling (mixed_float16) and callbacks work unchanged.
"""

import re

import keras
import tensorflow as tf

from tfxfer.backbones import create_backbone, get_backbone
from tfxfer.backbones.pretrained import input_normalization
from tfxfer.backbones.registry import backbone_units, feature_pool, set_bn_momentum
from tfxfer.freezing import apply_freeze, parse_freeze
from tfxfer.optim import inner, optimizer_map, regrow
from tfxfer.penalties import L2SP
from tfxfer import lora as adapters
from tfxfer import probes
from tfxfer import speedups as host_speedups
from tfxfer.errors import TfxferError

__all__ = ["PenalizedLoss", "Preprocess", "TransferModel", "build_model", "track_loss"]


@keras.saving.register_keras_serializable(package="tfxfer")
class Preprocess(keras.layers.Layer):
    """Casts raw 0-255 pixels to float32 and applies the backbone's preprocessing."""

    def __init__(self, backbone, normalization=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone
        self.normalization = normalization
        self._preprocess = get_backbone(backbone).preprocess

    def call(self, images):
        x = tf.cast(images, tf.float32)
        if self.normalization is not None:
            # The weights' own image converter (a KerasHub preset's): pixels * scale + offset, per channel or not.
            return x * tf.constant(self.normalization["scale"], tf.float32) + tf.constant(
                self.normalization["offset"], tf.float32)
        return self._preprocess(x)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone, "normalization": self.normalization}


class PenalizedLoss:
    """A `keras.Model` mixin: `compute_loss` is the data loss plus the penalties
    of `self.penalty` (an `L2SP`), in training only; each penalty that is on
    is logged as its own metric, `l2sp` and `head_l2`.

    Keras scales the data loss of each replica by 1/replicas, because the
    replicas' gradients are summed, but not extra loss terms; the penalties
    are scaled here, so the summed gradients count them once.
    """

    def _track_penalties(self):
        # A penalty that is off gets no metric: a column of zeros says nothing.
        self.l2sp_tracker = keras.metrics.Mean(name="l2sp") if self.penalty.alpha else None
        self.head_l2_tracker = keras.metrics.Mean(name="head_l2") if self.penalty.beta else None

    def penalized_losses(self, x, y, y_pred, sample_weight=None):
        """`(loss to differentiate, loss to log)` of a training batch.

        Both are the data loss plus the penalties. The first also weighs the
        data loss by this replica's share of the global batch (`_batch_share`),
        so an uneven last batch gets the one-process gradient; the second is
        what one process would log.
        """
        data = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        data = tf.cast(data, tf.float32)
        l2sp, head_l2 = self.penalty(), self.penalty.head()
        for tracker, value in ((self.l2sp_tracker, l2sp), (self.head_l2_tracker, head_l2)):
            if tracker is not None:
                tracker.update_state(value)
        extra = (l2sp + head_l2) / tf.distribute.get_strategy().num_replicas_in_sync
        return data * _batch_share(tf.shape(x)[0]) + extra, data + extra

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not training:
            return super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        return self.penalized_losses(x, y, y_pred, sample_weight)[0]

    def test_step(self, data):
        # The penalties are training terms: evaluation reports the data loss only.
        logs = super().test_step(data)
        return {k: v for k, v in logs.items() if k not in ("l2sp", "head_l2")}


@keras.saving.register_keras_serializable(package="tfxfer")
class TransferModel(PenalizedLoss, keras.Model):
    """A backbone from the registry with a new classification head.

    Args:
        backbone: registered backbone name.
        num_classes: size of the new head.
        weights: `"imagenet"`, `"none"`/`None`, or a weights file path.
        image_size: square input size; defaults to the backbone's.
        freeze: freeze policy, see `tfxfer.freezing`.
        train_bn: let BatchNorm layers of the training part update.
        bn_momentum: momentum of the backbone's BatchNorm moving averages; `None`
            keeps the backbone's (0.99 in keras.applications). 0.9 (PyTorch's
            default) lets statistics of a randomly initialized network catch up
            within a few hundred steps.
        dropout: dropout rate before the head.
        l2sp: alpha of the L2-SP pull toward the starting weights; 0 turns it off.
        l2sp_scope: `"kernels"` or `"all"`.
        head_l2: beta of the plain L2 penalty on the head's kernel.
        class_names: optional list of class names, kept in the config.
        calibration_temperature: the temperature already folded into the
            head's weights by `--calibrate`, kept in the config.
        normalization: `{"scale", "offset"}` applied to the pixels instead of
            the backbone's registered preprocessing; default: what the weights
            bring (`tfxfer.backbones.pretrained.input_normalization`).
        lora: the rank of low-rank adapters (`tfxfer.lora`) on the backbone's
            target layers; then only the adapters and the head train (the
            backbone's own weights stay as loaded), and `freeze` is `lora`,
            or `head` for the head alone (the first phase of
            `head@0,lora@25%`). `l2sp` then pulls each adapter's update
            `(lora_alpha / lora) * A @ B` toward zero: the distance of the
            merged kernel from its start.
        lora_alpha: the adapters' scale is `lora_alpha / lora`; default `lora`.
        lora_targets: `"stages:N"` or layer names; default the registry's.
        lora_train: `"none"`, or `"norms"` to train the backbone's
            normalisation scales and offsets and its biases too.
        probe: `"knn"` puts a k-NN head (`tfxfer.probes.KnnHead`) of
            `knn_bank` training features in place of the dense one; `"linear"`
            keeps the dense head, whose weights a logistic regression sets.
            Either way the backbone is frozen.
        knn_bank, knn_k, knn_temperature: the k-NN head's number of bank
            images, neighbours and vote temperature.
        speedups: the host's training speed-ups (`tfxfer.speedups`) during
            `fit`: `"auto"` (those measured to pay on this CPU kind), `"force"`,
            or `"off"`/`False`. Saving and exports always see the model as
            built (an `evaluate` after `fit` may reuse the step `fit` traced:
            the same results to float rounding).
    """

    def __init__(
        self,
        backbone="resnet50",
        num_classes=1000,
        weights="imagenet",
        image_size=None,
        freeze="full",
        train_bn=False,
        bn_momentum=None,
        dropout=0.0,
        l2sp=0.0,
        l2sp_scope="kernels",
        head_l2=0.0,
        class_names=None,
        calibration_temperature=None,
        normalization=None,
        lora=None,
        lora_alpha=None,
        lora_targets=None,
        lora_train="none",
        probe=None,
        knn_bank=None,
        knn_k=20,
        knn_temperature=0.07,
        speedups="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.speedups = {False: "off", True: "auto", None: "auto"}.get(speedups, speedups)
        if self.speedups not in host_speedups.MODES:
            raise ValueError(f"speedups must be one of {', '.join(host_speedups.MODES)}, got {speedups!r}.")
        self._speedups_on = False
        spec = get_backbone(backbone)
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.weights_source = "none" if weights is None else str(weights)
        self.image_size = int(image_size or spec.default_size)
        self.freeze = str(parse_freeze(freeze))
        self.train_bn = bool(train_bn)
        self.bn_momentum = None if bn_momentum is None else float(bn_momentum)
        self.dropout_rate = float(dropout)
        self.class_names = list(class_names) if class_names is not None else None
        # Set by `--calibrate`, which divides the head's weights by it; kept for the record only.
        self.calibration_temperature = calibration_temperature

        self.backbone = create_backbone(backbone, weights, self.image_size)
        self.normalization = normalization if normalization is not None else input_normalization(weights)
        self.preprocess = Preprocess(backbone, self.normalization, name="preprocess")
        self.pool = feature_pool(self.backbone)
        self.drop = keras.layers.Dropout(self.dropout_rate, name="dropout")
        # float32 head: softmax of bfloat16 logits loses the small probabilities.
        self.head = keras.layers.Dense(
            self.num_classes, activation="softmax", dtype="float32", name="head"
        )
        self.probe = probe
        self.knn = {"knn_bank": knn_bank, "knn_k": knn_k, "knn_temperature": knn_temperature}
        if probe == "knn":
            if not knn_bank:
                raise ValueError("A k-NN head needs knn_bank, the number of training images it keeps.")
            self.head = probes.KnnHead(self.num_classes, knn_bank, knn_k, knn_temperature, name="head")
        elif probe not in (None, "linear"):
            raise TfxferError(f"probe takes {' or '.join(probes.PROBES)}, got {probe!r}.")
        self.head.build((None, self.backbone.output.shape[-1]))
        if probe:  # a probe trains no backbone weight
            self.freeze = "head"
        set_bn_momentum(self.backbone, self.bn_momentum)
        if lora is not None and (float(lora) != int(float(lora)) or float(lora) < 1):
            raise TfxferError(f"--lora takes a whole rank of at least 1, got {lora}.")
        self.lora_rank = None if lora is None else int(lora)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self.lora_targets, self.lora_train = lora_targets, lora_train
        if self.lora_rank:
            # `lora=R` alone comes with the default policy, full: it means train the adapters, as any policy
            # but head (the head alone, for the first phase of head@0,lora@N) does.
            self.freeze = "head" if self.freeze == "head" else "lora"
            apply_freeze(self.backbone, spec, "head", False)
            self.trained_layers = adapters.enable(self.backbone, spec, self.lora_rank, self.lora_alpha,
                                                  lora_targets, lora_train)
            adapters.set_trainable(self.backbone, lora_train, self.freeze == "lora")
        else:
            # A LoRA model's plain copy (its export) keeps the backbone as frozen as it was.
            self.freeze = "head" if self.freeze == "lora" else self.freeze
            self.trained_layers = apply_freeze(self.backbone, spec, self.freeze, self.train_bn)
        self.penalty = L2SP(self.backbone, l2sp, l2sp_scope, self.head.weights, head_l2,
                            adapters.adapter_pairs(self.backbone), self.lora_scale)
        self._track_penalties()
        self.stage_optimizers = {}
        # Every part is built above; `build` records the input shape, which
        # Keras's own `model.export()` reads from a subclassed model.
        self.build((None, self.image_size, self.image_size, 3))

    def build(self, input_shape):
        del input_shape  # the parts were built in `__init__`

    @property
    def lora_scale(self):
        """The adapters' scale `lora_alpha / lora`; 1 without adapters."""
        return (self.lora_alpha or self.lora_rank) / self.lora_rank if self.lora_rank else 1.0

    @property
    def backbone_optimizers(self):
        """The backbone's own optimizers, output stage first, each once."""
        unique = {id(o): o for stage in reversed(get_backbone(self.backbone_name).stages)
                  for o in [self.stage_optimizers.get(stage)] if o is not None}
        return list(unique.values())

    @property
    def backbone_optimizer(self):
        """The backbone's optimizer (of its output stage, with one per stage), or `None`."""
        optimizers = self.backbone_optimizers
        return optimizers[0] if optimizers else None

    @property
    def head_optimizer(self):
        """The optimizer of the head (and of every weight outside the backbone)."""
        optimizer = inner(self.optimizer)
        if isinstance(optimizer, keras.optimizers.MultiOptimizer):
            return optimizer_map(optimizer).default_optimizer
        return optimizer

    def set_freeze(self, freeze, train_bn=None):
        """Apply another freeze policy, mid-training if need be.

        Nothing about the trainable set is fixed at build time: the L2-SP
        pairs, the optimizer groups and the weight-decay exclusion follow
        `trainable` when the step is traced, so the step is traced again. A
        compiled model's optimizer is regrown (`tfxfer.optim.regrow`):
        weights that were training keep their optimizer state and step count,
        weights that start training get fresh slots. BatchNorm stays as
        `train_bn` says, and the L2-SP anchors stay the starting weights.
        """
        if self.lora_rank and parse_freeze(freeze).kind not in ("head", "lora"):
            raise TfxferError(f"A model with LoRA adapters trains its head and then its adapters (head@0,lora@25%); "
                              f"it cannot take the freeze policy {freeze}.")
        if train_bn is not None:
            self.train_bn = bool(train_bn)
        self.freeze = str(parse_freeze(freeze))
        trained = apply_freeze(self.backbone, get_backbone(self.backbone_name), self.freeze, self.train_bn)
        if self.lora_rank:
            adapters.set_trainable(self.backbone, self.lora_train, self.freeze == "lora")
        else:
            self.trained_layers = trained
        if getattr(self, "optimizer", None) is not None and self.optimizer.built:
            before = list(inner(self.optimizer).optimizers) if self.stage_optimizers else []
            self.optimizer = regrow(self.optimizer, self.trainable_weights)
            if self.stage_optimizers:
                # The copy keeps the order of the optimizers it copies.
                regrown = {id(o): new for o, new in zip(before, inner(self.optimizer).optimizers)}
                self.stage_optimizers = {stage: regrown[id(o)] for stage, o in self.stage_optimizers.items()}
        self.train_function = self.test_function = self.predict_function = None
        return self.trained_layers

    def training_speedups(self, log=print):
        """Apply the host's training speed-ups (per `speedups`) until the
        returned function is called; a no-op while they are on already, so
        `fit` inside a run that applied them keeps them."""
        if self._speedups_on:
            return lambda: None
        undo = host_speedups.apply(self, log, self.speedups)
        self._speedups_on = True

        def plain():
            undo()
            self._speedups_on = False

        return plain

    def fit(self, *args, **kwargs):
        """Keras's `fit`, with the host's training speed-ups on for its
        duration (`speedups`); the line naming them is printed unless `verbose=0`."""
        quiet = kwargs.get("verbose", "auto") == 0
        plain = self.training_speedups(log=(lambda message: None) if quiet else print)
        try:
            return super().fit(*args, **kwargs)
        finally:
            plain()

    def features(self, images, training=False):
        """The trunk: raw pixels -> preprocessing -> backbone -> pooled features."""
        return self.pool(self.backbone(self.preprocess(images), training=training))

    def call(self, images, training=False):
        return self.head(self.drop(self.features(images, training=training), training=training))

    def compile(self, optimizer="rmsprop", *args, backbone_optimizer=None, **kwargs):
        """Keras's `compile` (same positional arguments), plus an optional
        keyword-only optimizer for the backbone's weights: one optimizer, or a
        dict from stage name to optimizer (every stage named; stages may share
        one). With it, the model's optimizer is a `MultiOptimizer` whose
        default, `head_optimizer`, is `optimizer`."""
        stages = get_backbone(self.backbone_name).stages
        if backbone_optimizer is None or isinstance(backbone_optimizer, dict):
            self.stage_optimizers = dict(backbone_optimizer or {})
            if self.stage_optimizers and set(self.stage_optimizers) != set(stages):
                raise ValueError(f"backbone_optimizer must name every stage of {self.backbone_name}: {stages}.")
        else:
            self.stage_optimizers = {stage: backbone_optimizer for stage in stages}
        if self.stage_optimizers:
            optimizer = keras.optimizers.MultiOptimizer(
                keras.optimizers.OptimizerMap(keras.optimizers.get(optimizer), self._stage_patterns()))
        super().compile(optimizer, *args, **kwargs)
        if self.stage_optimizers:
            # Built now on the trainable weights only: no slots for frozen ones.
            self.optimizer.build(self.trainable_weights)

    def compile_from_config(self, config):
        # Used by keras.models.load_model: a saved MultiOptimizer comes back
        # with its map, as one optimizer to Keras.
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    def _stage_patterns(self):
        """`{pattern: optimizer}` over every backbone weight, trainable now or
        not, so a later freeze policy finds each weight's stage. A pattern
        names the layer that holds a weight (its path's folder), not the
        weight: some weights are numbered by how many Keras made before in the
        process (ConvNeXt's layer scales), and a model loaded elsewhere must
        map them alike. A weight outside the stage map's layers goes with the
        input stage; every other weight of the model is the head's."""
        spec = get_backbone(self.backbone_name)
        stage_of = {_holder(w.path): spec.stages[0] for w in self.backbone.weights}
        for layer, stage in backbone_units(self.backbone, spec):
            for w in layer.weights:
                stage_of[_holder(w.path)] = stage
        backbone_paths = {w.path for w in self.backbone.weights}
        clash = sorted(w.path for w in self.weights if _holder(w.path) in stage_of and w.path not in backbone_paths)
        if clash:
            raise ValueError(f"{self.backbone_name} has a layer path the head also has ({clash[0]}): "
                             "a per-stage optimizer could not tell them apart.")
        by_optimizer = {}
        for holder, stage in stage_of.items():
            optimizer = self.stage_optimizers[stage]
            pattern = re.escape(holder) + "/[^/]+" if holder else "[^/]+"
            by_optimizer.setdefault(id(optimizer), (optimizer, []))[1].append(pattern)
        return {"|".join(patterns): optimizer for optimizer, patterns in by_optimizer.values()}

    def train_step(self, data):
        if tf.distribute.get_strategy().num_replicas_in_sync == 1:
            return super().train_step(data)
        # Keras's step, with the loss logged as one process would.
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss, logged = self.penalized_losses(x, y, y_pred, sample_weight)
            track_loss(self, logged, tf.shape(x)[0])
            scaled = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, weights), weights))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            "backbone": self.backbone_name,
            "num_classes": self.num_classes,
            "weights": self.weights_source,
            "image_size": self.image_size,
            "freeze": self.freeze,
            "train_bn": self.train_bn,
            "bn_momentum": self.bn_momentum,
            "dropout": self.dropout_rate,
            "l2sp": self.penalty.alpha,
            "l2sp_scope": self.penalty.scope,
            "head_l2": self.penalty.beta,
            "class_names": self.class_names,
            "calibration_temperature": self.calibration_temperature,
            "normalization": self.normalization,
            "lora": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets,
            "lora_train": self.lora_train,
            "probe": self.probe,
            **self.knn,
            "speedups": self.speedups,
            "name": self.name,
        }


def track_loss(model, loss, batch_size):
    """Update Keras's own `loss` metric as Keras's `train_step` does.

    A `train_step` override has no public way to feed the `loss` that `fit`
    logs: `Model._loss_tracker` is the metric Keras's step updates, with the
    loss unscaled from its replica's share (tests/test_model.py fails if
    Keras moves it).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    model._loss_tracker.update_state(loss * replicas, sample_weight=batch_size)


def _holder(path):
    """The path of the layer a weight's path belongs to: all but its last part."""
    return path.rpartition("/")[0]


def _batch_share(batch_size):
    """Under N replicas, N times this replica's share of the global batch, else 1.

    Keras scales each replica's mean loss by 1/N, which weighs every example
    of a global batch alike only when the replicas' batches are equal; with
    this factor an uneven (last) global batch gets the one-process gradient too.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1.0
    local = tf.cast(batch_size, tf.float32)
    return tf.math.divide_no_nan(local * context.num_replicas_in_sync, context.all_reduce("SUM", local))


def build_model(backbone="resnet50", num_classes=1000, weights="imagenet", **kwargs):
    """Build a `TransferModel`; other arguments left at `None` keep their defaults.

    `weights=None` means random initialization, as in `keras.applications`.

    Example:
        model = tfxfer.build_model("resnet50", num_classes=10, freeze="stages:2", l2sp=0.01)
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return TransferModel(backbone=backbone, num_classes=num_classes, weights=weights, **kwargs)
