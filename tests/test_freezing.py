"""For every freeze policy, one epoch of training must leave BatchNorm statistics
and frozen kernels bit-identical and change every trainable kernel."""

import keras
import numpy as np
import pytest

import tfxfer
from tfxfer.backbones import layer_stages
from tests.conftest import random_images

# (backbone, policy): the tiny three-stage net of conftest for every policy, and ResNet50 once,
# where its size is the point (its real layer names and 53 BatchNorm layers).
POLICIES = [("tiny", "head"), ("tiny", "full"), ("tiny", "stages:2"), ("tiny", "from:s2_conv"),
            pytest.param("resnet50", "from:conv5_block2_1_conv", marks=pytest.mark.slow)]


def _snapshot(model):
    return {w.path: w.numpy().copy() for w in model.backbone.weights}


def _train_one_epoch(model):
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    x, y = random_images(64), np.arange(64) % 3
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def _kind(path):
    return path.rsplit("/", 1)[-1]


@pytest.mark.parametrize("backbone, policy", POLICIES)
def test_policy_freezes_exactly_what_it_says(backbone, policy):
    model = tfxfer.build_model(backbone, num_classes=3, weights=None, image_size=32, freeze=policy)
    before = _snapshot(model)
    trainable = {w.path for w in model.backbone.trainable_weights}
    _train_one_epoch(model)
    after = _snapshot(model)

    for path, value in before.items():
        if _kind(path) in ("moving_mean", "moving_variance"):
            assert np.array_equal(value, after[path]), f"BN statistic {path} moved"
        elif path in trainable:
            assert not np.array_equal(value, after[path]), f"trainable {path} did not change"
        else:
            assert np.array_equal(value, after[path]), f"frozen {path} changed"


def test_policies_select_the_right_layers():
    spec = tfxfer.get_backbone("resnet50")
    full = tfxfer.build_model("resnet50", num_classes=3, weights=None, image_size=32, freeze="full")
    assert len(full.backbone.trainable_weights) > 0
    assert not any("gamma" in w.path or "beta" in w.path for w in full.backbone.trainable_weights)

    head = tfxfer.build_model("resnet50", num_classes=3, weights=None, image_size=32, freeze="head")
    assert head.backbone.trainable_weights == []
    assert {w.path for w in head.trainable_weights} == {"head/kernel", "head/bias"}

    staged = tfxfer.build_model("resnet50", num_classes=3, weights=None, image_size=32, freeze="stages:2")
    stages = layer_stages(staged.backbone, spec)
    for layer in staged.backbone.layers:
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            assert layer.trainable == (stages[layer.name] in ("conv4", "conv5")), layer.name


def test_train_bn_lets_statistics_of_the_training_part_move():
    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, freeze="stages:1", train_bn=True)
    before = _snapshot(model)
    _train_one_epoch(model)
    after = _snapshot(model)
    assert not np.array_equal(before["s2_bn/moving_mean"], after["s2_bn/moving_mean"])
    assert np.array_equal(before["s1_bn/moving_mean"], after["s1_bn/moving_mean"])


@pytest.mark.parametrize(
    "backbone, policy, message",
    [("tiny", "stages:9", "has 3 stages"), ("tiny", "from:s2_cnv", "did you mean 's2_conv'"),
     ("resnet50", "from:conv5_blok1_1_conv", "did you mean 'conv5_block1_1_conv'"),
     ("tiny", "some", "Unknown freeze policy")],
)
def test_bad_policies_fail_clearly(backbone, policy, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        tfxfer.build_model(backbone, num_classes=3, weights=None, image_size=32, freeze=policy)


def test_set_freeze_recomputes_the_trainable_set(tiny_model_factory):
    model = tiny_model_factory(freeze="head", l2sp=0.1)
    assert model.penalty.penalized() == [] and model.backbone.trainable_weights == []
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    model.fit(random_images(8), np.arange(8) % 3, epochs=1, verbose=0)

    model.set_freeze("stages:1")
    penalized = {w.path for w, _ in model.penalty.penalized()}
    assert penalized == {"s2_conv/kernel"}  # kernels of the last stage only; BN stays frozen
    assert {w.path for w in model.backbone.trainable_weights} == {"s2_conv/kernel", "s2_conv/bias"}
    assert model.train_function is None  # the step is traced again with the new set
    # Anchors were captured once, at build: the pull is still toward the starting weights.
    assert float(model.penalty()) == 0.0
