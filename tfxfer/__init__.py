"""tfxfer: transfer learning of image classifiers with TensorFlow/Keras.

`import tfxfer` loads TensorFlow and the modules that register tfxfer's Keras
classes (`TransferModel`, its losses and metrics, the pretext models) for
`keras.models.load_model`; every other public name loads when first used. The
`tfxfer` command loads only what a command needs, so `tfxfer --help` and shell
completion answer without TensorFlow.
"""

import importlib
import importlib.metadata
import os
import sys

# Before anything loads TensorFlow: oneDNN and the C++ log level are read once,
# at TensorFlow's import; an explicit setting of either wins.
from tfxfer import runtime as _runtime  # noqa: E402

_runtime.quiet_logging()
_runtime.enable_onednn()

__version__ = importlib.metadata.version("tfxfer")

# Public name -> the module that defines it.
_PUBLIC = {
    "BackboneSpec": "tfxfer.backbones",
    "create_backbone": "tfxfer.backbones",
    "get_backbone": "tfxfer.backbones",
    "list_backbones": "tfxfer.backbones",
    "register_backbone": "tfxfer.backbones",
    "FinetuneConfig": "tfxfer.config",
    "PretrainConfig": "tfxfer.config",
    "StudyConfig": "tfxfer.config",
    "load_config": "tfxfer.config",
    "DatasetInfo": "tfxfer.data",
    "load_dataset": "tfxfer.data",
    "TfxferError": "tfxfer.errors",
    "classification_report": "tfxfer.evaluation",
    "export_saved_model": "tfxfer.export",
    "apply_freeze": "tfxfer.freezing",
    "parse_freeze": "tfxfer.freezing",
    "TransferModel": "tfxfer.model",
    "build_model": "tfxfer.model",
    "L2SP": "tfxfer.penalties",
    "pretrain": "tfxfer.pretraining",
    "study": "tfxfer.studies",
    "finetune": "tfxfer.training",
    "set_precision": "tfxfer.runtime",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfxfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def _run_as_command():
    # `python -m tfxfer` imports this package while sys.argv[0] is still "-m".
    return bool(sys.argv) and (os.path.basename(sys.argv[0]) in ("tfxfer", "tfxfer.exe") or sys.argv[0] == "-m")


# The modules whose Keras classes `keras.models.load_model` must find once
# `import tfxfer` has run; every other name loads when first used.
_KERAS_CLASSES = ("tfxfer.model", "tfxfer.losses", "tfxfer.metrics", "tfxfer.feature_cache", "tfxfer.pretext.simclr",
                  "tfxfer.pretext.autoencoder")

if not _run_as_command():
    _runtime.load_tensorflow_quietly()  # without TensorFlow's start-up lines, as the command does
    for _module in _KERAS_CLASSES:
        importlib.import_module(_module)
