"""LoRA adapters: what trains, what an export holds, and what bad input gets."""

import keras
import numpy as np
import pytest

import tfxfer
from tests.conftest import random_images
from tfxfer.export.precision import at_precision

X, Y = random_images(16), np.arange(16) % 3


def _fit(model, epochs=2):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(X, Y, batch_size=8, epochs=epochs, verbose=0)


def test_only_the_adapters_and_the_head_train_and_the_export_merges_them():
    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=4, lora_alpha=8)
    assert model.trained_layers == ["layer3_conv", "layer3_res1_conv", "layer3_res2_conv"]  # the last stage's
    trainable = {w.path for w in model.trainable_weights}
    assert trainable == {f"{name}/lora_kernel_{f}" for name in model.trained_layers for f in "ab"} | {"head/kernel",
                                                                                                     "head/bias"}
    before = {w.path: w.numpy().copy() for w in model.backbone.weights}
    _fit(model)
    after = {w.path: w.numpy() for w in model.backbone.weights}
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    assert moved == trainable - {"head/kernel", "head/bias"}  # the pretrained weights, BN statistics included, stay
    assert all(np.abs(after[f"{name}/lora_kernel_b"]).max() > 0 for name in model.trained_layers)

    merged = at_precision(model)
    assert merged.lora_rank is None and not any("lora" in w.path for w in merged.weights)
    np.testing.assert_allclose(merged.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-5)
    conv = model.backbone.get_layer("layer3_conv")
    scale = 8 / 4  # lora_alpha / rank
    expected = before["layer3_conv/kernel"] + scale * np.reshape(
        after["layer3_conv/lora_kernel_a"] @ after["layer3_conv/lora_kernel_b"], conv.kernel.shape)
    np.testing.assert_allclose(merged.backbone.get_layer("layer3_conv").kernel.numpy(), expected, atol=1e-5)


def test_norms_and_biases_train_with_lora_train_norms():
    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=2, lora_train="norms")
    names = {w.path.rpartition("/")[2] for w in model.backbone.trainable_weights}
    assert names == {"lora_kernel_a", "lora_kernel_b", "gamma", "beta"}  # resnet9's convolutions have no bias
    assert not any("moving" in w.path for w in model.trainable_weights)


def test_a_lora_model_resumes_its_policy_and_refuses_another(tiny_model_factory):
    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=2)
    trainable = [w.path for w in model.trainable_weights]
    model.set_freeze("head")  # what a resumed run does: the adapters still train
    assert [w.path for w in model.trainable_weights] == trainable
    with pytest.raises(tfxfer.TfxferError, match="cannot take the freeze policy full"):
        model.set_freeze("full")
    rebuilt = type(model).from_config(model.get_config())
    assert [w.path for w in rebuilt.trainable_weights] == trainable


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora=2, l2sp=0.01), "L2-SP has nothing to pull"),
    (dict(lora=0.5), "whole rank of at least 1"),
    (dict(lora=2, lora_train="all"), "--lora-train takes none or norms"),
    (dict(lora=2, lora_targets="stages:9"), "has 4 stages; --lora-targets stages:9 asks for more"),
    (dict(lora=2, lora_targets="nothing_here"), "No layer of resnet9 matches --lora-targets nothing_here"),
])
def test_bad_lora_settings_get_one_sentence(kwargs, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, **kwargs)


def test_finetune_with_lora_from_the_command_line_exports_the_merged_model(tmp_path):
    import tensorflow as tf

    from tests.conftest import run_cli, write_splits

    data = write_splits(tmp_path / "data", train=6, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "4", "--lora", "2", "--lora-targets", "stages:2",
                     "--output-dir", tmp_path / "runs", "--run-name", "adapted")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "adapted"
    assert "freeze head" in result.output and "LoRA: rank 2, alpha 2, on 4 layers (layer2_conv, layer3_conv" in result.output
    assert "\nfeature cache:" not in result.output  # no cache line: adapters change the features every step
    with open(run / "config.yaml") as f:
        saved = f.read()
    assert "lora: 2" in saved and "freeze: head" in saved
    # The export holds the plain network, adapters merged, and matched the trained model within 1e-4.
    assert "SavedModel round trip: max |probability difference|" in result.output
    names = [name for name, _ in tf.train.list_variables(str(run / "export" / "1" / "variables" / "variables"))]
    plain = tfxfer.build_model("resnet9", num_classes=2, weights=None, image_size=32)
    assert sum(name.startswith("weights/") for name in names) == len(plain.weights)  # no adapter weights


@pytest.mark.parametrize("argv, message", [
    (["--lora", "2", "--l2sp", "0.01"], "L2-SP has nothing to pull"),
    (["--lora", "2", "--unfreeze", "head@0,full@1"], "drop --unfreeze"),
    (["--lora", "2", "--freeze", "full"], "drop --freeze full"),
    (["--lora-alpha", "4"], "--lora-alpha needs --lora RANK"),
])
def test_lora_options_that_conflict_get_one_sentence(argv, message):
    from tfxfer.config import load_config

    options = {a[2:].replace("-", "_"): v for a, v in zip(argv[::2], argv[1::2])}
    with pytest.raises(tfxfer.TfxferError, match=message):
        load_config(dataset="digits", **options)


def test_the_lora_strategy_expands_to_adapters_on_a_frozen_backbone():
    from tfxfer.strategies import expand, parse_strategies

    assert expand("lora:8+lora_alpha=16") == {**expand("full"), "freeze": "head", "lora": 8, "lora_alpha": 16.0}
    assert parse_strategies("head,lora:4,full") == ["head", "lora:4", "full"]
    with pytest.raises(tfxfer.TfxferError, match="whole rank of at least 1 after lora:"):
        expand("lora:x")


def test_norms_train_with_the_speed_ups_on_and_a_bfloat16_run_merges_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=2, lora_train="norms",
                                   speedups="force")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    gammas = {w.path: w.numpy().copy() for w in model.backbone.weights if w.path.endswith("/gamma")}
    _fit(model, epochs=1)
    # Folding a BatchNorm into its convolution would have cut the gradient of its scale.
    assert all(not np.array_equal(value, model.backbone.get_layer(path.split("/")[0]).gamma.numpy())
               for path, value in gammas.items())
    merged = at_precision(model)
    conv = model.backbone.get_layer("layer3_conv")
    exact = conv._kernel.numpy() + np.reshape(conv.lora_kernel_a.numpy() @ conv.lora_kernel_b.numpy(), conv._kernel.shape)
    np.testing.assert_allclose(merged.backbone.get_layer("layer3_conv").kernel.numpy(), exact, rtol=1e-6, atol=1e-7)


def test_a_dense_last_stage_takes_adapters_by_default():
    model = tfxfer.build_model("simplecnn", num_classes=3, weights=None, image_size=32, lora=2)
    assert model.trained_layers and all("lora_kernel" in w.path for w in model.backbone.trainable_weights)


def test_a_study_refuses_shared_lora_options_and_names_the_suffix():
    from tfxfer.config import StudyConfig, load_config

    with pytest.raises(tfxfer.TfxferError, match=r"--lora-alpha is set by each run.*lora:8\+lora_alpha=16"):
        load_config(None, StudyConfig, dataset="digits", lora_alpha=16)


@pytest.mark.slow
def test_a_lora_run_with_ema_resumes_exactly(tmp_path):
    from tests.conftest import run_cli, write_splits
    from tfxfer.runs import read_history

    data = write_splits(tmp_path / "data", train=6, test=2, classes=("cat", "dog"))
    common = ["--data-dir", data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32", "--epochs", "3",
              "--batch-size", "4", "--lora", "2", "--ema", "0.9", "--optimizer", "adam", "--schedule", "constant",
              "--seed", "3", "--output-dir", tmp_path / "runs"]
    whole = run_cli("finetune", *common, "--run-name", "whole")
    assert whole.exit_code == 0, whole.output
    assert "no feature cache: the adapters change the backbone's features every step" in whole.output
    first = run_cli("finetune", *common, "--epochs", "2", "--run-name", "split")
    assert first.exit_code == 0, first.output
    resumed = run_cli("finetune", *common, "--run-name", "split", "--resume")
    assert resumed.exit_code == 0 and "resuming split after epoch 2" in resumed.output, resumed.output
    a, b = read_history(tmp_path / "runs" / "whole"), read_history(tmp_path / "runs" / "split")
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
