"""LiteRT (TFLite) export, through Keras's own `model.export(format="litert")`,
checked with the LiteRT interpreter (`ai-edge-litert`). Needs
`pip install 'tfxfer[litert]'` for the check and for serving."""

import os

from tfxfer.errors import TfxferError
from tfxfer.export.portable import INPUTS, uint8_model
from tfxfer.export.registry import ExportFormat, register_format

__all__ = ["write_litert", "predict_litert"]


def write_litert(model, folder, class_names):
    path = os.path.join(folder, "model.tflite")
    uint8_model(model).export(path, format="litert", verbose=False)
    return path


def predict_litert(path, images):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise TfxferError("Checking a LiteRT export needs its interpreter: pip install 'tfxfer[litert]'.") from None
    interpreter = Interpreter(model_path=path)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


register_format(ExportFormat("litert", write_litert, predict_litert, folder="litert", inputs=INPUTS))
