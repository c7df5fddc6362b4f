"""The transfer model: raw uint8 pixels -> preprocessing -> backbone -> new head.

`TransferModel` is a plain Keras model: `compile()` and `fit()` work as usual.
It adds two things to Keras's training:

* the L2-SP penalty (`tfxfer.penalties.L2SP`), added to the data loss by
  `compute_loss` in training only and logged as its own metric `l2sp` (and
  `head_l2`);
* optional optimizers of the backbone's own (`compile(backbone_optimizer=)`):
  one for the whole backbone, or one per stage (layer-wise learning-rate
  decay), so each part has its own learning rate without scaling gradients,
  which Adam would undo. Only then does it override `train_step`.
"""

import keras
import tensorflow as tf

from tfxfer.backbones import create_backbone, get_backbone
from tfxfer.backbones.pretrained import input_normalization
from tfxfer.backbones.registry import backbone_units, feature_pool, set_bn_momentum
from tfxfer.freezing import apply_freeze, parse_freeze
from tfxfer.optim import regrow
from tfxfer.penalties import L2SP

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
        **kwargs,
    ):
        super().__init__(**kwargs)
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
        self.head.build((None, self.backbone.output.shape[-1]))
        set_bn_momentum(self.backbone, self.bn_momentum)
        self.trained_layers = apply_freeze(self.backbone, spec, self.freeze, self.train_bn)
        self.penalty = L2SP(self.backbone, l2sp, l2sp_scope, self.head.weights, head_l2)
        self._track_penalties()
        self.stage_optimizers = {}
        self.built = True

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

    def set_freeze(self, freeze, train_bn=None):
        """Apply another freeze policy, mid-training if need be.

        Nothing about the trainable set is fixed at build time: the L2-SP
        pairs, the optimizer groups and the weight-decay exclusion follow
        `trainable` when the step is traced, so the step is traced again. A
        compiled model's optimizers are regrown (`tfxfer.optim.regrow`):
        weights that were training keep their optimizer state and step count,
        weights that start training get fresh slots. BatchNorm stays as
        `train_bn` says, and the L2-SP anchors stay the starting weights.
        """
        if train_bn is not None:
            self.train_bn = bool(train_bn)
        self.freeze = str(parse_freeze(freeze))
        self.trained_layers = apply_freeze(self.backbone, get_backbone(self.backbone_name), self.freeze, self.train_bn)
        if getattr(self, "optimizer", None) is not None and self.optimizer.built:
            head_weights, groups = self._by_group(self.trainable_weights)
            self.optimizer = regrow(self.optimizer, head_weights)
            regrown = {id(o): regrow(o, weights) for o, weights in zip(self.backbone_optimizers, groups)}
            self.stage_optimizers = {stage: regrown[id(o)] for stage, o in self.stage_optimizers.items()}
        self.train_function = self.test_function = self.predict_function = None
        return self.trained_layers

    def call(self, images, training=False):
        x = self.preprocess(images)
        x = self.backbone(x, training=training)
        x = self.pool(x)
        x = self.drop(x, training=training)
        return self.head(x)

    def compile(self, optimizer="rmsprop", *args, backbone_optimizer=None, **kwargs):
        """Keras's `compile` (same positional arguments), plus an optional
        keyword-only optimizer for the backbone's weights: one optimizer, or a
        dict from stage name to optimizer (every stage named; stages may share
        one)."""
        super().compile(optimizer, *args, **kwargs)
        stages = get_backbone(self.backbone_name).stages
        if backbone_optimizer is None or isinstance(backbone_optimizer, dict):
            self.stage_optimizers = dict(backbone_optimizer or {})
            if self.stage_optimizers and set(self.stage_optimizers) != set(stages):
                raise ValueError(f"backbone_optimizer must name every stage of {self.backbone_name}: {stages}.")
        else:
            self.stage_optimizers = {stage: backbone_optimizer for stage in stages}
        if self.stage_optimizers:
            # Build each optimizer on its own group only: no slots for the others.
            head_weights, groups = self._by_group(self.trainable_weights)
            self.optimizer.build(head_weights)
            for backbone_optimizer, weights in zip(self.backbone_optimizers, groups):
                backbone_optimizer.build(weights)

    def compile_from_config(self, config):
        # Used by keras.models.load_model. The backbone optimizer is not part of
        # the saved compile config: a loaded model has one optimizer until
        # compiled again with `backbone_optimizer=`.
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    def _by_group(self, items, weight_of=lambda item: item):
        """Split `items` into `(head, [group of each backbone optimizer])` by
        the weight each one holds; without backbone optimizers, `(items, [])`."""
        optimizers = self.backbone_optimizers
        if not optimizers:
            return list(items), []
        spec = get_backbone(self.backbone_name)
        index = {id(o): i for i, o in enumerate(optimizers)}
        # A weight outside the stage map's layers goes with the input stage.
        first = index[id(self.stage_optimizers[spec.stages[0]])]
        group_of = {id(w): first for w in self.backbone.weights}
        for layer, stage in backbone_units(self.backbone, spec):
            for w in layer.weights:
                group_of[id(w)] = index[id(self.stage_optimizers[stage])]
        head, groups = [], [[] for _ in optimizers]
        for item in items:
            group = group_of.get(id(weight_of(item)))
            (head if group is None else groups[group]).append(item)
        return head, groups

    def train_step(self, data):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.backbone_optimizer is None and replicas == 1:
            return super().train_step(data)
        # Keras's step, with the gradients split between the two optimizers,
        # and (under several replicas) the loss logged as one process would.
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss, logged = self.penalized_losses(x, y, y_pred, sample_weight)
            track_loss(self, logged, tf.shape(x)[0])
            scaled = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        pairs = list(zip(tape.gradient(scaled, weights), weights))
        head, groups = self._by_group(pairs, weight_of=lambda pair: pair[1])
        self.optimizer.apply_gradients(head)
        for backbone_optimizer, group in zip(self.backbone_optimizers, groups):
            if group:
                backbone_optimizer.apply_gradients(group)
            else:
                # A frozen part (the probe of LP-FT) still counts the steps,
                # so its schedule is where the head's is when it starts training.
                backbone_optimizer.iterations.assign_add(1)
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
