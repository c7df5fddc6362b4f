"""tfxfer's compiled kernel: the SGD momentum update with the L2-SP pull in it.

The reference is what runs without it: the penalty's gradient from the tape,
added to the data gradient, then TensorFlow's `ResourceApplyKerasMomentum`.
The kernel does the same float32 arithmetic in the same order, so the weights
must match bit for bit, not within a tolerance.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfxfer
import tfxfer.kernels
from tfxfer.optim import SGD
from tests.conftest import random_images

X, Y = random_images(32), np.arange(32) % 3


@pytest.fixture(scope="module")
def kernel():
    module = tfxfer.kernels.anchored_momentum()
    assert module is not None, f"the kernel did not build: {tfxfer.kernels.unavailable_reason()}"
    return module


@pytest.mark.parametrize("nesterov", [False, True])
def test_kernel_matches_the_tape_and_tensorflows_momentum_bit_for_bit(kernel, nesterov):
    rng = np.random.default_rng(0)
    shape = (3, 3, 16, 40)  # 5,760 elements: several of the kernel's blocks
    start, velocity, grad = (rng.normal(size=shape).astype("float32") for _ in range(3))
    anchor = (start + 0.05 * rng.normal(size=shape)).astype("float32")
    lr, momentum, alpha = 0.03, 0.9, 0.7

    w, v = tf.Variable(start), tf.Variable(velocity)
    distance = kernel.tfxfer_anchored_momentum(w.handle, v.handle, anchor, grad, lr, momentum, 2 * alpha, use_nesterov=nesterov)

    w_ref, v_ref = tf.Variable(start), tf.Variable(velocity)
    with tf.GradientTape() as tape:
        penalty = (2 * alpha) * tf.nn.l2_loss(w_ref - anchor)
    pull = tape.gradient(penalty, w_ref)
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=w_ref.handle, accum=v_ref.handle, lr=lr, grad=grad + pull, momentum=momentum, use_nesterov=nesterov
    )
    np.testing.assert_array_equal(w.numpy(), w_ref.numpy())
    np.testing.assert_array_equal(v.numpy(), v_ref.numpy())
    assert not np.array_equal(w.numpy(), start)
    assert float(distance) == pytest.approx(float(np.sum((start.astype("float64") - anchor) ** 2)), rel=1e-6)


def test_a_value_read_before_the_update_keeps_its_value(kernel):
    start = np.arange(12, dtype="float32").reshape(3, 4)
    w, v = tf.Variable(start), tf.Variable(np.zeros_like(start))

    @tf.function
    def read_then_update():
        before = w.read_value()
        with tf.control_dependencies([before]):
            kernel.tfxfer_anchored_momentum(w.handle, v.handle, np.zeros_like(start), np.ones_like(start), 0.1, 0.9, 1.0)
        return before

    np.testing.assert_array_equal(read_then_update().numpy(), start)
    assert not np.array_equal(w.numpy(), start)


def test_mismatched_shapes_are_refused(kernel):
    w, v = tf.Variable(tf.zeros([4])), tf.Variable(tf.zeros([4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="differ in shape"):
        kernel.tfxfer_anchored_momentum(w.handle, v.handle, tf.zeros([5]), tf.zeros([4]), 0.1, 0.9, 1.0)


def _train(kernel_on, monkeypatch, **model_options):
    """Two epochs of a tiny model with L2-SP and tfxfer's SGD; returns the
    weights, the history, the model, and how often the step asked for the kernel."""
    keras.utils.set_random_seed(0)
    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, **model_options)
    rng = np.random.default_rng(1)
    for w in model.backbone.trainable_weights:  # away from the anchors, so the pull is not zero
        w.assign(w.numpy() + rng.normal(0, 0.1, w.shape).astype("float32"))
    optimizer = SGD(0.05, momentum=0.9, nesterov=True)
    if not kernel_on:
        monkeypatch.setattr(optimizer, "can_pull", lambda: False)
    calls = []
    build = tfxfer.kernels.anchored_momentum

    def counting():
        calls.append(1)
        return build()

    monkeypatch.setattr(tfxfer.kernels, "anchored_momentum", counting)
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    monkeypatch.setattr(tfxfer.kernels, "anchored_momentum", build)
    return [w.numpy() for w in model.weights], history, model, len(calls)


@pytest.mark.parametrize("options", [dict(freeze="full"), dict(freeze="full", train_bn=True, l2sp_scope="all")])
def test_training_with_the_kernel_equals_training_without_it(kernel, monkeypatch, options):
    options = dict(l2sp=0.5, **options)
    fused, fused_history, model, asked = _train(True, monkeypatch, **options)
    plain, plain_history, _, not_asked = _train(False, monkeypatch, **options)
    assert model._pulling_optimizer() is model.optimizer
    assert asked > len(model.penalty.penalized()) and not_asked == 0
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(a, b)
    assert fused_history["loss"] == plain_history["loss"]
    np.testing.assert_allclose(fused_history["l2sp"], plain_history["l2sp"], rtol=1e-5)
    assert min(fused_history["l2sp"]) > 0


def test_the_kernel_is_used_only_where_it_can_be(kernel, monkeypatch):
    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, l2sp=0.5)
    model.compile(SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    assert model._pulling_optimizer() is model.optimizer
    model.compile(SGD(0.1), "sparse_categorical_crossentropy")  # no momentum slots to fold into
    assert model._pulling_optimizer() is None
    model.compile(SGD(0.1, momentum=0.9, clipnorm=1.0), "sparse_categorical_crossentropy")  # the pull would escape the clip
    assert model._pulling_optimizer() is None
    model.compile(keras.optimizers.Adam(0.1), "sparse_categorical_crossentropy")
    assert model._pulling_optimizer() is None
    model.compile(SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", jit_compile=True)  # no XLA kernel
    assert model._pulling_optimizer() is None
    model.compile(SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", backbone_optimizer=keras.optimizers.Adam(0.1))
    assert model._pulling_optimizer() is None
    model.compile(keras.optimizers.Adam(0.1), "sparse_categorical_crossentropy", backbone_optimizer=SGD(0.1, momentum=0.9))
    assert model._pulling_optimizer() is model.backbone_optimizer
    without = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, l2sp=0.0)
    without.compile(SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    assert without._pulling_optimizer() is None


def test_without_a_compiler_training_says_so_once_and_uses_tensorflow_ops(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(tfxfer.kernels, "KERNEL_DIR", str(tmp_path))
    tfxfer.kernels._load.cache_clear()
    try:
        assert tfxfer.kernels.anchored_momentum() is None
        assert tfxfer.kernels.anchored_momentum() is None
        reason = tfxfer.kernels.unavailable_reason()
        assert "no-such-compiler" in reason
        assert capsys.readouterr().err.count("the fused L2-SP update is off") == 1

        model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, freeze="full", l2sp=0.5)
        model.compile(SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
        assert model._pulling_optimizer() is None
        history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0).history
        assert np.isfinite(history["loss"][0]) and "l2sp" in history
    finally:
        tfxfer.kernels._load.cache_clear()
