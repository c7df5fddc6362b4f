"""ONNX export through tf2onnx, checked with ONNX Runtime. Needs `pip install 'tfxfer[onnx]'`."""

import os

import numpy as np

from tfxfer.errors import TfxferError
from tfxfer.export.portable import INPUTS, uint8_model
from tfxfer.export.registry import ExportFormat, register_format

__all__ = ["write_onnx", "predict_onnx"]

NEEDS = "ONNX export needs tf2onnx and onnxruntime: pip install 'tfxfer[onnx]'."


def write_onnx(model, folder, class_names):
    """Convert with tf2onnx's `from_function`, as Keras's own ONNX export does,
    with two additions: TF's `Erfc` (the exact GELU of the transformer
    backbones) becomes 1 - Erf, and tensors the traced function captures
    (KerasHub's position ids) become constants of the ONNX graph, where
    tf2onnx would leave them as inputs that no client can feed."""
    try:
        import onnx
        import tf2onnx
    except ImportError:
        raise TfxferError(NEEDS) from None
    import tensorflow as tf

    path = os.path.join(folder, "model.onnx")
    wrapped = uint8_model(model)
    spec = tf.TensorSpec(wrapped.input.shape, tf.uint8, name="images")
    function = tf.function(lambda images: wrapped(images, training=False))
    concrete = function.get_concrete_function(spec)
    captured = concrete.inputs[len(concrete.inputs) - len(concrete.captured_inputs):]
    constants = {placeholder.name: value for placeholder, value in zip(captured, concrete.captured_inputs)
                 if value.dtype != tf.resource}
    proto, _ = tf2onnx.convert.from_function(function, [spec], custom_op_handlers={"Erfc": (_erfc, [])})
    for graph_input in list(proto.graph.input):
        if graph_input.name in constants:
            proto.graph.input.remove(graph_input)
            proto.graph.initializer.append(onnx.numpy_helper.from_array(
                np.asarray(constants[graph_input.name]), graph_input.name))
    # The class names travel inside the file too, as ONNX metadata.
    entry = proto.metadata_props.add()
    entry.key, entry.value = "class_names", ",".join(class_names)
    onnx.save(proto, path)
    return path


def _erfc(ctx, node, name, args):
    """erfc(x) = 1 - erf(x), with ONNX's Erf (opset 9)."""
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name("one"), np.array(1, dtype=dtype))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name)
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def predict_onnx(path, images):
    try:
        import onnxruntime
    except ImportError:
        raise TfxferError(NEEDS) from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


register_format(ExportFormat("onnx", write_onnx, predict_onnx, folder="onnx", inputs=INPUTS, file="model.onnx"))
