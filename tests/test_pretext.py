import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfxfer.pretext.autoencoder import Autoencoder, noisy
from tfxfer.pretext.simclr import SimCLR, embedding_std, knn_accuracy, nt_xent, simclr_views


def _nt_xent_numpy(z1, z2, tau):
    """NT-Xent written out row by row: 2N anchors, each with one positive."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses, hits = [], []
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        others = [k for k in range(2 * n) if k != i]
        sims = np.array([z[i] @ z[k] / tau for k in others])
        losses.append(-(z[i] @ z[positive] / tau) + np.log(np.exp(sims).sum()))
        hits.append(others[int(np.argmax(sims))] == positive)
    return np.mean(losses), np.mean(hits)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(8, 16)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(8, 16))).astype(np.float32)  # views of the same images
    loss, accuracy = nt_xent(tf.constant(z1), tf.constant(z2), tau)
    expected_loss, expected_accuracy = _nt_xent_numpy(z1, z2, tau)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    # Both directions count: swapping the views changes nothing.
    assert float(nt_xent(tf.constant(z2), tf.constant(z1), tau)[0]) == pytest.approx(expected_loss, rel=1e-5)


def test_nt_xent_rewards_matching_views():
    z = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    matched, accuracy = nt_xent(tf.constant(z), tf.constant(z), 0.2)
    shuffled, _ = nt_xent(tf.constant(z), tf.constant(z[::-1].copy()), 0.2)
    assert float(accuracy) == 1.0 and float(matched) < float(shuffled)


def test_collapse_statistic():
    constant = tf.ones((32, 128))  # a constant encoder: every embedding is the same
    assert float(embedding_std(constant)) == pytest.approx(0.0, abs=1e-6)
    spread = tf.constant(np.random.default_rng(0).normal(size=(4096, 128)), tf.float32)
    # Isotropic embeddings on the sphere: about 1/sqrt(d), the healthy value.
    assert float(embedding_std(spread)) == pytest.approx(1 / math.sqrt(128), rel=0.05)


def test_simclr_views_are_seeded_and_differ():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 3)), tf.uint8)
    a1, a2 = simclr_views(image, tf.constant([1, 2], tf.int64))
    b1, b2 = simclr_views(image, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a1.numpy(), b1.numpy())
    assert a1.shape == (32, 32, 3) and a1.dtype == tf.uint8 and not np.array_equal(a1.numpy(), a2.numpy())


def test_knn_accuracy_by_hand():
    features = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    # Leave-one-out with k=1 (cosine): [0.8, 0.2], labelled 1, is nearest to [0.9, 0.1], a 0;
    # every other point's nearest neighbour shares its label.
    assert knn_accuracy(features, labels, k=1) == pytest.approx(4 / 5)


def test_simclr_trains_without_labels():
    model = SimCLR("simplecnn", 32, temperature=0.2, projection_dim=16)
    model.compile(keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    views = (tf.constant(images), tf.constant(images[:, :, ::-1].copy()))
    data = tf.data.Dataset.from_tensors((views, tf.zeros(16, tf.int32))).repeat(3)
    logs = model.fit(data, verbose=0).history
    assert {"loss", "contrastive_accuracy", "embedding_std"} <= set(logs)


@pytest.mark.parametrize("backbone", ["simplecnn", pytest.param("resnet9", marks=pytest.mark.slow)])
def test_autoencoder_loss_falls(backbone):
    keras.utils.set_random_seed(0)
    model = Autoencoder(backbone, 32)
    assert model(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 32, 32, 3)
    model.compile(keras.optimizers.Adam(3e-3))
    # Smooth images: a gradient plus a per-image brightness.
    ramp = np.linspace(0, 200, 32)[None, None, :, None] * np.ones((8, 32, 32, 3))
    images = (ramp + np.arange(8)[:, None, None, None] * 6).astype(np.uint8)
    data = tf.data.Dataset.from_tensors(((images, images), tf.zeros(8, tf.int32))).repeat(30)
    history = model.fit(data, epochs=2, verbose=0).history["loss"]
    # In inference mode too (BatchNorm's moving statistics have caught up).
    evaluated = float(model.evaluate(tf.data.Dataset.from_tensors(((images, images), tf.zeros(8, tf.int32))), verbose=0))
    assert history[-1] < history[0] and evaluated < 0.05


def test_denoising_noise_is_seeded_and_bounded():
    image = tf.fill((8, 8, 3), tf.constant(128, tf.uint8))
    a = noisy(image, tf.constant([3, 4]), 0.1).numpy().astype(int)
    b = noisy(image, tf.constant([3, 4]), 0.1).numpy().astype(int)
    np.testing.assert_array_equal(a, b)
    assert 10 < np.std(a - 128) < 40  # 0.1 of 255 = 25.5
