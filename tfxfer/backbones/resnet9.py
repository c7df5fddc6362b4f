"""`resnet9`: the DAWNBench ResNet-9 for 32-px images (Page, 2018), from Keras layers.

prep conv (w) -> layer1: conv (2w) + max-pool + residual block (two convs)
             -> layer2: conv (4w) + max-pool
             -> layer3: conv (8w) + max-pool + residual block
Every conv is 3x3, without bias, followed by BatchNorm and ReLU. The headless
network ends with layer3's feature map; the head pools it.

The width `w` is a constructor argument. DAWNBench used 64 (64-512 channels).
A 20-minute pretraining budget on 2 AVX2-only cores must see at least 5 epochs
of 30,000 images (125 img/s). Measured through tfxfer's training step (batch
128, float32, oneDNN) on an AMD EPYC with AVX2 only: width 16, 710 img/s; 24,
373; 32, 206; another AVX2 machine measured half these
rates. SimCLR's two views halve them again. The default is 24 (24-192).
"""

from tfxfer.backbones.registry import BackboneSpec, no_imagenet_weights, register_backbone, scale_symmetric

__all__ = ["resnet9", "DEFAULT_WIDTH"]

DEFAULT_WIDTH = 24


def _conv_bn(x, filters, name):
    import keras

    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _stage(x, filters, name, residual):
    import keras

    x = _conv_bn(x, filters, name)
    x = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    if residual:
        y = _conv_bn(x, filters, f"{name}_res1")
        y = _conv_bn(y, filters, f"{name}_res2")
        x = keras.layers.Add(name=f"{name}_add")([x, y])
    return x


def resnet9(weights=None, include_top=False, input_shape=(32, 32, 3), width=DEFAULT_WIDTH, name="resnet9"):
    """The headless ResNet-9 of the given `width`; `weights` must be `None`
    (`create_backbone` loads weights files)."""
    import keras  # at build time: the spec registers without loading TensorFlow

    no_imagenet_weights("resnet9", weights, include_top)
    inputs = keras.Input(input_shape)
    x = _conv_bn(inputs, width, "prep")
    x = _stage(x, 2 * width, "layer1", residual=True)
    x = _stage(x, 4 * width, "layer2", residual=False)
    x = _stage(x, 8 * width, "layer3", residual=True)
    return keras.Model(inputs, x, name=name)


register_backbone(
    BackboneSpec(
        "resnet9",
        resnet9,
        scale_symmetric,
        32,
        ("prep", "layer1", "layer2", "layer3"),
        lambda layer: layer.split("_")[0] if layer.startswith(("prep", "layer")) else None,
        sizes="32-64 px",
        params=926_760,
        source="none: `tfxfer pretrain` makes its weights",
    )
)
