"""KerasHub backbones, offline: tiny presets written with `save_to_preset` and
loaded back by path, through the registry, training, L2-SP and every export."""

import json
import os
import sys

import keras
import numpy as np
import pytest

# A broken KerasHub install (a tensorflow-text built for another TensorFlow, say) fails the
# suite instead of skipping it.
import keras_hub  # noqa: E402

import tfxfer  # noqa: E402
from tests.conftest import run_cli, serve, split_images, write_splits  # noqa: E402
from tfxfer.backbones import create_backbone, get_backbone  # noqa: E402
from tfxfer.backbones.registry import backbone_units  # noqa: E402
from tfxfer.errors import TfxferError  # noqa: E402

# (registry entry, image size, the tiny KerasHub backbone saved as its preset)
TINY = {
    "vit_b16": (32, lambda: keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32)),
    "deit_small": (32, lambda: keras_hub.models.DeiTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=4, num_heads=2, hidden_dim=16, intermediate_dim=32)),
    "dinov2_small": (28, lambda: keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(28, 28, 3),
        position_embedding_shape=(28, 28, 3))),
    "swin_tiny": (32, lambda: keras_hub.models.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=1,
        patch_size=4)),
    "dinov2_small_reg": (28, lambda: keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(28, 28, 3),
        position_embedding_shape=(28, 28, 3), num_register_tokens=2)),
    "dinov3_small": (32, lambda: keras_hub.models.DINOV3Backbone(
        patch_size=16, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3),
        num_register_tokens=2, use_key_bias=False)),
    # As SigLIP2's presets are: the image-text model, whose vision tower is the backbone.
    "siglip2_base": (32, lambda: keras_hub.models.SigLIPBackbone(
        keras_hub.models.SigLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=4, num_heads=2,
                                             intermediate_dim=32, image_shape=(32, 32, 3)),
        keras_hub.models.SigLIPTextEncoder(vocabulary_size=32, embedding_dim=16, hidden_dim=16, num_layers=1,
                                           num_heads=2, intermediate_dim=32, max_sequence_length=8))),
}


# What each tiny backbone takes: the images alone, or a dict with its input's name.
INPUT_NAME = {"dinov2_small": "images", "dinov2_small_reg": "images", "dinov3_small": "pixel_values",
              "siglip2_base": "images"}


def saved_hub(folder):
    """The KerasHub backbone a tiny preset holds: for SigLIP's image-text model, its vision tower."""
    hub = keras_hub.models.Backbone.from_preset(folder)
    return hub.vision_encoder if isinstance(hub, keras_hub.models.SigLIPBackbone) else hub


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    folders = {}
    for name, (_, make) in TINY.items():
        folders[name] = str(root / name)
        make().save_to_preset(folders[name])
    return folders


# Swin is the slowest to build: its load-back runs in the slow tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "swin_tiny" else n for n in sorted(TINY)])
def test_a_saved_preset_loads_back_by_path_with_its_weights(presets, name):
    size = TINY[name][0]
    backbone = create_backbone(name, weights=presets[name], image_size=size)
    hub = saved_hub(presets[name])
    assert len(backbone.get_layer("hub").weights) == len(hub.weights)
    for ours, theirs in zip(backbone.get_layer("hub").weights, hub.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    tokens = np.asarray(hub({INPUT_NAME[name]: images} if name in INPUT_NAME else images))
    if name == "deit_small":  # the class and distillation tokens
        expected = (tokens[:, 0] + tokens[:, 1]) / 2
    elif name == "dinov3_small":  # the class token, then the mean of the patches after its 2 register tokens
        expected = np.concatenate([tokens[:, 0], tokens[:, 3:].mean(axis=1)], axis=-1)
    elif name == "siglip2_base":  # its attention-pooling head's vector
        expected = tokens
    else:
        expected = tokens.mean(axis=1) if name == "swin_tiny" else tokens[:, 0]
    np.testing.assert_allclose(np.asarray(backbone(images)), expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_stage_map_groups_the_blocks_and_freeze_policies_follow_it(presets, name):
    size = TINY[name][0]
    model = tfxfer.build_model(name, num_classes=3, weights=presets[name], image_size=size, freeze="stages:2", l2sp=0.01)
    spec = get_backbone(name)
    units = backbone_units(model.backbone, spec)
    tail = 2 if name == "siglip2_base" else 1  # SigLIP's attention-pooling head follows its final LayerNorm
    assert [stage for _, stage in units] == [spec.stages[0], *spec.stages[1:]] + [spec.stages[-1]] * tail
    training = {layer.name for layer, stage in units if stage in spec.stages[-2:]}
    assert set(model.trained_layers) == training
    trained_ids = {id(w) for layer, _ in units if layer.name in training for w in layer.weights}
    backbone_trainable = {id(w) for w in model.backbone.trainable_weights}
    assert backbone_trainable == trained_ids
    # L2-SP pulls the kernels of the training blocks, and nothing else.
    penalized = model.penalty.penalized()
    assert penalized and all(id(w) in trained_ids and w.name == "kernel" for w, _ in penalized)

    model.set_freeze("head")
    assert model.backbone.trainable_weights == [] and model.trained_layers == []
    model.set_freeze("full")
    # What KerasHub itself trains: DINOv2's interpolated position embeddings never train.
    assert len(model.backbone.trainable_weights) == len(saved_hub(presets[name]).trainable_weights)


def test_image_sizes_that_do_not_fit_the_patches_get_the_nearest_valid_sizes(presets):
    with pytest.raises(TfxferError, match=r"multiple of 8, got 30; pass --image-size 24 or 32\.$"):
        create_backbone("vit_b16", weights=presets["vit_b16"], image_size=30)
    with pytest.raises(TfxferError, match=r"multiple of 16, got 200; pass --image-size 192 or 208\.$"):
        create_backbone("vit_b16", weights="none", image_size=200)
    with pytest.raises(TfxferError, match=r"multiple of 224, got 100; pass --image-size 224\.$"):
        create_backbone("swin_tiny", weights="none", image_size=100)


def test_pretrained_position_embeddings_fix_the_size(presets):
    with pytest.raises(TfxferError, match=r"trained at 32 px .* pass --image-size 32\.$"):
        create_backbone("vit_b16", weights=presets["vit_b16"], image_size=48)
    # SigLIP's image-text presets are refused before they are loaded, or downloaded.
    with pytest.raises(TfxferError, match=r"trained at 32 px .* pass --image-size 32\.$"):
        create_backbone("siglip2_base", weights=presets["siglip2_base"], image_size=48)
    with pytest.raises(TfxferError, match=r"from siglip2_base_patch16_224 were trained at 224 px .* --image-size 224\.$"):
        create_backbone("siglip2_base", weights="imagenet", image_size=256)
    # DINOv3's rotary position embeddings have no size: its weights load at any multiple of the patch.
    assert create_backbone("dinov3_small", weights=presets["dinov3_small"], image_size=48).output.shape[-1] == 2 * 16
    with pytest.raises(TfxferError, match=r"multiple of 16, got 40; pass --image-size 32 or 48\.$"):
        create_backbone("dinov3_small", weights=presets["dinov3_small"], image_size=40)


def test_a_preset_of_another_family_is_refused(presets):
    with pytest.raises(TfxferError, match=r"holds a KerasHub DeiTBackbone, not the ViTBackbone"):
        create_backbone("vit_b16", weights=presets["deit_small"], image_size=32)
    with pytest.raises(TfxferError, match=r"holds a KerasHub DINOV2Backbone, not the DINOV3Backbone that dinov3_small"):
        create_backbone("dinov3_small", weights=presets["dinov2_small_reg"], image_size=28)


def test_an_offline_preset_download_says_how_to_get_a_local_copy(monkeypatch):
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.ViTBackbone, "from_preset", offline)
    for weights in ("imagenet", "vit_base_patch16_224_imagenet"):
        with pytest.raises(TfxferError, match=r"Could not download the KerasHub preset vit_base_patch16_224_imagenet "
                                              r"for vit_b16 \(no network\?\); .*save_to_preset.* --weights DIR\.$"):
            create_backbone("vit_b16", weights=weights, image_size=224)
    # SigLIP's tower comes out of its image-text preset, which is what a download would fetch.
    monkeypatch.setattr(keras_hub.models.SigLIPBackbone, "from_preset", offline)
    with pytest.raises(TfxferError, match=r"Could not download the KerasHub preset siglip2_base_patch16_224 for "
                                          r"siglip2_base \(no network\?\); .*save_to_preset.* --weights DIR\.$"):
        create_backbone("siglip2_base", weights="imagenet", image_size=224)


def test_without_keras_hub_the_sentence_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(TfxferError, match=r"vit_b16 needs KerasHub: pip install 'tfxfer\[hub\]'"):
        create_backbone("vit_b16", weights="none", image_size=32)


def test_backbones_lists_the_families_with_source_and_licence():
    result = run_cli("backbones", "*")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    for name in ("vit_b16", "deit_tiny", "deit_small", "deit_base", "dinov2_small", "dinov2_base", "swin_tiny",
                 "dinov2_small_reg", "dinov2_base_reg", "siglip2_base"):
        assert "KerasHub" in rows[name] and ("Apache-2.0" in rows[name] or "MIT" in rows[name])
    for name in ("dinov3_small", "dinov3_base", "dinov3_large"):
        assert "KerasHub dinov3_vit_" in rows[name] and rows[name].endswith("DINOv3 License")
    assert "85,798,656" in rows["vit_b16"] and "embed blocks1 blocks2 blocks3 blocks4" in rows["vit_b16"]
    assert "303,129,600" in rows["dinov3_large"] and "KerasHub siglip2_base_patch16_224" in rows["siglip2_base"]


@pytest.mark.slow
def test_vit_finetunes_with_unfreezing_and_exports_everywhere(presets, tmp_path):
    data = write_splits(tmp_path / "data", train=6, test=3, classes=("cat", "dog", "owl"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "vit_b16", "--weights", presets["vit_b16"],
                     "--image-size", "32", "--epochs", "2", "--unfreeze", "head@0,stages:2@1", "--l2sp", "0.01",
                     "--train-bn", "--precision", "mixed_bfloat16", "--output-dir", tmp_path / "runs", "--run-name", "vit")
    assert result.exit_code == 0, result.output
    assert "BatchNorm: none in vit_b16; its normalisation layers (LayerNorm) keep no running statistics" in result.output
    assert "--train-bn changes nothing" in result.output
    assert "feature cache" in result.output.lower() or "cached" in result.output.lower()
    run = tmp_path / "runs" / "vit"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["export_max_abs_diff"] < 1e-4

    result = run_cli("export", run, "--format", "onnx,litert")
    assert result.exit_code == 0, result.output
    images, _ = split_images(data, "test", 32)
    expected = serve(run, images)
    for name in ("onnx", "litert"):  # each run by its own runtime against the SavedModel
        np.testing.assert_allclose(serve(run, images, name), expected, atol=1e-4, rtol=0)

    result = run_cli("evaluate", "--model", run, "--data-dir", data)
    assert result.exit_code == 0, result.output

    # The run folder starts another fine-tuning of the same architecture.
    result = run_cli("finetune", "--data-dir", data, "--weights", run, "--epochs", "1", "--freeze", "full", "--precision", "float32",
                     "--output-dir", tmp_path / "runs", "--run-name", "again")
    assert result.exit_code == 0, result.output


# Each family's own image converter, as its KerasHub presets carry it: ImageNet's mean and
# standard deviation for DINO, [-1, 1] for SigLIP.
_IMAGENET = {"scale": [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
             "offset": [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]}
CONVERTERS = {"dinov2_small_reg": ("DINOV2ImageConverter", _IMAGENET),
              "dinov3_small": ("DINOV3ImageConverter", _IMAGENET),
              "siglip2_base": ("SigLIPImageConverter", {"scale": 1 / 127.5, "offset": -1.0})}


# A run and three exports take minutes on two CPU cores: the standard tier checks these
# families through the loading, stage map and LoRA tests above.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov3_small", "dinov2_small_reg", "siglip2_base"])
def test_foundation_backbones_finetune_from_their_presets_and_export_everywhere(tmp_path, name):
    size, make = TINY[name]
    folder = str(tmp_path / "preset")
    make().save_to_preset(folder)
    converter, normalization = CONVERTERS[name]
    getattr(keras_hub.layers, converter)(image_size=(size, size), **normalization).save_to_preset(folder)
    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", name, "--weights", folder, "--image-size", size,
                     "--epochs", "1", "--output-dir", tmp_path / "runs", "--run-name", name)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / name
    assert json.loads((run / "backbone.json").read_text())["normalization"] == normalization
    assert json.loads((run / "metrics.json").read_text())["export_max_abs_diff"] < 1e-4
    card = (run / "export" / "1" / "MODEL_CARD.md").read_text()
    if name == "dinov3_small":
        assert "- Licence of the pretrained backbone weights: DINOv3 License (Meta's own licence" in card
        assert "not Apache-2.0" in card
    else:
        assert "- Licence of the pretrained backbone weights: Apache-2.0.\n" in card

    result = run_cli("export", run, "--format", "onnx,litert")
    assert result.exit_code == 0, result.output
    images, _ = split_images(data, "test", size)
    expected = serve(run, images)
    for export in ("onnx", "litert"):
        np.testing.assert_allclose(serve(run, images, export), expected, atol=1e-4, rtol=0)


def test_predict_with_an_imagenet_head_names_the_way_for_a_hub_backbone(tmp_path):
    write_splits(tmp_path / "data", train=1, test=1, classes=("cat", "dog"))
    image = next((tmp_path / "data" / "test" / "cat").iterdir())
    result = run_cli("predict", "--backbone", "vit_b16", "--weights", "imagenet", image)
    assert result.exit_code == 1 and "vit_b16 comes without its ImageNet classifier here" in result.output


@pytest.mark.slow
def test_a_presets_image_converter_is_the_models_preprocessing_through_runs_and_exports(tmp_path):
    import keras

    import tfxfer.model  # noqa: F401

    folder = str(tmp_path / "preset")
    TINY["vit_b16"][1]().save_to_preset(folder)
    scale, offset = [1 / 58.0, 1 / 57.0, 1 / 57.5], [-2.1, -2.0, -1.8]
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=scale, offset=offset).save_to_preset(folder)

    model = tfxfer.build_model("vit_b16", num_classes=2, weights=folder, image_size=32)
    assert model.normalization == {"scale": scale, "offset": offset}
    pixels = np.full((1, 2, 2, 3), 100, np.uint8)
    np.testing.assert_allclose(np.asarray(model.preprocess(pixels))[0, 0, 0], 100 * np.array(scale) + offset, rtol=1e-6)
    # Without the converter file, the family's own preprocessing ([-1, 1] for ViT) stays.
    plain = str(tmp_path / "plain")
    TINY["vit_b16"][1]().save_to_preset(plain)
    assert tfxfer.build_model("vit_b16", num_classes=2, weights=plain, image_size=32).normalization is None

    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    result = run_cli("finetune", "--data-dir", data, "--backbone", "vit_b16", "--weights", folder, "--image-size", "32",
                     "--epochs", "1", "--output-dir", tmp_path / "runs", "--run-name", "converted")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "converted"
    assert json.loads((run / "backbone.json").read_text())["normalization"] == {"scale": scale, "offset": offset}
    assert keras.models.load_model(run / "model.keras", compile=False).normalization["offset"] == offset
    again = run_cli("finetune", "--data-dir", data, "--weights", run, "--epochs", "1", "--output-dir", tmp_path / "runs",
                    "--run-name", "again")
    assert again.exit_code == 0, again.output
    assert keras.models.load_model(tmp_path / "runs" / "again" / "model.keras", compile=False).normalization["scale"] == scale


def test_parameter_counts_match_an_independent_build_and_a_hand_count():
    # DeiT-Tiny as KerasHub builds it from the published configuration, outside tfxfer's registry.
    deit = keras_hub.models.DeiTBackbone(image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=3,
                                         hidden_dim=192, intermediate_dim=768)
    assert get_backbone("deit_tiny").params == deit.count_params()
    # ViT-B/16 by hand: patch embedding, class token, 197 position embeddings, 12 blocks of two LayerNorms,
    # four attention projections and a two-layer MLP, and the final LayerNorm.
    width, mlp, blocks, tokens = 768, 3072, 12, 1 + (224 // 16) ** 2
    block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    assert get_backbone("vit_b16").params == (16 * 16 * 3 * width + width) + width + tokens * width + blocks * block + 2 * width
    # SigLIP2-B/16's tower: the same blocks with 196 position embeddings (and their 196 ids), then the
    # attention-pooling head: its probe, attention, LayerNorm and MLP.
    head = width + 4 * (width * width + width) + 2 * width + (width * mlp + mlp) + (mlp * width + width)
    assert get_backbone("siglip2_base").params == ((16 * 16 * 3 * width + width) + (tokens - 1) * (width + 1)
                                                   + blocks * block + 2 * width + head)
    # DINOv3 ViT-S/16: the class, mask and 4 register tokens; blocks without a key bias and with two
    # LayerScales; rotary positions, which have no weights.
    width, mlp = 384, 1536
    block = (2 * 2 * width + 3 * (width * width + width) + width * width + (width * mlp + mlp) + (mlp * width + width)
             + 2 * width)
    assert get_backbone("dinov3_small").params == (16 * 16 * 3 * width + width) + 6 * width + blocks * block + 2 * width


@pytest.mark.parametrize("name", ["vit_b16", "deit_small"])
def test_explain_maps_a_token_backbone_from_its_patch_tokens(presets, name):
    # The pooled output is a vector: the map comes from the patch tokens, laid out on their grid.
    from tfxfer.explain import grad_cam

    size = TINY[name][0]
    model = tfxfer.build_model(name, num_classes=3, weights=presets[name], image_size=size)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), np.uint8)
    heatmaps, probabilities = grad_cam(model, images)
    assert heatmaps.shape == (2, size, size) and np.isfinite(heatmaps).all()
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)


# (entry, the adapted layers, how many attentions have them: the 4 blocks', and SigLIP's pooling head's)
@pytest.mark.parametrize("name, target, attentions", [
    ("vit_b16", ("query", "value"), 4), ("dinov2_small", ("query", "value"), 4),
    ("dinov3_small", ("q_proj", "v_proj"), 4), ("siglip2_base", ("query", "value"), 5)])
def test_lora_adapts_the_attention_projections_and_the_export_merges_them(presets, name, target, attentions):
    from tfxfer.export.precision import at_precision

    size = TINY[name][0]
    model = tfxfer.build_model(name, num_classes=3, weights=presets[name], image_size=size, lora=2)
    adapters = [w.path for w in model.backbone.trainable_weights]
    assert len(adapters) == attentions * 2 * 2  # query and value, A and B
    assert all(p.rpartition("/")[0].rpartition("/")[2] in target and "lora_kernel" in p for p in adapters)
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3)).astype("uint8")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(images, np.arange(8) % 3, batch_size=8, epochs=2, verbose=0)
    merged = at_precision(model)
    assert not any("lora" in w.path for w in merged.weights)
    np.testing.assert_allclose(merged.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
