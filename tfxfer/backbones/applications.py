"""The `keras.applications` families: ResNet v1 and v2, MobileNetV2,
EfficientNetB0-B3, EfficientNetV2 B0-B3 and S, ConvNeXt Tiny and Small.

Constructors and preprocessing are named by `Reference`, so Keras loads when a
network is built, not when the registry is read.
"""

import re

from tfxfer.backbones.registry import BackboneSpec, Reference, register_backbone


def _prefix_stage_of(rules):
    """A `stage_of` from (regex, stage) rules; the stage may use regex groups."""
    compiled = [(re.compile(p), s) for p, s in rules]

    def stage_of(layer_name):
        for pattern, stage in compiled:
            m = pattern.match(layer_name)
            if m:
                return m.expand(stage)
        return None

    return stage_of


def _mobilenetv2_stage_of(layer_name):
    # Stages end where the feature map halves: blocks 1-2, 3-5, 6-12, 13-16.
    if layer_name.startswith(("Conv1", "bn_Conv1", "expanded_conv")):
        return "stem"
    m = re.match(r"block_(\d+)_", layer_name)
    if m:
        block = int(m.group(1))
        return "stage" + str(1 + sum(block >= b for b in (3, 6, 13)))
    if layer_name.startswith(("Conv_1", "out_relu")):
        return "top"
    return None


_RESNET_STAGES = ("stem", "conv2", "conv3", "conv4", "conv5")
_resnet_stage_of = _prefix_stage_of(
    [(r"(conv1|pool1)_", "stem"), (r"(conv[2-5])_", r"\1"), (r"post_", "conv5")]
)
_APPS = "keras.applications"

# Parameter counts are those of the headless networks (tests/test_backbones.py).
for _name, _builder, _module, _params in [
    ("resnet50", "ResNet50", "resnet", 23_587_712),
    ("resnet101", "ResNet101", "resnet", 42_658_176),
    ("resnet152", "ResNet152", "resnet", 58_370_944),
    ("resnet50v2", "ResNet50V2", "resnet_v2", 23_564_800),
    ("resnet101v2", "ResNet101V2", "resnet_v2", 42_626_560),
]:
    register_backbone(
        BackboneSpec(_name, Reference(f"{_APPS}:{_builder}"), Reference(f"{_APPS}.{_module}:preprocess_input"), 224,
                     _RESNET_STAGES, _resnet_stage_of, "224 px (32 px works from scratch)", params=_params,
                     licence="MIT (Kaiming He's release)" if "v2" not in _name else "Apache-2.0")
    )

register_backbone(
    BackboneSpec(
        "mobilenetv2",
        Reference(f"{_APPS}:MobileNetV2"),
        Reference(f"{_APPS}.mobilenet_v2:preprocess_input"),
        224,
        ("stem", "stage1", "stage2", "stage3", "stage4", "top"),
        _mobilenetv2_stage_of,
        "96-224 px (32 px works from scratch)",
        params=2_257_984,
        licence="Apache-2.0",
    )
)

_EFFICIENTNET_STAGES = ("stem",) + tuple(f"block{i}" for i in range(1, 8)) + ("top",)
_efficientnet_stage_of = _prefix_stage_of(
    [(r"stem_", "stem"), (r"block(\d)[a-z]_", r"block\1"), (r"top_", "top")]
)
for _i, (_size, _params) in enumerate(zip((224, 240, 260, 300), (4_049_571, 6_575_239, 7_768_569, 10_783_535))):
    register_backbone(
        BackboneSpec(
            f"efficientnetb{_i}",
            Reference(f"{_APPS}:EfficientNetB{_i}"),
            # EfficientNet rescales and normalizes inside the model itself.
            Reference(f"{_APPS}.efficientnet:preprocess_input"),
            _size,
            _EFFICIENTNET_STAGES,
            _efficientnet_stage_of,
            f"{_size} px (32 px works from scratch)",
            params=_params,
            licence="Apache-2.0",
        )
    )

# EfficientNetV2 also rescales and normalizes inside the model.
_EFFICIENTNETV2_STAGES = ("stem",) + tuple(f"block{i}" for i in range(1, 7)) + ("top",)
for _variant, _size, _params in [("B0", 224, 5_919_312), ("B1", 240, 6_931_124), ("B2", 260, 8_769_374),
                                 ("B3", 300, 12_930_622), ("S", 384, 20_331_360)]:
    register_backbone(
        BackboneSpec(f"efficientnetv2{_variant.lower()}", Reference(f"{_APPS}:EfficientNetV2{_variant}"),
                     Reference(f"{_APPS}.efficientnet_v2:preprocess_input"), _size, _EFFICIENTNETV2_STAGES,
                     _efficientnet_stage_of, f"{_size} px (32 px works from scratch)", params=_params,
                     licence="Apache-2.0")
    )

# ConvNeXt normalizes inside the model; its layers are named after the model
# ("convnext_tiny_stage_2_block_0_..."), and downsampling block i opens stage i + 1.
_CONVNEXT_STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


def _convnext_stage_of(layer_name):
    m = re.match(r"convnext_[a-z]+_(stem|stage_(\d)|downsampling_block_(\d))", layer_name)
    if not m:
        return None
    if m.group(1) == "stem":
        return "stem"
    return f"stage{int(m.group(2)) + 1}" if m.group(2) else f"stage{int(m.group(3)) + 2}"


for _variant, _params in [("Tiny", 27_820_128), ("Small", 49_454_688)]:
    register_backbone(
        BackboneSpec(f"convnext_{_variant.lower()}", Reference(f"{_APPS}:ConvNeXt{_variant}"),
                     Reference(f"{_APPS}.convnext:preprocess_input"), 224, _CONVNEXT_STAGES, _convnext_stage_of,
                     "224 px (32 px works from scratch)", params=_params, licence="MIT (Meta's release)")
    )
