"""KerasHub backbones: ViT, DeiT, DINOv2 (with and without registers), DINOv3,
SigLIP2's vision tower and Swin.

KerasHub is an optional extra (`pip install 'tfxfer[hub]'`). Each entry names
a family and its preset; the family's architecture is written out here as
well, so `--weights none` builds offline. `--weights imagenet` (or the
preset's name) loads the preset through `Backbone.from_preset`, which
downloads it once into KerasHub's cache; `--weights DIR` loads a preset folder
written by `save_to_preset`, with the architecture that folder holds, and with
its image converter's scale and offset as the preprocessing when it has one
(`tfxfer.backbones.pretrained.input_normalization`).

A transformer backbone returns tokens, not a feature map; the wrapper built
here pools them the way each family's own classifier does (the class token
for ViT and DINOv2, the class and distillation tokens averaged for DeiT, the
class token beside the mean patch token for DINOv3, the mean token for Swin;
SigLIP's tower pools itself with its attention-pooling head), so the head
sees one vector per image, as it does for a CNN.

These networks have LayerNorm and no BatchNorm: LayerNorm keeps no running
statistics, so its scale and shift train with the block they sit in and
`--train-bn` changes nothing.
"""

import dataclasses
import json
import os
from typing import Optional

from tfxfer.backbones.pretrained import is_preset_folder
from tfxfer.backbones.registry import BackboneSpec, register_backbone, scale_symmetric
from tfxfer.errors import TfxferError, is_network_failure

__all__ = ["HubFamily", "imagenet_normalize"]

NEEDS = "needs KerasHub: pip install 'tfxfer[hub]' (Python 3.11 or newer)"
PRESET_CONFIG = "config.json"  # what save_to_preset writes first
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x):
    """0-255 pixels to ImageNet's mean and standard deviation per channel."""
    return (x / 255.0 - _MEAN) / _STD


@dataclasses.dataclass(frozen=True)
class HubFamily:
    """How tfxfer reads one KerasHub backbone class.

    Args:
        cls: the `keras_hub.models` class name.
        stages: stage names, input to output: the embedding, then the blocks
            in groups.
        embed: names of the backbone's layers before the blocks.
        blocks: returns the blocks (transformer blocks, or Swin's stages),
            input to output, from the built KerasHub backbone.
        tail: returns the layers after the blocks (the final LayerNorm), which
            train with the last group.
        pool: `"cls"`, `"cls+distillation"`, `"cls+patches"` (the class token
            concatenated with the mean of the patch tokens, register tokens
            left out) or `"mean"` over the tokens; `"pooled"` where the
            backbone returns one vector itself.
        input_name: the backbone takes `{input_name: images}`; `None`, the
            images alone.
        lora_targets: the layers LoRA adapts: the attention's query and value
            projections (KerasHub's `enable_lora` default, DINOv3's
            `q_proj,v_proj`), Swin's fused qkv.
        container: `(class name, attribute)` of the KerasHub class whose
            presets hold this backbone as one part (SigLIP's image-text
            presets hold the vision tower as `vision_encoder`); `None` where
            the presets are the backbone itself.
    """

    cls: str
    stages: tuple
    embed: tuple
    blocks: object
    tail: object
    pool: str
    input_name: Optional[str] = None
    lora_targets: str = "query,value"
    container: Optional[tuple] = None

    def multiple(self, config):
        """The sizes an image side must be a multiple of, for a preset config."""
        patch = _patch(config)
        if "window_size" in config:  # Swin halves the map after each stage but the last
            return patch * config["window_size"] * 2 ** (len(config["depths"]) - 1)
        return patch

    def units(self, backbone):
        """`[(layer, stage)]` over a wrapper `backbone` that `_HubBuilder` built."""
        hub = backbone.get_layer("hub")
        units = [(_layer(hub, name), self.stages[0]) for name in self.embed]
        blocks = self.blocks(hub)
        groups = len(self.stages) - 1
        for i, block in enumerate(blocks):
            units.append((block, self.stages[1 + i * groups // len(blocks)]))
        units += [(layer, self.stages[-1]) for layer in self.tail(hub)]
        return units


def _patch(config):
    patch = config["patch_size"]
    return patch[0] if isinstance(patch, (list, tuple)) else patch


def _layer(hub, name):
    """The layer `name` of a KerasHub backbone, which some backbones prefix with their own name."""
    return next(layer for layer in hub.layers if layer.name == name or layer.name.endswith("_" + name))


VIT_FAMILY = HubFamily("ViTBackbone", ("embed", "blocks1", "blocks2", "blocks3", "blocks4"),
                       ("vit_patching_and_embedding",), lambda hub: _layer(hub, "vit_encoder").encoder_layers,
                       lambda hub: [_layer(hub, "vit_encoder").layer_norm], "cls")
DEIT_FAMILY = HubFamily("DeiTBackbone", VIT_FAMILY.stages, ("deit_patching_and_embedding",),
                        lambda hub: _layer(hub, "deit_encoder").encoder_layers,
                        lambda hub: [_layer(hub, "deit_encoder").layer_norm], "cls+distillation")
DINOV2_FAMILY = HubFamily("DINOV2Backbone", VIT_FAMILY.stages, ("embeddings",),
                          lambda hub: _layer(hub, "encoder").layers, lambda hub: [_layer(hub, "layernorm")], "cls",
                          input_name="images")
# DINOv3's authors classify from the class token concatenated with the mean patch token
# (their released ImageNet linear classifier). Its rotary position embedding has no
# weights, so the patch embedding is the whole of its first stage.
DINOV3_FAMILY = dataclasses.replace(DINOV2_FAMILY, cls="DINOV3Backbone", pool="cls+patches", input_name="pixel_values",
                                    lora_targets="q_proj,v_proj")
# SigLIP's attention-pooling head reads every token after the last block, so it trains
# with the last group, as a final LayerNorm does.
SIGLIP_FAMILY = HubFamily("SigLIPVisionEncoder", VIT_FAMILY.stages, ("embedding",), lambda hub: hub.encoder_layers,
                          lambda hub: [_layer(hub, "post_layer_norm"), _layer(hub, "head")], "pooled",
                          input_name="images", container=("SigLIPBackbone", "vision_encoder"))
SWIN_FAMILY = HubFamily("SwinTransformerBackbone", ("stem", "stage1", "stage2", "stage3", "stage4"), ("patch_embedding",),
                        lambda hub: [layer for layer in hub.layers if layer.name.startswith("stage_")],
                        lambda hub: [_layer(hub, "norm")], "mean", lora_targets="attention_qkv")


def _keras_hub(name):
    try:
        import keras_hub
    except ImportError:
        raise TfxferError(f"{name} {NEEDS}.") from None
    return keras_hub


def _check_size(name, size, multiple):
    if size % multiple:
        below, above = size // multiple * multiple, (size // multiple + 1) * multiple
        nearest = f"{below} or {above}" if below else str(above)
        raise TfxferError(f"{name} needs an image size that is a multiple of {multiple}, got {size}; "
                          f"pass --image-size {nearest}.")


class _HubBuilder:
    """A `keras.applications`-style constructor for one registry entry."""

    def __init__(self, name, family, preset, architecture):
        self.name, self.family, self.preset, self.architecture = name, family, preset, architecture

    def __call__(self, weights=None, include_top=False, input_shape=(224, 224, 3), architecture=None):
        """`architecture`: a KerasHub config (a run folder's), built with random
        weights in place of the entry's own."""
        if include_top:
            raise TfxferError(f"{self.name} comes without its ImageNet classifier here; fine-tune it and predict "
                              "with --model RUN.")
        keras_hub = _keras_hub(self.name)
        cls = getattr(keras_hub.models, self.family.cls)
        size = int(input_shape[0])
        shape = (size, size, 3)
        if architecture is not None:
            _check_size(self.name, size, self.family.multiple(architecture))
            return self._wrap(cls.from_config({**architecture, "image_shape": shape}), size)
        if weights in (None, "none"):
            _check_size(self.name, size, self.family.multiple(self.architecture))
            return self._wrap(cls(image_shape=shape, **self.architecture), size)
        preset = self.preset if weights == "imagenet" else weights
        container = self.family.container
        if is_preset_folder(preset):
            with open(os.path.join(preset, PRESET_CONFIG)) as f:
                saved = json.load(f)
            held = saved.get("class_name")
            if held != self.family.cls and not (container and held == container[0]):
                raise TfxferError(f"{preset!r} holds a KerasHub {held}, not the "
                                  f"{self.family.cls} that {self.name} is; pick the matching --backbone.")
            whole = held != self.family.cls
            config = saved["config"][container[1]]["config"] if whole else saved["config"]
            _check_size(self.name, size, self.family.multiple(config))
            trained_at = config.get("image_shape", [None])[0]
        else:
            whole = container is not None
            _check_size(self.name, size, self.family.multiple(self.architecture))
            trained_at = 224
        if whole and trained_at and trained_at != size:
            # The part is built as the whole preset says, at its own size: refused before a download.
            raise self._fixed_size(preset, trained_at)
        try:
            hub = self._from_container(cls, preset) if whole else cls.from_preset(preset, image_shape=shape)
        except Exception as e:
            if is_network_failure(e):
                raise TfxferError(
                    f"Could not download the KerasHub preset {self.preset} for {self.name} (no network?); on a "
                    f"machine with network run `python -c \"import keras_hub; keras_hub.models.Backbone.from_preset("
                    f"'{self.preset}').save_to_preset('DIR')\"`, copy DIR here and pass --weights DIR."
                ) from None
            if "shape" in str(e) and trained_at and trained_at != size:
                raise self._fixed_size(preset, trained_at) from None
            raise
        return self._wrap(hub, size)

    def _fixed_size(self, preset, trained_at):
        return TfxferError(f"{self.name} weights from {preset} were trained at {trained_at} px and their "
                           f"position embeddings fit no other size; pass --image-size {trained_at}.")

    def _from_container(self, cls, preset):
        """The backbone that a preset of the family's container holds, as a fresh `cls`."""
        outer, attribute = self.family.container
        part = getattr(getattr(_keras_hub(self.name).models, outer).from_preset(preset), attribute)
        # A copy, not the part itself: the part stays wired into the whole model, whose
        # other parts (SigLIP's text encoder) would then stay in memory beside it.
        hub = cls.from_config(part.get_config())
        hub.set_weights(part.get_weights())
        return hub

    def _wrap(self, hub, size):
        """A functional model from (preprocessed) images to one vector per image."""
        import keras

        hub.name = "hub"  # one name whatever the preset called it: units and weight files rely on it
        images = keras.Input((size, size, 3), name="images")
        name, pool = self.family.input_name, self.family.pool
        tokens = hub({name: images} if name else images)
        if pool == "pooled":
            features = tokens
        elif pool == "cls":
            features = tokens[:, 0]
        elif pool == "cls+distillation":
            features = (tokens[:, 0] + tokens[:, 1]) / 2
        elif pool == "cls+patches":
            # KerasHub puts the register tokens between the class token and the patches.
            patches = tokens[:, 1 + hub.get_config().get("num_register_tokens", 0):]
            features = keras.ops.concatenate([tokens[:, 0], keras.ops.mean(patches, axis=1)], axis=-1)
        else:
            features = keras.ops.mean(tokens, axis=1)
        return keras.Model(images, features, name=self.name)


def _register(name, family, preset, architecture, preprocess, params, source, licence, size=224, sizes=None):
    multiple = family.multiple(architecture)
    register_backbone(BackboneSpec(
        name, _HubBuilder(name, family, preset, architecture), preprocess, size, family.stages, None,
        sizes or f"{size} px pretrained; multiples of {multiple} from scratch", min_size=_patch(architecture),
        params=params, source=f"{source} (KerasHub {preset})", licence=licence, units=family.units, presets=True,
        lora_targets=family.lora_targets,
    ))


def _vit(layers, heads, hidden, mlp, patch=16):
    return {"patch_size": patch, "num_layers": layers, "num_heads": heads, "hidden_dim": hidden, "mlp_dim": mlp}


def _deit(layers, heads, hidden, intermediate, patch=16):
    return {"patch_size": patch, "num_layers": layers, "num_heads": heads, "hidden_dim": hidden,
            "intermediate_dim": intermediate}


def _dinov2(layers, heads, hidden, intermediate, registers=0):
    return {"patch_size": 14, "num_layers": layers, "num_heads": heads, "hidden_dim": hidden,
            "intermediate_dim": intermediate, "position_embedding_shape": (518, 518, 3),
            "num_register_tokens": registers}


def _dinov3(layers, heads, hidden, intermediate):
    # As the authors' ViT-S/B/L: four register tokens, no key bias, LayerScale starting at 1e-5.
    return {"patch_size": 16, "num_layers": layers, "num_heads": heads, "hidden_dim": hidden,
            "intermediate_dim": intermediate, "num_register_tokens": 4, "use_key_bias": False,
            "layer_scale_init_value": 1e-5}


_register("vit_b16", VIT_FAMILY, "vit_base_patch16_224_imagenet", _vit(12, 12, 768, 3072), scale_symmetric,
          85_798_656, "ImageNet-21k, then ImageNet-1k", "Apache-2.0")
_register("deit_tiny", DEIT_FAMILY, "deit_tiny_distilled_patch16_224_imagenet", _deit(12, 3, 192, 768),
          imagenet_normalize, 5_524_800, "ImageNet-1k, distilled", "Apache-2.0")
_register("deit_small", DEIT_FAMILY, "deit_small_distilled_patch16_224_imagenet", _deit(12, 6, 384, 1536),
          imagenet_normalize, 21_666_432, "ImageNet-1k, distilled", "Apache-2.0")
_register("deit_base", DEIT_FAMILY, "deit_base_distilled_patch16_224_imagenet", _deit(12, 12, 768, 3072),
          imagenet_normalize, 85_800_192, "ImageNet-1k, distilled", "Apache-2.0")
_register("dinov2_small", DINOV2_FAMILY, "dinov2_small", _dinov2(12, 6, 384, 1536), imagenet_normalize,
          22_155_264, "LVD-142M, self-supervised", "Apache-2.0")
_register("dinov2_base", DINOV2_FAMILY, "dinov2_base", _dinov2(12, 12, 768, 3072), imagenet_normalize,
          86_777_856, "LVD-142M, self-supervised", "Apache-2.0")
_register("dinov2_small_reg", DINOV2_FAMILY, "dinov2_with_registers_small", _dinov2(12, 6, 384, 1536, registers=4),
          imagenet_normalize, 22_156_800, "LVD-142M, self-supervised, with registers", "Apache-2.0")
_register("dinov2_base_reg", DINOV2_FAMILY, "dinov2_with_registers_base", _dinov2(12, 12, 768, 3072, registers=4),
          imagenet_normalize, 86_780_928, "LVD-142M, self-supervised, with registers", "Apache-2.0")
# Rotary position embeddings: the pretrained weights fit any multiple of the patch.
_DINOV3_SIZES = "224 px pretrained; multiples of 16, pretrained or not"
_register("dinov3_small", DINOV3_FAMILY, "dinov3_vit_small_lvd1689m", _dinov3(12, 6, 384, 1536), imagenet_normalize,
          21_596_544, "LVD-1689M, self-supervised", "DINOv3 License", sizes=_DINOV3_SIZES)
_register("dinov3_base", DINOV3_FAMILY, "dinov3_vit_base_lvd1689m", _dinov3(12, 12, 768, 3072), imagenet_normalize,
          85_660_416, "LVD-1689M, self-supervised", "DINOv3 License", sizes=_DINOV3_SIZES)
_register("dinov3_large", DINOV3_FAMILY, "dinov3_vit_large_lvd1689m", _dinov3(24, 16, 1024, 4096), imagenet_normalize,
          303_129_600, "LVD-1689M, self-supervised", "DINOv3 License", sizes=_DINOV3_SIZES)
_register("siglip2_base", SIGLIP_FAMILY, "siglip2_base_patch16_224",
          {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "intermediate_dim": 3072},
          scale_symmetric, 92_884_420, "WebLi image-text pairs, SigLIP2 vision tower", "Apache-2.0")
_register("swin_tiny", SWIN_FAMILY, "swin_tiny_patch4_window7_224",
          {"patch_size": 4, "embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
          imagenet_normalize, 27_519_354, "ImageNet-1k", "MIT")
