"""What the step benchmarks share: cached random batches, and the median step time."""

import statistics
import time


def random_batches(size, batch, batches=4, seed=0):
    """An endless `tf.data` of `batches` cached batches of random uint8 images and 10 labels."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch * batches, size, size, 3), np.uint8)
    labels = rng.integers(0, 10, batch * batches).astype("int32")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).cache().repeat()


def median_step_seconds(model, batches, steps, warmup):
    """The median time of `steps` calls of the model's compiled train function, after `warmup` calls."""
    for _ in range(warmup):
        model.train_function(batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(model.train_function(batches)["loss"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)
