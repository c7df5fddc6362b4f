"""`simplecnn`: the two-convolution network of the classic "pretrain your own CNN"
example (the Keras MNIST convnet), headless: conv 32 -> conv 64 -> max-pool ->
dense 128. Its features are the dense layer's 128 values; the new head replaces
the old output layer, as in the example. For 28-32 px images.
"""

from tfxfer.backbones.registry import BackboneSpec, no_imagenet_weights, register_backbone, scale_unit

__all__ = ["simplecnn"]


def simplecnn(weights=None, include_top=False, input_shape=(32, 32, 3), name="simplecnn"):
    """The headless network; `weights` must be `None`
    (`create_backbone` loads weights files)."""
    import keras  # at build time: the spec registers without loading TensorFlow

    no_imagenet_weights("simplecnn", weights, include_top)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense")(x)
    return keras.Model(inputs, x, name=name)


register_backbone(
    BackboneSpec(
        "simplecnn",
        simplecnn,
        scale_unit,
        32,
        ("conv1", "conv2", "dense"),
        lambda layer: {"conv1": "conv1", "conv2": "conv2", "dense": "dense"}.get(layer),
        sizes="28-32 px (the dense layer fixes the input size)",
        min_size=28,
        params=1_625_152,
        source="none: `tfxfer pretrain` makes its weights",
    )
)
