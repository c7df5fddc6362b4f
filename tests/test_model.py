"""The training step of `TransferModel`: Keras's own, plus the backbone's optimizer."""

import keras
import numpy as np
import pytest

from tests.conftest import random_images

X, Y = random_images(16), np.arange(16) % 3


def test_loss_logged_with_a_backbone_optimizer_is_keras_loss(tiny_model_factory):
    # With a backbone optimizer the step is Keras's own, through a MultiOptimizer;
    # with a learning rate of 0 nothing moves, so the logged loss is the data loss.
    model = tiny_model_factory(freeze="full")
    model.compile(optimizer=keras.optimizers.SGD(0.0), backbone_optimizer=keras.optimizers.SGD(0.0),
                  loss="sparse_categorical_crossentropy")
    logs = model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    expected = keras.losses.sparse_categorical_crossentropy(Y, model.predict(X, verbose=0)).numpy().mean()
    assert logs["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_training_loss_adds_the_penalties_and_evaluation_does_not(tiny_model_factory):
    model = tiny_model_factory(freeze="full", train_bn=False, l2sp=0.5, head_l2=0.1)
    rng = np.random.default_rng(1)
    for w in model.backbone.trainable_weights:
        w.assign(w.numpy() + rng.normal(0, 0.1, w.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    logs = model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    data = keras.losses.sparse_categorical_crossentropy(Y, model.predict(X, verbose=0)).numpy().mean()
    assert logs["l2sp"][0] > 0.01 and logs["head_l2"][0] > 0
    assert logs["loss"][0] == pytest.approx(data + logs["l2sp"][0] + logs["head_l2"][0], rel=1e-5)
    assert model.evaluate(X, Y, verbose=0, return_dict=True)["loss"] == pytest.approx(data, rel=1e-5)


def test_penalties_that_are_off_are_not_logged(tiny_model_factory):
    model = tiny_model_factory(freeze="full")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    logs = model.fit(X, Y, batch_size=16, epochs=1, verbose=0).history
    assert "l2sp" not in logs and "head_l2" not in logs


def test_keras_export_works_on_a_trained_transfer_model(tiny_model_factory, tmp_path):
    import tensorflow as tf

    model = tiny_model_factory(freeze="full")
    model.compile(optimizer=keras.optimizers.SGD(0.01), backbone_optimizer=keras.optimizers.SGD(0.001),
                  loss="sparse_categorical_crossentropy")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = loaded.serve(tf.constant(X, tf.float32)).numpy()
    np.testing.assert_allclose(served, model.predict(X, verbose=0), atol=1e-5)
