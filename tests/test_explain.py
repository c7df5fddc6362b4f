"""Grad-CAM: the map of an image whose class is decided in one quadrant peaks there."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

RED, BLUE = (230, 30, 30), (30, 30, 230)


def _image(rng, label, quadrant=None):
    """Grey noise with one coloured square, whose colour is the class, in one
    quadrant (drawn when not given): that quadrant alone decides the class."""
    image = np.clip(rng.normal(110, 25, (32, 32, 3)), 0, 255)
    qy, qx = divmod(int(rng.integers(4) if quadrant is None else quadrant), 2)
    y, x = 16 * qy + rng.integers(2, 7), 16 * qx + rng.integers(2, 7)
    image[y:y + 8, x:x + 8] = (RED, BLUE)[label]
    return image.astype(np.uint8)


def _write(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("red", "blue")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(rng, label)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def quadrant_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    _write(root / "data" / "train", 80, 0)
    _write(root / "data" / "test", 10, 1)
    result = run_cli("finetune", "--data-dir", root / "data", "--backbone", "tiny", "--weights", "none",
                     "--image-size", "32", "--epochs", "12", "--batch-size", "16", "--lr", "0.05",
                     "--output-dir", root / "runs", "--run-name", "quadrant")
    assert result.exit_code == 0, result.output
    return root


def test_grad_cam_peaks_in_the_quadrant_that_decides_the_class(quadrant_run):
    from tfxfer.explain import grad_cam, load_run_model

    metrics = json.loads((quadrant_run / "runs" / "quadrant" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9  # it learned the rule, so its evidence is in the top left
    model = load_run_model(quadrant_run / "runs" / "quadrant")
    rng = np.random.default_rng(7)
    labels, where = np.arange(24) % 2, np.arange(24) // 2 % 4
    images = np.stack([_image(rng, label, quadrant) for label, quadrant in zip(labels, where)])
    class_ids = [model.class_names.index(("red", "blue")[label]) for label in labels]  # folders sort as blue, red
    heatmaps, probabilities = grad_cam(model, images, class_ids)
    assert (probabilities.argmax(axis=1) == class_ids).mean() >= 0.9
    assert heatmaps.shape == (24, 32, 32) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    peaks = np.array([np.unravel_index(h.argmax(), h.shape) for h in heatmaps])
    peak_quadrant = (peaks[:, 0] >= 16) * 2 + (peaks[:, 1] >= 16)
    assert (peak_quadrant == where).mean() >= 0.9, list(zip(peak_quadrant, where))
    # Not a constant map: the evidence moves with the square.
    assert len(set(peak_quadrant)) == 4


def test_explain_command_and_evaluate_explain(quadrant_run, tmp_path):
    run = quadrant_run / "runs" / "quadrant"
    image = quadrant_run / "data" / "test" / "red" / "0.png"
    (tmp_path / "notes.txt").write_text("not an image")
    result = run_cli("explain", run, image, tmp_path / "notes.txt", "--class", "blue", "--output", tmp_path / "maps")
    assert result.exit_code == 1  # one file is not an image; the other is still explained
    assert f"{image}: blue " in result.output and "notes.txt is not an image" in result.output
    assert (tmp_path / "maps" / "0.gradcam.png").stat().st_size > 0
    # Two images of one name from two folders get a map each.
    other = quadrant_run / "data" / "test" / "blue" / "0.png"
    assert run_cli("explain", run, image, other, "--output", tmp_path / "two").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["0.gradcam.png", "blue-0.gradcam.png"]
    assert "Unknown class 'bleu'" in run_cli("explain", run, image, "--class", "bleu").output

    # Test images filed under the other colour: the model is confidently wrong on them.
    _write(tmp_path / "swapped" / "train", 2, 3)
    _write(tmp_path / "swapped" / "test", 3, 4)
    for name in ("red", "blue"):
        (tmp_path / "swapped" / "test" / name).rename(tmp_path / "swapped" / "test" / f"{name}-")
    for name, other in (("red", "blue"), ("blue", "red")):
        (tmp_path / "swapped" / "test" / f"{name}-").rename(tmp_path / "swapped" / "test" / other)
    result = run_cli("evaluate", "--model", run, "--data-dir", tmp_path / "swapped", "--explain", "4",
                     "--output", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "the 4 most confidently wrong images with their heat-maps" in result.output
    assert (tmp_path / "eval" / "top_losses.png").stat().st_size > 0
    refused = run_cli("evaluate", "--model", run / "export" / "1", "--data-dir", tmp_path / "swapped", "--explain", "2")
    assert refused.exit_code == 1 and "--explain needs the run folder of a finetune run" in refused.output


@pytest.mark.parametrize("backbone", ["resnet9", "simplecnn", *(pytest.param(name, marks=pytest.mark.slow) for name in
                                                                  ("resnet50", "mobilenetv2", "efficientnetv2b0", "convnext_tiny"))])
def test_grad_cam_works_for_the_cnn_backbones_from_their_last_feature_map(backbone):
    from tfxfer.explain import grad_cam
    from tfxfer.model import TransferModel

    model = TransferModel(backbone, num_classes=3, weights="none", image_size=32)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    heatmaps, probabilities = grad_cam(model, images)
    assert heatmaps.shape == (2, 32, 32) and np.isfinite(heatmaps).all()
    # The map's forward pass is the model's own: the same probabilities.
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)


def _tiny_hub_model(tmp_path, family, size=32, num_classes=3, **config):
    """A `tfxfer.build_model` on a tiny KerasHub backbone saved as a preset folder."""
    import keras_hub

    import tfxfer

    presets = {
        "vit_b16": lambda: keras_hub.models.ViTBackbone(
            image_shape=(size, size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, **config),
        "deit_small": lambda: keras_hub.models.DeiTBackbone(
            image_shape=(size, size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32),
        "dinov2_small": lambda: keras_hub.models.DINOV2Backbone(
            patch_size=14, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(size, size, 3),
            position_embedding_shape=(size, size, 3), **config),
        "swin_tiny": lambda: keras_hub.models.SwinTransformerBackbone(
            image_shape=(size, size, 3), embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=2, patch_size=4),
        "dinov3_small": lambda: keras_hub.models.DINOV3Backbone(
            patch_size=16, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(size, size, 3),
            **config),
        "siglip2_base": lambda: keras_hub.models.SigLIPVisionEncoder(
            patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=(size, size, 3)),
    }
    folder = str(tmp_path / family)
    presets[family]().save_to_preset(folder)
    return tfxfer.build_model(family, num_classes=num_classes, weights=folder, image_size=size)


def test_grad_cam_of_a_vit_peaks_in_the_quadrant_that_decides_the_class(tmp_path):
    import keras

    from tfxfer.explain import grad_cam, load_run_model

    model = _tiny_hub_model(tmp_path, "vit_b16", num_classes=2)
    rng = np.random.default_rng(0)
    labels = np.arange(160) % 2
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(np.stack([_image(rng, label) for label in labels]), labels, batch_size=16, epochs=15, verbose=0)
    (tmp_path / "run").mkdir()
    model.save(tmp_path / "run" / "model.keras")
    model = load_run_model(tmp_path / "run")  # what `tfxfer explain` reads

    rng = np.random.default_rng(7)
    labels, where = np.arange(48) % 2, np.arange(48) // 2 % 4
    images = np.stack([_image(rng, label, quadrant) for label, quadrant in zip(labels, where)])
    heatmaps, probabilities = grad_cam(model, images, labels)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.9
    assert heatmaps.shape == (48, 32, 32) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    peaks = np.array([np.unravel_index(h.argmax(), h.shape) for h in heatmaps])
    peak_quadrant = (peaks[:, 0] >= 16) * 2 + (peaks[:, 1] >= 16)
    # A lower bar than the CNN's: two attention blocks trained from scratch spread the square's colour over
    # other tokens before the last block reads them, so the evidence there is less local than in a conv map
    # (0.54 to 0.77 over six seeds). Chance is a quarter; a map of zero gradients (the tokens after the final
    # norm) puts every peak in one corner, and patch tokens laid out transposed or off by one scored 0.12 to
    # 0.46 on the same models.
    assert (peak_quadrant == where).mean() > 0.5, list(zip(peak_quadrant, where))
    assert len(set(peak_quadrant)) == 4

    image = tmp_path / "square.png"
    Image.fromarray(images[2]).save(image)
    result = run_cli("explain", tmp_path / "run", image, "--output", tmp_path / "maps")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "maps" / "square.gradcam.png").stat().st_size > 0


@pytest.mark.parametrize("family, config, extra", [
    ("vit_b16", {}, 1),  # the class token
    ("deit_small", {}, 2),  # the class and distillation tokens
    ("dinov2_small", {"num_register_tokens": 3}, 1 + 3),  # the class token and the registers
    ("dinov3_small", {"num_register_tokens": 2}, 1 + 2),
    ("swin_tiny", {}, 0),
    ("siglip2_base", {}, 0),  # no class token: an attention-pooling head reads the patches
])
def test_grad_cam_lays_only_the_patch_tokens_on_their_grid(tmp_path, family, config, extra):
    from tfxfer.explain import _split_at_last_feature_map, grad_cam

    size = 28 if family == "dinov2_small" else 32
    model = _tiny_hub_model(tmp_path, family, size, **config)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), np.uint8)
    to_features, _, to_grid = _split_at_last_feature_map(model)
    tokens = np.asarray(to_features(model.preprocess(images)))
    # 28 px / 14 and 32 px / 16; 32 px / 8, and Swin's 32 px / 4 merged once
    side = {"dinov2_small": 2, "dinov3_small": 2}.get(family, 4)
    assert tokens.shape[1] == extra + side * side
    np.testing.assert_array_equal(np.asarray(to_grid(tokens)), tokens[:, extra:].reshape(2, side, side, -1))
    heatmaps, probabilities = grad_cam(model, images)
    assert heatmaps.shape == (2, size, size) and np.isfinite(heatmaps).all()
    # The map's forward pass, run layer by layer, is the model's own: the same probabilities.
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)


def test_grad_cam_refuses_a_backbone_whose_layers_it_cannot_retrace(tmp_path, monkeypatch):
    from tfxfer.errors import TfxferError
    from tfxfer.explain import grad_cam

    model = _tiny_hub_model(tmp_path, "dinov3_small", num_register_tokens=2)
    # Blocks run without the rotary position embeddings that DINOv3's blocks take: another network.
    monkeypatch.setattr(model.backbone.get_layer("hub"), "rope_embedding", None)
    with pytest.raises(TfxferError, match=r"could not retrace dinov3_small's layers one by one .*; explain a run of"):
        grad_cam(model, np.zeros((1, 32, 32, 3), np.uint8))
