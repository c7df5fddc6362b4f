"""LoRA adapters: what trains, what an export holds, and what bad input gets."""

import keras
import numpy as np
import pytest

import tfxfer
from tests.conftest import random_images
from tfxfer.export.precision import at_precision
from tfxfer.lora import ADAPTER_WEIGHTS, ADAPTERS_FILE, load_adapters

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
    assert model.freeze == "lora"
    trainable = [w.path for w in model.trainable_weights]
    model.set_freeze("lora")  # what a resumed run does: the adapters still train
    assert [w.path for w in model.trainable_weights] == trainable
    model.set_freeze("head")  # the first phase of head@0,lora@N: the head alone
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    with pytest.raises(tfxfer.TfxferError, match="cannot take the freeze policy full"):
        model.set_freeze("full")
    plain = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32)
    with pytest.raises(tfxfer.TfxferError, match="The freeze policy lora trains LoRA adapters"):
        plain.set_freeze("lora")
    rebuilt = type(model).from_config(model.get_config())  # its config keeps the phase
    assert [w.path for w in rebuilt.trainable_weights] == ["head/kernel", "head/bias"]
    model.set_freeze("lora")
    assert [w.path for w in type(model).from_config(model.get_config()).trainable_weights] == trainable


@pytest.mark.parametrize("kwargs, message", [
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
    assert "freeze lora" in result.output and "LoRA: rank 2, alpha 2, on 4 layers (layer2_conv, layer3_conv" in result.output
    assert "\nfeature cache:" not in result.output  # no cache line: adapters change the features every step
    with open(run / "config.yaml") as f:
        saved = f.read()
    assert "lora: 2" in saved and "freeze: lora" in saved
    # The export holds the plain network, adapters merged, and matched the trained model within 1e-4.
    assert "SavedModel round trip: max |probability difference|" in result.output
    names = [name for name, _ in tf.train.list_variables(str(run / "export" / "1" / "variables" / "variables"))]
    plain = tfxfer.build_model("resnet9", num_classes=2, weights=None, image_size=32)
    assert sum(name.startswith("weights/") for name in names) == len(plain.weights)  # no adapter weights


@pytest.mark.slow
def test_a_lora_run_given_freeze_head_as_a_study_gives_it_resumes(shared_data, tmp_path):
    from tests.conftest import run_cli

    # A plain LoRA run starts in `lora` whether its command says --freeze head (as a study's did) or lora.
    common = ["--data-dir", shared_data, "--backbone", "resnet9", "--weights", "none", "--image-size", "32",
              "--batch-size", "8", "--lora", "2", "--freeze", "head", "--output-dir", tmp_path, "--run-name", "adapted"]
    first = run_cli("finetune", *common, "--epochs", "1")
    assert first.exit_code == 0, first.output
    resumed = run_cli("finetune", *common, "--epochs", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming adapted after epoch 1, freeze lora" in resumed.output


@pytest.mark.parametrize("argv, message", [
    (["--lora", "2", "--unfreeze", "head@0,full@1"], "takes the phases head and lora only, e.g. head@0,lora@25%; drop full"),
    (["--unfreeze", "head@0,lora@1"], "The freeze policy lora trains LoRA adapters; give --lora RANK"),
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

    assert expand("lora:8+lora_alpha=16") == {**expand("full"), "freeze": "lora", "lora": 8, "lora_alpha": 16.0}
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


def test_l2sp_with_lora_pulls_each_adapters_update_toward_zero():
    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=2, lora_alpha=6, l2sp=0.1)
    assert model.penalty.anchors == {}  # no kernel trains, so none is anchored
    rng = np.random.default_rng(0)
    expected = 0.0
    for name in model.trained_layers:
        layer = model.backbone.get_layer(name)
        layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape).astype("float32"))
        a, b = layer.lora_kernel_a.numpy(), layer.lora_kernel_b.numpy()
        update = (6 / 2) * a.reshape(-1, 2).astype("float64") @ b
        np.testing.assert_allclose(update.reshape(layer.kernel.shape), layer.kernel.numpy() - layer._kernel.numpy(),
                                   rtol=1e-4, atol=1e-5)  # the merged kernel's distance from its start
        expected += 0.1 * np.sum(update ** 2)
    assert expected > 0
    np.testing.assert_allclose(float(model.penalty()), expected, rtol=1e-5)
    model.set_freeze("head")  # adapters that do not train add nothing
    assert float(model.penalty()) == 0.0


def test_adapters_wait_for_their_phase_of_head_then_lora():
    from tfxfer.freezing import UnfreezeSchedule, parse_unfreeze, resolve_phases

    model = tfxfer.build_model("resnet9", num_classes=3, weights=None, image_size=32, lora=2, freeze="head")
    adapter = model.backbone.get_layer(model.trained_layers[-1]).lora_kernel_a
    seen = [adapter.numpy().copy()]
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(adapter.numpy().copy()))
    phases = []
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[
        UnfreezeSchedule(resolve_phases(parse_unfreeze("head@0,lora@50%"), 2), log=phases.append), record])
    assert phases == [f"epoch 2: freeze lora, {sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} "
                      "trainable parameters"]
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_lora_alpha_scales_the_adapters_of_a_keras_hub_backbone(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")

    folder = str(tmp_path / "vit")
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                 mlp_dim=32).save_to_preset(folder)
    model = tfxfer.build_model("vit_b16", num_classes=3, weights=folder, image_size=32, lora=2, lora_alpha=4)
    assert {w.path.rpartition("/")[2] for w in model.backbone.trainable_weights} == set(ADAPTER_WEIGHTS)
    assert len(model.backbone.trainable_weights) == 2 * 2 * 2  # 2 blocks, query and value, A and B
    adapted = [layer for layer in model.backbone.get_layer("hub")._flatten_layers() if getattr(layer, "lora_enabled", 0)]
    assert len(adapted) == 4 and all(layer.lora_rank == 2 and layer.lora_alpha == 4 for layer in adapted)
    layer = adapted[0]
    layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, "float32"))
    update = np.matmul(layer.lora_kernel_a.numpy(), layer.lora_kernel_b.numpy())
    np.testing.assert_allclose(layer.kernel.numpy() - layer._kernel.numpy(), 2 * update, rtol=1e-5, atol=1e-6)


def test_a_lora_run_keeps_its_adapters_apart_and_a_run_from_its_folder_starts_merged(finished_run, shared_data,
                                                                                   tmp_path):
    from tests.conftest import run_cli
    from tfxfer.runs import read_history

    result = run_cli("finetune", "--data-dir", shared_data, "--weights", finished_run, "--epochs", "2", "--batch-size", "8",
                     "--lora", "2", "--lora-alpha", "4", "--l2sp", "0.01", "--unfreeze", "head@0,lora@50%",
                     "--precision", "float32", "--output-dir", tmp_path / "runs", "--run-name", "a")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "a"
    assert "unfreeze: head from epoch 1, lora from epoch 2" in result.output
    fresh = tfxfer.build_model("resnet9", num_classes=3, weights=str(finished_run), image_size=32, lora=2, lora_alpha=4)
    # A is 3x3x96x2 then 3x3x192x2 twice, B 2x192 each; the head 192x3 + 3.
    trained = (3 * 3 * 96 * 2 + 2 * 192) + 2 * (3 * 3 * 192 * 2 + 2 * 192) + 192 * 3 + 3
    assert trained == sum(int(np.prod(w.shape)) for w in fresh.trainable_weights) == 10_371
    total = sum(int(np.prod(w.shape)) for w in fresh.weights)
    assert (f"LoRA: rank 2, alpha 4, on 3 layers (layer3_conv, layer3_res1_conv, layer3_res2_conv): 10,371 "
            f"trainable of {total:,} parameters ({100 * trained / total:.3g}%)") in result.output
    assert "--l2sp 0.01 pulls each adapter's update (alpha / rank) * A @ B toward zero" in result.output
    history = read_history(run)
    assert history["phase"] == ["head", "lora"] and history["l2sp"][0] == 0 and history["l2sp"][1] > 0

    with np.load(run / ADAPTERS_FILE) as stored:
        assert set(stored.files) == {w.path for w in fresh.trainable_weights}  # the adapters and the head alone
    assert (run / ADAPTERS_FILE).stat().st_size < (run / "best.weights.h5").stat().st_size / 20
    load_adapters(fresh, run / ADAPTERS_FILE)
    saved = keras.models.load_model(run / "model.keras", compile=False)
    np.testing.assert_allclose(fresh.predict(X, verbose=0), saved.predict(X, verbose=0), atol=1e-5)
    # --weights RUN: the backbone with the adapters merged into its kernels.
    merged = tfxfer.build_model("resnet9", num_classes=3, weights=str(run), image_size=32)
    np.testing.assert_allclose(merged.features(X), fresh.features(X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(merged.features(X), tfxfer.build_model(
        "resnet9", num_classes=3, weights=str(finished_run), image_size=32).features(X), atol=1e-5)


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
