"""ONNX export, through Keras's own `model.export(format="onnx")` (tf2onnx),
checked with ONNX Runtime. Needs `pip install 'tfxfer[onnx]'`."""

import os

from tfxfer.errors import TfxferError
from tfxfer.export.portable import INPUTS, uint8_model
from tfxfer.export.registry import ExportFormat, register_format

__all__ = ["write_onnx", "predict_onnx"]

NEEDS = "ONNX export needs tf2onnx and onnxruntime: pip install 'tfxfer[onnx]'."


def write_onnx(model, folder, class_names):
    try:
        import onnx
        import tf2onnx  # noqa: F401  (Keras's exporter imports it)
    except ImportError:
        raise TfxferError(NEEDS) from None
    path = os.path.join(folder, "model.onnx")
    uint8_model(model).export(path, format="onnx", verbose=False)
    # The class names travel inside the file too, as ONNX metadata.
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "class_names", ",".join(class_names)
    onnx.save(proto, path)
    return path


def predict_onnx(path, images):
    try:
        import onnxruntime
    except ImportError:
        raise TfxferError(NEEDS) from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


register_format(ExportFormat("onnx", write_onnx, predict_onnx, folder="onnx", inputs=INPUTS))
