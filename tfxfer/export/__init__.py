"""Export a run's model for serving: one file per format, a small registry.

    saved_model  TF Serving layout, two signatures, resize and decode inside
    onnx         ONNX (through Keras's `model.export`, which uses tf2onnx)
    litert       LiteRT / TFLite flatbuffer (Keras's `model.export`)

Every format takes raw uint8 pixels and has the backbone's preprocessing
inside; ONNX and LiteRT take images already at the model's size, because
neither runtime has the antialiased resize the training pipeline uses
(TF's `ScaleAndTranslate`): see `tfxfer.export.portable`.
"""

from tfxfer.export.registry import FORMATS, export_run, get_format
from tfxfer.export.layout import METADATA_FILE, next_version_dir, versions
from tfxfer.export.precision import EXPORT_PRECISIONS
from tfxfer.export.saved_model import export_saved_model
from tfxfer.export import litert, onnx  # noqa: E402, F401  (they register themselves)

__all__ = ["EXPORT_PRECISIONS", "FORMATS", "METADATA_FILE", "export_run", "export_saved_model", "get_format", "next_version_dir", "versions"]
