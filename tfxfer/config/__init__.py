"""Typed run configuration, in groups that `finetune` and `pretrain` share.

Each field is declared once, with its default, its help text and, where it names
a choice, the allowed values, which the module implementing the choice owns. The
CLI is generated from these fields (`tfxfer.cli.config_options`), YAML files in
`configs/` fill them, flags override them, and the resolved config is saved as
`config.yaml` in every run folder, in groups.

YAML may be flat (`lr: 0.01`) or grouped (`optim: {lr: 0.01}`): every option name
is unique across the groups of a command.

Configs are frozen once built, so one config can be run any number of times:
a run works on its own resolved copy (`CommandConfig.with_options`), and that
copy is the one its folder saves.

`tfxfer.config` is the public home of every name here; the modules behind it:

- `options`: how a field is declared (`option`) and how a command's groups are
  gathered (`CommandConfig`);
- `groups`: the groups the commands share, and the names a user can type;
- `commands`: the configs of `finetune`, `pretrain` and `study`;
- `loading`: `load_config` and `config_from_flat` (YAML, flags, checks).

None of them loads TensorFlow, so `tfxfer --help` needs none.
"""

from tfxfer.config.commands import (
    FinetuneConfig,
    PretextConfig,
    PretrainConfig,
    StudyConfig,
    StudyOptions,
    add_pretext_options,
    pretext_group,
)
from tfxfer.config.groups import (
    BN_MODES,
    DISTRIBUTE,
    EXPORT_FORMATS,
    MONITORS,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    SCOPES,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TransferConfig,
)
from tfxfer.config.loading import config_from_flat, load_config
from tfxfer.config.options import CommandConfig, expand_path, option

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TransferConfig",
    "OptimConfig",
    "RunConfig",
    "FinetuneConfig",
    "PretextConfig",
    "add_pretext_options",
    "pretext_group",
    "PretrainConfig",
    "StudyOptions",
    "StudyConfig",
    "load_config",
    "option",
    "expand_path",
]
