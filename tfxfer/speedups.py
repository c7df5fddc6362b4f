"""Machine-specific speed-ups, applied at training time only.

Nothing here changes what `build_model`, `load_model` or an export builds:
the speed-ups are switched on around training (`applied`), and the run's
start line names them. Each one was kept because `benchmarks/` shows that it
still pays; each has a test that proves it runs.

* **oneDNN.** TensorFlow reads its oneDNN switch once, when it loads, so the
  switch cannot wait for training: `tfxfer.runtime.enable_onednn` sets it at
  `import tfxfer`, before TensorFlow loads, and `applied` reports it.
* **Convolutions on small feature maps, as matrix products.** oneDNN's
  convolution kernels are slow on the small feature maps that a ResNet's last
  stages have when images are small (ResNet50 at 32 px: 2x2 and 1x1 maps with
  1024-2048 channels):

  - a 1x1 convolution is a matrix product over pixels, and oneDNN's matrix
    product runs it many times faster there, forward and backward (in
    bfloat16, about twice as fast on maps of any size);
  - the kernel gradient of a k x k convolution with a handful of output
    pixels is one matrix product over image patches, about 4x faster than
    oneDNN's backward-weights kernel on a 1x1 map.

  `fast_convolutions(model)` reroutes a model's `Conv2D` layers through these
  paths where the output is that small (`POINTWISE_MAX_PIXELS`,
  `PATCH_GRADIENT_MAX_PIXELS`), and every bfloat16 1x1 convolution; the rest
  keep Keras's own convolution. Results
  are the same to float rounding. Only on CPUs: a GPU's cuDNN has its own
  kernels for small maps. Measured effect: `python -m benchmarks paired`.
* **Frozen BatchNorm folded into its convolution.** A BatchNorm layer in
  inference mode right after a linear `Conv2D` is an affine map of that
  convolution's output, so the pair is one convolution with the kernel scaled
  per output channel and one bias: `fold_batchnorm(model)` runs each such
  pair that way, which spares the multiply and add over every activation
  forward and backward, and oneDNN fuses the bias into the convolution or
  matrix product. Only on CPUs, like the rerouted convolutions.
  Measured effect: `python -m benchmarks bfloat16` (BatchNorm frozen).
* **BatchNorm in bfloat16.** Keras's BatchNormalization casts a bfloat16 input
  to float32, normalizes it with unfused ops and casts the result back, a guard
  against float16 overflow that bfloat16, with float32's range, does not need.
  `fast_batchnorm(model)` keeps the activations in bfloat16: a frozen layer
  (inference mode), an affine map, becomes `x * scale + offset` with `scale`
  and `offset` from the float32 statistics; a training layer runs TensorFlow's
  fused batch norm (float32 statistics and parameters, bfloat16 activations),
  forward and backward, and updates its moving statistics as Keras does.
  Measured effect: `python -m benchmarks bfloat16` (BatchNorm frozen and training).

Each speed-up applies only on the CPU kinds where it was measured to pay
(`MEASURED_ON`); elsewhere it stays off unless forced (`mode="force"`,
`--cpu-speedups force`), and the start line says which were left off and why.
`TransferModel.fit` applies them for the duration of `fit`, so a script's
`build_model` + `fit` trains as the command does.
"""

import contextlib
import functools

import keras
import tensorflow as tf

from tfxfer.runtime import cpu_flags, onednn_enabled

__all__ = [
    "MEASURED_ON", "MODES", "PATCH_GRADIENT_MAX_PIXELS", "POINTWISE_MAX_PIXELS", "apply", "cpu_kind", "applied", "bfloat16_batchnorm", "convolution_call",
    "fast_batchnorm", "fast_convolutions", "fold_batchnorm", "folded_convolution", "plain", "plain_convolutions",
    "routes", "subsample", "walk_layers",
]


MODES = ("auto", "off", "force")

# The CPU kinds on which each speed-up was measured to pay (`cpu_kind`):
# convolutions and folding by `python -m benchmarks paired` in float32 and
# bfloat16 (AMX: BENCHMARKS.md; AVX512-BF16: benchmarks/paired-avx512_bf16.md),
# bfloat16 BatchNorm by `python -m benchmarks bfloat16` (AMX only so far:
# benchmarks/bfloat16.md; paired folds every BatchNorm of its ResNet50).
MEASURED_ON = {
    "convolutions": ("amx", "avx512_bf16"),
    "folded BatchNorm": ("amx", "avx512_bf16"),
    "bfloat16 BatchNorm": ("amx",),
}


def cpu_kind(flags=None):
    """`amx`, `avx512_bf16`, `avx2` or `other`: the kinds of x86 CPU whose
    kernels differ enough that a speed-up measured on one says little about another."""
    flags = cpu_flags() if flags is None else flags
    for kind, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "other"


def apply(model, log=print, mode="auto"):
    """Give `model` the speed-ups this host takes, for training; logs one line
    naming them. Returns the function that puts `model` back as built.

    `mode`: `auto` applies those measured to pay on this CPU kind
    (`MEASURED_ON`), `force` all of them, `off` none.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown speed-up mode {mode!r}; one of {', '.join(MODES)}.")
    parts = [f"oneDNN {'on' if onednn_enabled() else 'off'}"]
    if mode == "off":
        log("speed-ups: " + "; ".join(parts + ["training speed-ups off (--cpu-speedups off)"]))
        return functools.partial(plain, model)
    kind = cpu_kind()
    wanted = {name for name, kinds in MEASURED_ON.items() if mode == "force" or kind in kinds}
    counts = {"pointwise": 0, "patch gradient": 0}
    if "convolutions" in wanted and fast_convolutions(model):
        counts = routes(model)
    if counts["pointwise"] or counts["patch gradient"]:
        parts.append(f"{counts['pointwise']} 1x1 convolutions as matrix products, "
                     f"{counts['patch gradient']} kernel gradients as matrix products over patches")
    else:
        parts.append("Keras's own convolutions")
    folded = fold_batchnorm(model) if "folded BatchNorm" in wanted else 0
    frozen, training = fast_batchnorm(model) if "bfloat16 BatchNorm" in wanted else (0, 0)
    if folded:
        parts.append(f"{folded} frozen BatchNorm layers folded into their convolutions")
    if frozen:
        parts.append(f"{frozen} frozen BatchNorm layers as bfloat16 multiply-adds")
    if training:
        parts.append(f"{training} training BatchNorm layers as bfloat16 fused batch norms")
    left = sorted(set(MEASURED_ON) - wanted)
    if left:
        parts.append(f"not measured on this CPU ({kind}), so off: {', '.join(left)} (--cpu-speedups force applies them)")
    log("speed-ups: " + "; ".join(parts))
    return functools.partial(plain, model)


def plain(model):
    """Undo every speed-up: `model` as built."""
    plain_convolutions(model)
    for layer in walk_layers(model):
        if isinstance(layer.__dict__.get("call"), functools.partial):
            del layer.call


@contextlib.contextmanager
def applied(model, log=print, mode="auto"):
    """`apply` for the duration of the block."""
    undo = apply(model, log, mode)
    try:
        yield model
    finally:
        undo()


def walk_layers(model):
    """Every layer inside `model`, depth first, nested models' layers too."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from walk_layers(layer)


# Output pixels up to which a k x k convolution's kernel gradient is one
# matrix product over patches; above it, oneDNN's kernel wins or ties.
PATCH_GRADIENT_MAX_PIXELS = 4
# Output pixels up to which a float32 1x1 convolution is a matrix product.
# In bfloat16 every 1x1 convolution is one: oneDNN's AMX matrix product runs
# its forward and both gradients about twice as fast as oneDNN's bfloat16
# convolution kernels at every ResNet50 size from 7x7 to 56x56 maps.
POINTWISE_MAX_PIXELS = 16


def fast_convolutions(model):
    """Route every plain `Conv2D` of `model` through `convolution_call`; returns how many.

    Only on CPUs: the paths were measured there, and a GPU's cuDNN has its own
    kernels for small maps, so with a GPU visible Keras's convolution stays.
    """
    if tf.config.list_logical_devices("GPU"):
        return 0
    count = 0
    for layer in walk_layers(model):
        if type(layer) is keras.layers.Conv2D and _supported(layer):
            layer.call = functools.partial(convolution_call, layer)
            count += 1
    return count


def _supported(layer):
    return (
        layer.groups == 1
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.data_format == "channels_last"
        and layer.strides[0] == layer.strides[1]
    )


def plain_convolutions(model):
    """Undo `fast_convolutions`: Keras's own convolution for every layer."""
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.Conv2D) and isinstance(layer.__dict__.get("call"), functools.partial):
            del layer.call


def routes(model):
    """How many of `model`'s convolutions take each path, by name:
    `pointwise`, `patch gradient` or `keras`."""
    counts = {"pointwise": 0, "patch gradient": 0, "keras": 0}
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            fast = isinstance(layer.__dict__.get("call"), functools.partial)
            counts[_route(layer, layer.input.shape, layer.compute_dtype) if fast else "keras"] += 1
    return counts


def _route(layer, input_shape, dtype):
    pixels = _output_pixels(input_shape, layer)
    if tuple(layer.kernel_size) == (1, 1) and (pixels <= POINTWISE_MAX_PIXELS or tf.as_dtype(dtype) == tf.bfloat16):
        return "pointwise"
    if pixels <= PATCH_GRADIENT_MAX_PIXELS:
        return "patch gradient"
    return "keras"


def convolution_call(layer, inputs, kernel=None, bias=None):
    """`layer(inputs)` (with `kernel` and `bias` in place of its own, if given),
    by the fastest exact path. A matrix product takes the bias itself, so that
    oneDNN fuses the two, as it fuses a convolution and its bias."""
    kernel = layer.kernel if kernel is None else kernel
    if bias is None and layer.use_bias:
        bias = layer.bias
    route = _route(layer, inputs.shape, inputs.dtype)
    if route == "pointwise":
        outputs = pointwise(inputs, kernel, layer.strides[0], bias)
    else:
        if route == "patch gradient":
            outputs = patch_gradient_conv(inputs, kernel, layer.strides[0], layer.padding.upper())
        else:
            outputs = layer.convolution_op(inputs, kernel)
        if bias is not None:
            outputs = tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
    return outputs if layer.activation is None else layer.activation(outputs)


def _output_pixels(shape, layer):
    height, width = shape[1], shape[2]
    if height is None or width is None:
        return float("inf")
    stride = layer.strides[0]
    if layer.padding == "same":
        return -(-height // stride) * -(-width // stride)
    kernel_h, kernel_w = layer.kernel_size
    return max(0, (height - kernel_h) // stride + 1) * max(0, (width - kernel_w) // stride + 1)


def pointwise(inputs, kernel, stride=1, bias=None):
    """A 1x1 convolution as one matrix product over pixels (plus `bias`).

    With a 1x1 kernel, "same" and "valid" padding agree and a stride only
    drops pixels, so this equals `conv2d` for both paddings.
    """
    kernel = tf.convert_to_tensor(kernel)
    if stride > 1:
        inputs = subsample(inputs, stride)
    channels_in, channels_out = kernel.shape[2], kernel.shape[3]
    shape = tf.shape(inputs)
    flat = tf.matmul(tf.reshape(inputs, [-1, channels_in]), tf.reshape(kernel, [channels_in, channels_out]))
    if bias is not None:
        flat = tf.nn.bias_add(flat, tf.cast(bias, flat.dtype))
    return tf.reshape(flat, tf.concat([shape[:3], [channels_out]], axis=0))


def subsample(inputs, stride):
    """`inputs[:, ::stride, ::stride, :]`. Where the stride divides the height
    and width, its gradient spreads the upstream gradient with a pad and a
    reshape: TensorFlow's own gradient of a strided slice takes longer than the
    matrix product after it (about 30x this at 56x56x256, bfloat16)."""
    height, width = inputs.shape[1], inputs.shape[2]
    if height is None or width is None or height % stride or width % stride:
        return inputs[:, ::stride, ::stride, :]

    @tf.custom_gradient
    def sample(inputs):
        def gradient(upstream):
            shape = tf.shape(upstream)
            spread = tf.pad(upstream[:, :, None, :, None, :], [[0, 0], [0, 0], [0, stride - 1], [0, 0], [0, stride - 1], [0, 0]])
            return tf.reshape(spread, [shape[0], height, width, shape[3]])

        return inputs[:, ::stride, ::stride, :], gradient

    return sample(inputs)


def patch_gradient_conv(inputs, kernel, stride, padding):
    """`conv2d`, whose kernel gradient is one matrix product over image patches."""
    kernel = tf.convert_to_tensor(kernel)
    kernel_h, kernel_w, channels_in, channels_out = kernel.shape

    @tf.custom_gradient
    def conv(inputs, kernel):
        outputs = tf.nn.conv2d(inputs, kernel, stride, padding)

        def gradient(upstream):
            d_inputs = tf.nn.conv2d_transpose(upstream, kernel, tf.shape(inputs), stride, padding)
            patches = tf.image.extract_patches(inputs, [1, kernel_h, kernel_w, 1], [1, stride, stride, 1], [1, 1, 1, 1], padding)
            d_kernel = tf.matmul(
                tf.reshape(patches, [-1, kernel_h * kernel_w * channels_in]),
                tf.reshape(upstream, [-1, channels_out]),
                transpose_a=True,
            )
            return d_inputs, tf.reshape(d_kernel, kernel.shape)

        return outputs, gradient

    return conv(inputs, kernel)


def fold_batchnorm(model):
    """Run each frozen BatchNorm that follows a linear `Conv2D` as part of that
    convolution (`folded_convolution`); returns how many were folded.

    A pair is folded only where the convolution's output goes to the
    BatchNorm alone and the BatchNorm is not trainable, so it is in inference
    mode and its scale and shift are constants for the step.
    """
    if tf.config.list_logical_devices("GPU"):
        return 0
    layers = list(walk_layers(model))
    consumers, producers = {}, {}
    for layer in layers:
        for tensor in _inputs(layer):
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
        for tensor in _outputs(layer):
            producers[id(tensor)] = layer
    count = 0
    for layer in layers:
        if type(layer) is not keras.layers.BatchNormalization or _learns(layer) or layer.axis not in (-1, 3):
            continue
        conv = producers.get(id(_inputs(layer)[0])) if _inputs(layer) else None
        if (type(conv) is keras.layers.Conv2D and _supported(conv) and conv.activation is keras.activations.linear
                and consumers.get(id(conv.output)) == 1):
            conv.call = functools.partial(folded_convolution, conv, layer)
            layer.call = functools.partial(_folded_batchnorm, layer)
            count += 1
    return count


def _inputs(layer):
    try:
        return tf.nest.flatten(layer.input)
    except (AttributeError, ValueError):  # never called, or called more than once
        return []


def _outputs(layer):
    try:
        return tf.nest.flatten(layer.output)
    except (AttributeError, ValueError):
        return []


def _folded_batchnorm(layer, inputs, training=None, mask=None):
    # A layer that an unfreezing phase made trainable after the folding runs on its own again.
    if _learns(layer):
        return bfloat16_batchnorm(layer, inputs, training=training, mask=mask)
    return inputs


def folded_convolution(conv, batchnorm, inputs):
    """`batchnorm(conv(inputs))` for a BatchNorm in inference mode, as one
    convolution: the kernel times the per-channel scale, plus one bias. The
    pair is read when the step is traced, so a BatchNorm that has become
    trainable since (gradual unfreezing with `--train-bn`) is not folded."""
    if batchnorm.trainable:
        return convolution_call(conv, inputs)
    scale, shift = _inference_affine(batchnorm)
    kernel = conv.kernel * tf.cast(scale, conv.compute_dtype)
    bias = tf.cast(shift, conv.compute_dtype)
    if conv.use_bias:
        bias += conv.bias * tf.cast(scale, conv.compute_dtype)
    return convolution_call(conv, inputs, kernel, bias)


def fast_batchnorm(model):
    """Route `model`'s BatchNormalization layers through `bfloat16_batchnorm`;
    returns `(frozen, training)`: how many of each compute in bfloat16 now."""
    counts = [0, 0]
    for layer in walk_layers(model):
        if type(layer) is keras.layers.BatchNormalization and "call" not in layer.__dict__:  # not folded
            layer.call = functools.partial(bfloat16_batchnorm, layer)
            if layer.compute_dtype == "bfloat16":
                counts[layer.trainable] += 1
    return tuple(counts)


def bfloat16_batchnorm(layer, inputs, training=None, mask=None):
    """`layer`'s output on bfloat16 inputs, computed in bfloat16 where Keras
    computes in float32: a frozen layer (or one in inference mode) as `inputs *
    scale + offset`; a training layer through TensorFlow's fused batch norm,
    with the moving statistics updated as Keras does. Anything else (float32,
    masks, other axes, synchronized or renormalizing layers) is Keras's call."""
    channels_last = layer.axis in (-1, len(inputs.shape) - 1)
    if inputs.dtype != tf.bfloat16 or mask is not None or not channels_last or len(inputs.shape) != 4:
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    if layer.trainable and training:
        if layer.synchronized or getattr(layer, "renorm", False):
            return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
        return _training_batchnorm(layer, inputs)
    scale, shift = _inference_affine(layer)
    return inputs * tf.cast(scale, tf.bfloat16) + tf.cast(shift, tf.bfloat16)


def _inference_affine(layer):
    """`(scale, shift)`, float32: a BatchNorm layer in inference mode is
    `x * scale + shift`. A frozen layer's numbers are constants for the step;
    a trainable one's keep the gradients of its gamma and beta."""
    scale = tf.math.rsqrt(tf.cast(layer.moving_variance, tf.float32) + layer.epsilon)
    if layer.scale:
        scale *= tf.cast(layer.gamma, tf.float32)
    shift = -tf.cast(layer.moving_mean, tf.float32) * scale
    if layer.center:
        shift += tf.cast(layer.beta, tf.float32)
    if not _learns(layer):
        scale, shift = tf.stop_gradient(scale), tf.stop_gradient(shift)
    return scale, shift


def _learns(layer):
    """Whether a BatchNorm layer trains: the layer, or only its scale and
    offset (LoRA's `--lora-train norms`, which keeps its statistics frozen)."""
    return layer.trainable or any(w.trainable for w in (getattr(layer, "gamma", None), getattr(layer, "beta", None))
                                  if w is not None)


def _training_batchnorm(layer, inputs):
    channels = inputs.shape[-1]
    gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    beta = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    empty = tf.constant([], tf.float32)
    outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=layer.epsilon, is_training=True)
    # The op's batch variance is Bessel-corrected; Keras averages the biased one.
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = variance * (count - 1) / tf.maximum(count, 1)
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1 - momentum))
    layer.moving_variance.assign(tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1 - momentum))
    return outputs
