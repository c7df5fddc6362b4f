"""Layer-wise learning-rate decay: one optimizer per stage, exact for SGD, Adam and AdamW."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import random_images, run_cli, write_splits
from tfxfer.config import load_config
from tfxfer.errors import TfxferError
from tfxfer.optim import make_optimizers, stage_lr_multipliers

LR, DECAY, WEIGHT_DECAY = 0.1, 0.5, 0.01


def test_multipliers_fall_by_the_decay_per_stage_below_the_head():
    assert stage_lr_multipliers(("stem", "a", "b"), 0.5) == {"stem": 0.125, "a": 0.25, "b": 0.5}
    assert stage_lr_multipliers(("a", "b"), 0.5, backbone_mult=0.1) == pytest.approx({"a": 0.025, "b": 0.05})


def _first_step(kind, g, w0, lr):
    """The first update of weight `w0` with gradient `g` at learning rate `lr`."""
    if kind == "sgd":  # momentum starts at 0: the first step is plain SGD
        return -lr * g
    b1, b2, eps = 0.9, 0.999, 1e-7
    m, v = (1 - b1) * g, (1 - b2) * g * g
    step = -lr * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)
    return step - (lr * WEIGHT_DECAY * w0 if kind == "adamw" else 0.0)


@pytest.mark.parametrize("kind, precision", [("sgd", "float32"), ("adam", "float32"), ("adamw", "float32"),
                                             ("sgd", "mixed_float16"), ("adam", "mixed_float16")])
def test_the_first_update_of_each_stage_is_lr_times_decay_to_the_k(tiny_model_factory, kind, precision):
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = tiny_model_factory(freeze="full")
        _check_first_update(model, kind, precision)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _check_first_update(model, kind, precision):
    config = load_config(dataset="digits", optimizer=kind, lr=LR, lr_decay=DECAY,
                         weight_decay=WEIGHT_DECAY if kind == "adamw" else 0.0)
    head, stages = make_optimizers(config, model, steps_per_epoch=1)
    model.compile(optimizer=head, backbone_optimizer=stages, loss="sparse_categorical_crossentropy")
    if precision == "mixed_float16":  # Keras's loss scaling wraps the per-stage optimizers
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.MultiOptimizer)
    x, y = random_images(8), np.arange(8) % 3
    kernels = {"head": model.head.kernel, **{s: model.backbone.get_layer(f"{s}_conv").kernel for s in ("s0", "s1", "s2")}}
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    gradients = dict(zip(kernels, tape.gradient(loss, list(kernels.values()))))
    before = {k: w.numpy().copy() for k, w in kernels.items()}
    model.train_on_batch(x, y)
    for name, k in (("head", 0), ("s2", 1), ("s1", 2), ("s0", 3)):
        lr = LR * DECAY ** k
        expected = _first_step(kind, gradients[name].numpy(), before[name], lr)
        moved = kernels[name].numpy() - before[name]
        if precision == "float32":
            np.testing.assert_allclose(moved, expected, rtol=2e-3, atol=1e-7, err_msg=f"{kind}, {name}: k={k}")
        else:
            # The step's float16 gradients are loss-scaled, the reference's are not: a few weights with
            # near-zero gradients differ (Adam's g / (|g| + eps)); a wrong stage rate moves them all.
            off = np.abs(moved - expected)
            assert np.quantile(off, 0.99) <= 2e-2 * lr, f"{kind}, {name}: k={k}"
            assert np.abs(moved).max() <= lr * 1.01 + 1e-6, f"{kind}, {name}: k={k}"


def test_a_bad_lr_decay_is_refused_in_one_sentence():
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(TfxferError, match=r"lr_decay must be above 0 and at most 1"):
            load_config(dataset="digits", lr_decay=bad)


@pytest.mark.slow
def test_lr_decay_runs_with_gradual_unfreezing_and_resumes_exactly(tmp_path):
    data = write_splits(tmp_path / "data", train=6, test=2, classes=("cat", "dog"))
    common = ["--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32", "--epochs", "3",
              "--unfreeze", "head@0,stages:2@1,full@2", "--lr-decay", "0.5", "--optimizer", "adam",
              "--batch-size", "4", "--output-dir", tmp_path / "runs", "--seed", "3",
              "--schedule", "constant"]  # the run is stopped after 2 epochs and extended to 3: a cosine would stretch
    whole = run_cli("finetune", *common, "--run-name", "whole")
    assert whole.exit_code == 0, whole.output
    first = run_cli("finetune", *common, "--epochs", "2", "--run-name", "split")
    assert first.exit_code == 0, first.output
    resumed = run_cli("finetune", *common, "--run-name", "split", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming split after epoch 2" in resumed.output
    from tfxfer.runs import read_history

    a, b = read_history(tmp_path / "runs" / "whole"), read_history(tmp_path / "runs" / "split")
    assert a["loss"] == b["loss"] and a["backbone_lr"] == b["backbone_lr"]


def test_mixed_float16_trains_with_lr_decay_from_the_command_line(tmp_path):
    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "4", "--lr-decay", "0.5", "--backbone-lr-mult", "0.5",
                     "--precision", "mixed_float16", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "precision: mixed_float16" in result.output


def test_every_backbone_weight_maps_to_its_stage_by_the_layer_that_holds_it(tiny_model_factory):
    from tfxfer.backbones import get_backbone
    from tfxfer.backbones.registry import backbone_units
    from tfxfer.optim import optimizer_map

    model = tiny_model_factory(freeze="head")  # frozen weights are mapped too, for a later policy
    config = load_config(dataset="digits", lr=LR, lr_decay=DECAY)
    head, stages = make_optimizers(config, model, steps_per_epoch=1)
    model.compile(optimizer=head, backbone_optimizer=stages, loss="sparse_categorical_crossentropy")
    mapping = optimizer_map(model.optimizer)
    for layer, stage in backbone_units(model.backbone, get_backbone("tiny")):
        for w in layer.weights:
            assert mapping(w) is stages[stage], w.path
    assert all(mapping(w) is head for w in model.head.weights)
    # Patterns name layers, not weights: a weight Keras numbers by what it built before still maps.
    assert all(pattern.endswith("/[^/]+") for pattern in mapping)
