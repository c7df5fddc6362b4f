"""LiteRT (TFLite) export, through Keras's own `model.export(format="litert")`,
checked with the LiteRT interpreter (`ai-edge-litert`). Needs
`pip install 'tfxfer[litert]'` for the check and for serving."""

import os

from tfxfer.errors import TfxferError
from tfxfer.export.portable import INPUTS, uint8_model
from tfxfer.export.registry import ExportFormat, register_format

__all__ = ["QUANTIZE", "write_litert", "predict_litert"]


QUANTIZE = ("int8", "dynamic")


def write_litert(model, folder, class_names, quantize=None, calibration=None):
    """`model.tflite` in `folder`: float32; with `quantize="dynamic"`, int8
    weights (activations stay float); with `"int8"`, full-integer kernels,
    their activation ranges calibrated on `calibration` (uint8 images), and
    still uint8 pixels in and float32 probabilities out."""
    import tensorflow as tf

    path = os.path.join(folder, "model.tflite")
    options = {}
    if quantize is not None:
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        if calibration is None or not len(calibration):
            raise TfxferError("int8 quantization needs calibration images; the run's training images were not found.")

        def representative():
            for image in calibration:
                yield [image[None]]

        options.update(representative_dataset=representative, inference_input_type=tf.uint8,
                       inference_output_type=tf.float32, target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]})
    # Keras passes these to TF's LiteRT converter as its attributes.
    uint8_model(model).export(path, format="litert", verbose=False, **options)
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


register_format(ExportFormat("litert", write_litert, predict_litert, folder="litert", inputs=INPUTS, file="model.tflite"))
