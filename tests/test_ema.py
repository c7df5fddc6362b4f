"""Weight EMA: the average's arithmetic, and that validation, the best epoch,
the test metrics and the export all use the averaged weights."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import run_cli, write_splits
from tfxfer.averaging import WeightAverage
from tfxfer.config import load_config
from tfxfer.errors import TfxferError


def test_the_average_warms_up_then_follows_the_decay_and_swaps(tiny_model_factory):
    model = tiny_model_factory(freeze="head")  # only the head trains
    average = WeightAverage(model, 0.9)
    kernel, start = model.head.kernel, model.head.kernel.numpy().copy()
    frozen = model.backbone.get_layer("s0_conv").kernel
    expected = start.copy()
    for n in range(30):
        kernel.assign(kernel.numpy() + 1.0)
        frozen.assign(frozen.numpy() + 1.0)  # moved by hand, but not training: not averaged
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * kernel.numpy()
        average.update()
    live = kernel.numpy().copy()
    index = [i for i, w in enumerate(average._weights) if w is kernel][0]
    frozen_index = [i for i, w in enumerate(average._weights) if w is frozen][0]
    np.testing.assert_allclose(average.averages[index].numpy(), expected, rtol=1e-5)
    assert int(average.updates.numpy()) == 30
    assert not np.allclose(average.averages[frozen_index].numpy(), frozen.numpy())
    average.swap()
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-5)
    average.swap()
    np.testing.assert_array_equal(kernel.numpy(), live)


def test_bad_ema_values_and_distribute_get_one_sentence():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(TfxferError, match=r"ema must be between 0 and 1"):
            load_config(dataset="digits", ema=bad)
    with pytest.raises(TfxferError, match=r"--ema is not available with --distribute"):
        load_config(dataset="digits", ema=0.99, distribute="mirrored")


def test_the_best_epoch_the_test_metrics_and_the_export_are_the_averaged_weights(tmp_path):
    import tfxfer

    data = write_splits(tmp_path / "data", train=8, test=3, classes=("cat", "dog"))

    class LiveWeights(keras.callbacks.Callback):
        def on_train_end(self, logs=None):  # after the last evaluation has swapped the averages out
            self.weights = [w.numpy().copy() for w in self.model.weights if "float" in str(w.dtype)]

    live = LiveWeights()
    config = tfxfer.load_config(data_dir=data, backbone="resnet9", weights="none", image_size=32, epochs=1,
                                freeze="full", ema=0.5, batch_size=4, output_dir=str(tmp_path / "runs"), run_name="e")
    result = tfxfer.finetune(config, callbacks=[live], verbose=0)
    run = tmp_path / "runs" / "e"
    state = json.loads((run / "checkpoint" / "state.json").read_text())["checkpoint"]
    reader = tf.train.load_checkpoint(str(run / state))  # relative to the run folder
    count = sum(1 for n in reader.get_variable_to_shape_map() if n.startswith("ema/averages/"))
    averages = [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(count)]
    final = [w.numpy() for w in result.model.weights if "float" in str(w.dtype)]
    assert len(final) == count == len(live.weights)
    for got, average in zip(final, averages):  # the only epoch is the best: its average was saved
        np.testing.assert_array_equal(got, average)
    assert any(not np.array_equal(a, w) for a, w in zip(averages, live.weights))
    assert result.metrics["export_max_abs_diff"] < 1e-4  # the export serves the model that was tested


@pytest.mark.slow
def test_ema_follows_a_cached_head_and_two_optimizers(tmp_path):
    data = write_splits(tmp_path / "data", train=8, test=3, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
                     "--epochs", "2", "--unfreeze", "head@0,full@1", "--backbone-lr-mult", "0.5", "--ema", "0.5",
                     "--batch-size", "4", "--output-dir", tmp_path / "runs", "--run-name", "c")
    assert result.exit_code == 0, result.output
    assert "weight EMA: decay 0.5" in result.output and "feature cache" in result.output.lower()
