import keras
import numpy as np
import pytest
import tensorflow as tf

import tfxfer
from tfxfer import speedups as convolution
from tfxfer.runtime import onednn_enabled
from tests.conftest import random_images


def _gradients(conv, x, kernel, upstream):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv(x, kernel)
    return [y, *tape.gradient(y, [x, kernel], output_gradients=upstream)]


@pytest.mark.parametrize("size, stride, padding", [(5, 1, "VALID"), (5, 2, "VALID"), (5, 2, "SAME"), (1, 1, "SAME")])
def test_pointwise_equals_conv2d_forward_and_backward(size, stride, padding):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, size, size, 6)), tf.float32)
    kernel = tf.constant(rng.normal(size=(1, 1, 6, 4)), tf.float32)
    expected_shape = tf.nn.conv2d(x, kernel, stride, padding).shape
    upstream = tf.constant(rng.normal(size=expected_shape), tf.float32)
    ours = _gradients(lambda a, k: convolution.pointwise(a, k, stride), x, kernel, upstream)
    reference = _gradients(lambda a, k: tf.nn.conv2d(a, k, stride, padding), x, kernel, upstream)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel_size, stride, padding", [(1, 3, 1, "SAME"), (2, 3, 1, "SAME"), (4, 3, 2, "SAME"), (4, 3, 1, "VALID"), (3, 2, 1, "SAME")])
def test_patch_gradient_conv_equals_conv2d_forward_and_backward(size, kernel_size, stride, padding):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(4, size, size, 5)), tf.float32)
    kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, 5, 7)), tf.float32)
    upstream = tf.constant(rng.normal(size=tf.nn.conv2d(x, kernel, stride, padding).shape), tf.float32)
    ours = _gradients(lambda a, k: convolution.patch_gradient_conv(a, k, stride, padding), x, kernel, upstream)
    reference = _gradients(lambda a, k: tf.nn.conv2d(a, k, stride, padding), x, kernel, upstream)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def _small_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)  # 64 pixels out: Keras's own
    x = keras.layers.Conv2D(16, 1, strides=2)(x)  # 1x1 on 16 pixels out: a matrix product
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)  # 4 pixels out: patch gradient
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # not a Conv2D: untouched
    x = keras.layers.Conv2D(4, 2, padding="valid")(x)  # 1 pixel out
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_fast_convolutions_keep_outputs_and_gradients_of_a_model():
    x = tf.constant(np.random.default_rng(2).normal(size=(5, 8, 8, 3)), tf.float32)
    plain, fast = _small_net(), _small_net()
    config = fast.get_config()
    assert convolution.fast_convolutions(fast) == 4

    def run(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) ** 2)
        return [loss, *tape.gradient(loss, model.trainable_weights)]

    for a, b in zip(run(plain), run(fast)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    assert fast.get_config() == config


def test_routes_follow_output_size_and_can_be_undone():
    model = _small_net()
    assert convolution.routes(model) == {"pointwise": 0, "patch gradient": 0, "keras": 4}
    convolution.fast_convolutions(model)
    # 3x3 on 64 output pixels stays Keras's; 1x1 on 16 is a product; 3x3 on 4 and 2x2 on 1 get the patch gradient.
    assert convolution.routes(model) == {"pointwise": 1, "patch gradient": 2, "keras": 1}
    convolution.plain_convolutions(model)
    assert convolution.routes(model)["keras"] == 4
    assert all("call" not in layer.__dict__ for layer in model.layers)


def test_backbones_are_built_with_keras_convolutions():
    from tfxfer.backbones import create_backbone

    backbone = create_backbone("resnet9", weights=None, image_size=32)
    conv_layers = [layer for layer in convolution.walk_layers(backbone) if type(layer) is keras.layers.Conv2D]
    assert conv_layers and not any("call" in layer.__dict__ for layer in conv_layers)


def test_a_training_step_runs_the_rerouted_convolutions(monkeypatch):
    calls = []
    pointwise, patch = convolution.pointwise, convolution.patch_gradient_conv
    monkeypatch.setattr(convolution, "pointwise", lambda *a: calls.append("pointwise") or pointwise(*a))
    monkeypatch.setattr(convolution, "patch_gradient_conv", lambda *a: calls.append("patch") or patch(*a))
    # MobileNetV2 at 32 px ends on 2x2 and 1x1 maps: its 1x1 convolutions there are rerouted.
    model = tfxfer.build_model("mobilenetv2", num_classes=3, weights=None, image_size=32, freeze="full")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    lines = []
    with convolution.applied(model, log=lines.append, mode="force"):
        model.fit(random_images(4), np.arange(4) % 3, epochs=1, verbose=0)
    assert calls.count("pointwise") >= 28, calls  # traced into the training step
    assert lines[0].startswith("speed-ups: oneDNN on; 28 1x1 convolutions as matrix products")
    assert all("call" not in layer.__dict__ for layer in convolution.walk_layers(model))


@pytest.mark.slow
def test_an_export_is_the_same_with_and_without_the_speed_ups(tmp_path):
    model = tfxfer.build_model("mobilenetv2", num_classes=3, weights=None, image_size=32, freeze="full")
    plain_dir = tfxfer.export_saved_model(model, str(tmp_path / "plain"))
    with convolution.applied(model, log=lambda line: None, mode="force"):
        assert convolution.routes(model)["keras"] < sum(convolution.routes(model).values())
        fast_dir = tfxfer.export_saved_model(model, str(tmp_path / "during"))
    graphs = []
    for folder in (plain_dir, fast_dir):
        graph = tf.saved_model.load(folder).signatures["serving_default"].graph.as_graph_def()
        ops = [node.op for node in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
        graphs.append(sorted(ops))
    assert graphs[0].count("Conv2D") == 35 and graphs[0] == graphs[1]
    served = [tf.saved_model.load(d).signatures["serving_default"](images=random_images(4))["probabilities"].numpy()
              for d in (plain_dir, fast_dir)]
    np.testing.assert_array_equal(*served)


def test_onednn_query_answers():
    # conftest imports tfxfer first, which turns oneDNN on before TensorFlow loads.
    assert onednn_enabled() is True


def test_keras_convolutions_stay_when_a_gpu_is_visible(monkeypatch):
    model = _small_net()
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert convolution.fast_convolutions(model) == 0
    assert convolution.routes(model)["keras"] == 4


def _batchnorm(rng):
    layer = keras.layers.BatchNormalization(dtype="mixed_bfloat16", momentum=0.9)
    layer.build((None, 4, 4, 6))
    for variable, value in ((layer.gamma, rng.uniform(0.5, 2, 6)), (layer.beta, rng.normal(size=6)),
                            (layer.moving_mean, rng.normal(size=6)), (layer.moving_variance, rng.uniform(0.1, 3, 6))):
        variable.assign(value.astype("float32"))
    return layer


@pytest.mark.parametrize("trainable", [False, True])
def test_bfloat16_batchnorm_is_keras_batchnorm(trainable):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 4, 4, 6)) * 3 + 1, tf.bfloat16)
    upstream = tf.constant(rng.normal(size=(2, 4, 4, 6)), tf.bfloat16)
    results = []
    for ours in (False, True):
        layer = _batchnorm(np.random.default_rng(4))
        layer.trainable = trainable
        call = (lambda v: convolution.bfloat16_batchnorm(layer, v, training=True)) if ours else (lambda v: layer(v, training=True))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x)
        watched = [x] + ([layer.gamma.value, layer.beta.value] if trainable else [])
        gradients = tape.gradient(y, watched, output_gradients=upstream)
        results.append([y, *gradients, layer.moving_mean.value, layer.moving_variance.value])
    keras_side, our_side = results
    assert our_side[0].dtype == keras_side[0].dtype == tf.bfloat16
    for ours, theirs in zip(our_side, keras_side):
        # Within bfloat16's rounding: 8 bits of mantissa.
        np.testing.assert_allclose(np.asarray(ours, "float32"), np.asarray(theirs, "float32"), rtol=3e-2, atol=8e-2)


@pytest.mark.parametrize("train_bn, line", [(False, "3 frozen BatchNorm layers as bfloat16 multiply-adds"),
                                            (True, "3 training BatchNorm layers as bfloat16 fused batch norms")])
def test_a_bfloat16_training_step_runs_batchnorm_in_bfloat16(monkeypatch, train_bn, line):
    calls = []
    routed = convolution.bfloat16_batchnorm
    monkeypatch.setattr(convolution, "bfloat16_batchnorm",
                        lambda layer, inputs, **k: calls.append(inputs.dtype) or routed(layer, inputs, **k))
    # Frozen layers after a convolution are folded into it; the multiply-add is for the others.
    monkeypatch.setattr(convolution, "fold_batchnorm", lambda model: 0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, freeze="full", train_bn=train_bn)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    lines = []
    with convolution.applied(model, log=lines.append, mode="force"):
        model.fit(random_images(4), np.arange(4) % 3, epochs=1, verbose=0)
    assert lines[0].endswith(line)
    assert calls.count(tf.bfloat16) >= 3  # every layer, traced into the training step
    assert all("call" not in layer.__dict__ for layer in convolution.walk_layers(model))


def _conv_bn_net(stride, kernel_size, use_bias, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)  # after a linear convolution: folded
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, kernel_size, strides=stride, padding="same", use_bias=use_bias)(x)
    x = keras.layers.BatchNormalization(center=False)(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.BatchNormalization()(y)  # after a ReLU: not folded
    z = keras.layers.Conv2D(8, 1)(y)
    z = keras.layers.Add()([z, keras.layers.BatchNormalization()(z)])  # the convolution feeds two layers: not folded
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(z))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3, layer.moving_variance.shape).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2, layer.gamma.shape).astype("float32"))
            layer.trainable = False
    return model


@pytest.mark.parametrize("stride, kernel_size, use_bias, policy", [
    (1, 1, True, "float32"), (2, 1, False, "float32"), (1, 3, False, "float32"), (2, 3, True, "float32"),
    (2, 1, True, "mixed_bfloat16"), (1, 3, True, "mixed_bfloat16"),
])
def test_folded_batchnorm_keeps_outputs_and_gradients(stride, kernel_size, use_bias, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _conv_bn_net(stride, kernel_size, use_bias)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(np.random.default_rng(5).normal(size=(4, 8, 8, 3)), tf.float32)

    def run():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32) ** 2)
        return [np.asarray(v, "float32") for v in (loss, *tape.gradient(loss, model.trainable_weights))]

    plain = run()
    convolution.fast_convolutions(model)  # as `apply` does: the folded pairs take the rerouted paths too
    assert convolution.fold_batchnorm(model) == 2
    folded = run()
    for a, b in zip(plain, folded):
        assert np.abs(a).max() > 0
        if policy == "float32":
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            # bfloat16 keeps 8 bits of mantissa, and a gradient that went through a few layers of it differs
            # from one computed in another order by up to a tenth of its largest entry: compare directions.
            cosine = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert cosine > 0.97
    convolution.plain(model)
    assert all("call" not in layer.__dict__ for layer in model.layers)


def test_trainable_batchnorm_is_not_folded():
    model = _conv_bn_net(1, 1, True)
    for layer in model.layers:
        layer.trainable = True
    assert convolution.fold_batchnorm(model) == 0


def test_a_folded_batchnorm_unfrozen_later_runs_on_its_own():
    model = _conv_bn_net(1, 1, True)
    x = tf.constant(np.random.default_rng(7).normal(size=(4, 8, 8, 3)), tf.float32)
    assert convolution.fold_batchnorm(model) == 2
    for layer in model.layers:  # an unfreezing phase with --train-bn
        layer.trainable = True
    folded = model(x, training=True).numpy()
    convolution.plain(model)
    np.testing.assert_allclose(folded, model(x, training=True).numpy(), rtol=1e-4, atol=1e-5)


def test_a_training_step_runs_the_folded_convolutions(monkeypatch):
    calls = []
    folded = convolution.folded_convolution
    monkeypatch.setattr(convolution, "folded_convolution",
                        lambda conv, bn, inputs: calls.append(conv.name) or folded(conv, bn, inputs))
    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, freeze="full", train_bn=False)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    lines = []
    with convolution.applied(model, log=lines.append, mode="force"):
        model.fit(random_images(4), np.arange(4) % 3, epochs=1, verbose=0)
    count = sum(type(layer) is keras.layers.BatchNormalization for layer in convolution.walk_layers(model))
    assert f"{count} frozen BatchNorm layers folded into their convolutions" in lines[0]
    assert len(set(calls)) == count  # each pair traced into the training step
    assert all("call" not in layer.__dict__ for layer in convolution.walk_layers(model))


@pytest.mark.parametrize("size, stride", [(8, 2), (9, 2), (6, 3)])
def test_subsample_is_a_strided_slice_forward_and_backward(size, stride):
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(2, size, size, 3)), tf.float32)
    upstream = tf.constant(rng.normal(size=x[:, ::stride, ::stride, :].shape), tf.float32)
    results = []
    for sample in (convolution.subsample, lambda v, s: v[:, ::s, ::s, :]):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = sample(x, stride)
        results.append([y, tape.gradient(y, x, output_gradients=upstream)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _patched(model):
    return [layer.name for layer in convolution.walk_layers(model) if "call" in layer.__dict__]


@pytest.mark.parametrize("mode, on", [("force", True), ("off", False), (False, False)])
def test_fit_applies_the_speed_ups_for_its_duration_only(mode, on):
    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, freeze="full", speedups=mode)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    during = []

    class Look(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            during.append(_patched(model))

    model.fit(random_images(4), np.arange(4) % 3, epochs=1, verbose=0, callbacks=[Look()])
    assert bool(during[0]) == on, during
    assert not _patched(model)  # evaluate, predict, save and exports see the model as built
    assert type(model).from_config(model.get_config()).speedups == ("force" if on else "off")


def test_a_speed_up_never_measured_on_this_cpu_kind_stays_off_and_the_line_says_so(monkeypatch):
    monkeypatch.setattr(convolution, "cpu_flags", lambda: {"avx2", "fma"})
    assert convolution.cpu_kind() == "avx2"
    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, freeze="full")
    lines = []
    undo = convolution.apply(model, lines.append)
    assert not _patched(model)
    assert "not measured on this CPU (avx2), so off: bfloat16 BatchNorm, convolutions, folded BatchNorm" in lines[0]
    monkeypatch.setattr(convolution, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    lines.clear()
    convolution.apply(model, lines.append)()
    assert "not measured on this CPU (avx512_bf16), so off: bfloat16 BatchNorm (" in lines[0]
    assert "--cpu-speedups force" in lines[0]
    undo()
    assert convolution.cpu_kind({"avx2", "avx512_bf16", "amx_bf16"}) == "amx" and convolution.cpu_kind(set()) == "other"


def test_a_run_with_cpu_speedups_off_says_so(tmp_path):
    from tests.conftest import run_cli, write_splits

    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "4", "--cpu-speedups", "off", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "training speed-ups off (--cpu-speedups off)" in result.output
