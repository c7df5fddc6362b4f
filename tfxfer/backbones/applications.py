"""The `keras.applications` families: ResNet v1 and v2, MobileNetV2, EfficientNetB0-B3."""

import re

import keras

from tfxfer.backbones.registry import BackboneSpec, register_backbone

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
_apps = keras.applications

for _name, _builder, _module in [
    ("resnet50", _apps.ResNet50, _apps.resnet),
    ("resnet101", _apps.ResNet101, _apps.resnet),
    ("resnet152", _apps.ResNet152, _apps.resnet),
    ("resnet50v2", _apps.ResNet50V2, _apps.resnet_v2),
    ("resnet101v2", _apps.ResNet101V2, _apps.resnet_v2),
]:
    register_backbone(
        BackboneSpec(_name, _builder, _module.preprocess_input, 224, _RESNET_STAGES, _resnet_stage_of, "224 px (32 px works from scratch)")
    )

register_backbone(
    BackboneSpec(
        "mobilenetv2",
        _apps.MobileNetV2,
        _apps.mobilenet_v2.preprocess_input,
        224,
        ("stem", "stage1", "stage2", "stage3", "stage4", "top"),
        _mobilenetv2_stage_of,
        "96-224 px (32 px works from scratch)",
    )
)

_EFFICIENTNET_STAGES = ("stem",) + tuple(f"block{i}" for i in range(1, 8)) + ("top",)
_efficientnet_stage_of = _prefix_stage_of(
    [(r"stem_", "stem"), (r"block(\d)[a-z]_", r"block\1"), (r"top_", "top")]
)
for _i, _size in enumerate((224, 240, 260, 300)):
    register_backbone(
        BackboneSpec(
            f"efficientnetb{_i}",
            getattr(_apps, f"EfficientNetB{_i}"),
            # EfficientNet rescales and normalizes inside the model itself.
            _apps.efficientnet.preprocess_input,
            _size,
            _EFFICIENTNET_STAGES,
            _efficientnet_stage_of,
            f"{_size} px (32 px works from scratch)",
        )
    )
