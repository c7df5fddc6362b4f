import numpy as np
import pytest

import tfxfer
from tfxfer.backbones import create_backbone, layer_stages


def test_registry_has_the_required_families():
    names = tfxfer.list_backbones()
    for name in ("resnet50", "resnet101", "resnet152", "resnet50v2", "mobilenetv2", "efficientnetb0"):
        assert name in names
    assert tfxfer.list_backbones("resnet5*") == ["resnet50", "resnet50v2"]


def test_unknown_backbone_names_close_matches():
    with pytest.raises(tfxfer.TfxferError, match="did you mean 'resnet50'"):
        tfxfer.get_backbone("resnet5O")


@pytest.mark.slow
def test_resnet50_stages_follow_keras_layer_names():
    spec = tfxfer.get_backbone("resnet50")
    backbone = create_backbone("resnet50", weights=None, image_size=32)
    assert backbone.count_params() == spec.params  # what `tfxfer backbones` shows
    stages = layer_stages(backbone, spec)
    assert stages["conv1_conv"] == "stem"
    assert stages["pool1_pool"] == "stem"
    assert stages["conv2_block1_1_conv"] == "conv2"
    assert stages["conv4_block6_out"] == "conv4"
    assert stages["conv5_block3_3_bn"] == "conv5"
    assert list(dict.fromkeys(stages.values())) == list(spec.stages)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnetb0", "resnet50v2", "efficientnetv2b0", "convnext_tiny"])
def test_every_stage_of_other_families_has_layers(name):
    spec = tfxfer.get_backbone(name)
    backbone = create_backbone(name, weights=None, image_size=32)
    assert backbone.count_params() == spec.params
    stages = layer_stages(backbone, spec)
    assert list(dict.fromkeys(stages.values())) == list(spec.stages)


def test_imagenet_download_offline_names_the_way_out(offline_keras):
    with pytest.raises(tfxfer.TfxferError) as info:
        create_backbone("resnet50", weights="imagenet", image_size=32)
    message = str(info.value)
    assert "--weights PATH" in message and ".keras" in message and "\n" not in message


@pytest.mark.slow
def test_local_weights_file_round_trips(tmp_path):
    source = create_backbone("resnet50", weights=None, image_size=32)
    path = str(tmp_path / "resnet50_notop.weights.h5")
    source.save_weights(path)
    loaded = create_backbone("resnet50", weights=path, image_size=32)
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_weights_file_of_another_architecture_fails_clearly(tmp_path):
    path = str(tmp_path / "mobilenet.weights.h5")
    create_backbone("mobilenetv2", weights=None, image_size=32).save_weights(path)
    with pytest.raises(tfxfer.TfxferError, match="does not fit backbone resnet50"):
        create_backbone("resnet50", weights=path, image_size=32)


def test_missing_weights_file_fails_clearly():
    with pytest.raises(tfxfer.TfxferError, match="does not exist"):
        create_backbone("resnet50", weights="/no/such/file.h5", image_size=32)


@pytest.mark.parametrize("name, stages", [("simplecnn", ("conv1", "conv2", "dense")), ("resnet9", ("prep", "layer1", "layer2", "layer3"))])
def test_small_backbones_have_a_stage_map_and_train_by_stage(name, stages):
    spec = tfxfer.get_backbone(name)
    assert spec.stages == stages and spec.default_size == 32 and spec.sizes
    backbone = create_backbone(name, weights=None, image_size=spec.default_size)
    assert backbone.count_params() == spec.params
    by_layer = layer_stages(backbone, spec)
    assert list(dict.fromkeys(by_layer.values())) == list(stages)
    model = tfxfer.build_model(name, num_classes=4, weights=None, image_size=32, freeze="stages:1")
    trained_stages = {by_layer[layer] for layer in model.trained_layers}
    assert trained_stages == {stages[-1]}
    assert model(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 4)


def test_resnet9_width_is_a_constructor_argument():
    from tfxfer.backbones.resnet9 import DEFAULT_WIDTH, resnet9

    assert resnet9(input_shape=(32, 32, 3)).output.shape[-1] == 8 * DEFAULT_WIDTH
    assert resnet9(input_shape=(32, 32, 3), width=8).output.shape[-1] == 64


@pytest.mark.parametrize("name", ["simplecnn", "resnet9"])
def test_small_backbones_have_no_imagenet_weights(name):
    with pytest.raises(tfxfer.TfxferError, match="has no ImageNet weights.*tfxfer pretrain"):
        create_backbone(name, weights="imagenet", image_size=32)
