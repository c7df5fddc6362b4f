"""Weight EMA: an exponential moving average of the weights that train.

`--ema 0.999` keeps, beside the trained weights, their average

    average <- d * average + (1 - d) * weight,   d = min(decay, (1 + n) / (10 + n))

after each of the n training steps so far (the warm-up of TensorFlow's
`tf.train.ExponentialMovingAverage`, so a short run is not an average of its
starting point). Validation, the best-epoch choice, the test metrics and the
export all see the averaged weights: `AveragedWeights` swaps them in for every
evaluation and back out for training, and the best epoch is saved averaged.

The average covers every floating-point weight of the model, trainable or not,
and moves the ones that train now: a weight that starts training when a
phase of gradual unfreezing begins starts its average at its frozen value.
BatchNorm moving statistics (weights that never train through gradients) are
used as they are. The averages and the step count live in the run's
checkpoint, so a resumed run continues the same average bit for bit.

It is independent of the optimizers: one, two, or one per stage, and the
head trained on cached features, all move weights this average follows.
"""

import keras
import tensorflow as tf

__all__ = ["WeightAverage", "AveragedWeights"]


class WeightAverage:
    """The moving averages of `model`'s floating-point weights.

    Args:
        model: a built Keras model.
        decay: the average's decay, in (0, 1).

    `state` is what a checkpoint holds: the averages and the step count.
    """

    def __init__(self, model, decay):
        self.decay = float(decay)
        self._weights = [w for w in model.weights if "float" in str(w.dtype)]
        self.state = tf.Module(name="weight_average")
        self.state.averages = [tf.Variable(w.numpy(), trainable=False, name="average") for w in self._weights]
        self.state.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")
        self.averages, self.updates = self.state.averages, self.state.updates
        self._update_functions = {}

    def update(self):
        """One step of the average over the weights that train now."""
        training = tuple(i for i, w in enumerate(self._weights) if w.trainable)
        if training not in self._update_functions:  # a freeze policy changed what trains
            self._update_functions[training] = tf.function(lambda: self._update(training))
        self._update_functions[training]()

    def _update(self, indices):
        n = tf.cast(self.updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
        for i in indices:
            average, weight = self.averages[i], self._weights[i]
            average.assign(decay * average + (1.0 - decay) * tf.cast(tf.convert_to_tensor(weight), average.dtype))
        self.updates.assign_add(1)

    def swap(self):
        """Exchange the model's weights and their averages."""
        for average, weight in zip(self.averages, self._weights):
            live = tf.identity(tf.convert_to_tensor(weight))
            weight.assign(tf.convert_to_tensor(average))
            average.assign(live)

    def save_averaged(self, save_weights):
        """`save_weights(path)` for the averaged weights: swapped in for the write."""

        def save(path):
            self.swap()
            try:
                save_weights(path)
            finally:
                self.swap()

        return save


class AveragedWeights(keras.callbacks.Callback):
    """Update `average` after every training step and evaluate with the
    averaged weights: swapped in when an evaluation begins and out when it ends."""

    def __init__(self, average):
        super().__init__()
        self.average = average
        self._swapped = False

    def on_train_batch_end(self, batch, logs=None):
        self.average.update()

    def on_test_begin(self, logs=None):
        if not self._swapped:
            self.average.swap()
            self._swapped = True

    def on_test_end(self, logs=None):
        if self._swapped:
            self.average.swap()
            self._swapped = False
