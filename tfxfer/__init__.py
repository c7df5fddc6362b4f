"""tfxfer: transfer learning of image classifiers with TensorFlow/Keras."""

import os

# Quieter TensorFlow start-up for command-line users; an explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before anything loads TensorFlow: oneDNN is read once, at TensorFlow's import.
from tfxfer import runtime as _runtime  # noqa: E402

_runtime.enable_onednn()

from tfxfer.backbones import BackboneSpec, create_backbone, get_backbone, list_backbones, register_backbone  # noqa: E402
from tfxfer.config import FinetuneConfig, PretrainConfig, StudyConfig, load_config  # noqa: E402
from tfxfer.data import DatasetInfo, load_dataset  # noqa: E402
from tfxfer.errors import TfxferError  # noqa: E402
from tfxfer.evaluation import classification_report  # noqa: E402
from tfxfer.export import export_saved_model  # noqa: E402
from tfxfer.freezing import apply_freeze, parse_freeze  # noqa: E402
from tfxfer.model import TransferModel, build_model  # noqa: E402
from tfxfer.penalties import L2SP  # noqa: E402
from tfxfer.pretraining import pretrain  # noqa: E402
from tfxfer.study import study  # noqa: E402
from tfxfer.training import finetune  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "DatasetInfo",
    "FinetuneConfig",
    "L2SP",
    "PretrainConfig",
    "StudyConfig",
    "TfxferError",
    "TransferModel",
    "apply_freeze",
    "build_model",
    "classification_report",
    "create_backbone",
    "export_saved_model",
    "finetune",
    "get_backbone",
    "list_backbones",
    "load_config",
    "load_dataset",
    "parse_freeze",
    "pretrain",
    "register_backbone",
    "study",
]
