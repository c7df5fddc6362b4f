"""The configs of the commands: `FinetuneConfig`, `PretrainConfig` (with the
`pretext` group that registered pretext methods extend) and `StudyConfig`."""

import dataclasses
import functools
from typing import Optional

from tfxfer.config.groups import DataConfig, ModelConfig, OptimConfig, RunConfig, TransferConfig
from tfxfer.config.options import CommandConfig, option
from tfxfer.errors import TfxferError

__all__ = [
    "FinetuneConfig", "PretextConfig", "add_pretext_options", "pretext_group", "PretrainConfig", "StudyOptions",
    "StudyConfig",
]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(CommandConfig):
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    COMMAND = "finetune"

    def validate(self):
        super().validate()
        if self.transfer.unfreeze and "freeze" in self.explicit_options():
            first = str(self.first_policy())
            if str(self.transfer.freeze) != first:
                raise TfxferError(
                    f"--freeze {self.transfer.freeze} conflicts with --unfreeze {self.transfer.unfreeze}, whose first "
                    f"phase is {first}; drop --freeze."
                )
        if self.run.distribute != "none" and self.transfer.ema is not None:
            raise TfxferError("--ema is not available with --distribute yet; drop one of them.")
        if self.transfer.probe and "freeze" in self.explicit_options() and self.transfer.freeze != "head":
            raise TfxferError(f"--probe {self.transfer.probe} keeps the backbone frozen; drop --freeze "
                              f"{self.transfer.freeze}.")
        if self.transfer.probe and self.run.distribute != "none":
            raise TfxferError(f"--probe {self.transfer.probe} runs in one process; drop --distribute.")
        if (self.transfer.lora is not None and "freeze" in self.explicit_options()
                and self.transfer.freeze not in ("head", "lora")):
            raise TfxferError(f"--lora decides what trains (the adapters and the head); drop --freeze "
                              f"{self.transfer.freeze}.")
        return self

    def first_policy(self):
        """The freeze policy the run starts with: --freeze, or the first phase of --unfreeze."""
        from tfxfer.freezing import parse_freeze, parse_unfreeze  # here, not at the top: it loads TensorFlow

        if self.transfer.unfreeze:
            return parse_unfreeze(self.transfer.unfreeze)[0].policy
        if self.transfer.lora is not None:  # the adapters train from the start; the backbone's own weights stay
            return parse_freeze("lora")
        if self.transfer.probe:  # the backbone's own weights stay frozen
            return parse_freeze("head")
        return parse_freeze(self.transfer.freeze)


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    """The `pretext` group of `PretrainConfig`: the method, then the options
    that each registered method declares (`pretext_group`)."""

    # Checked by the pretext registry (`tfxfer.pretext.get_method`), which users add to.
    method: str = option("supervised", "Pretext task: supervised, simclr, autoencoder or a registered one.")

    def validate(self):
        # Each method's options check themselves (the merged class's bases).
        for options in type(self).__mro__[1:]:
            if options is not PretextConfig and dataclasses.is_dataclass(options) and "validate" in vars(options):
                options.validate(self)


# The options dataclasses of the registered pretext methods, in order of registration.
_PRETEXT_OPTIONS = []


def add_pretext_options(options):
    """Make the fields of the dataclass `options` part of the `pretext` group
    (`tfxfer.pretext.register_method` calls this for each method)."""
    if options in _PRETEXT_OPTIONS:
        return
    taken = set(PretrainConfig.fields())  # option names are unique across the groups of a command
    clash = sorted(taken & {f.name for f in dataclasses.fields(options)})
    if clash:
        raise ValueError(f"Pretext option {clash[0]!r} of {options.__name__} is already an option of tfxfer.")
    _PRETEXT_OPTIONS.append(options)


def pretext_group():
    """`PretextConfig` with the options of every registered method: one group,
    so YAML, flags and `config.pretext.NAME` reach them as before."""
    return _merged_pretext(tuple(_PRETEXT_OPTIONS))


@functools.lru_cache(maxsize=None)
def _merged_pretext(options):
    if not options:
        return PretextConfig
    # A dataclass's fields come base first: `method` ends up first.
    # `validate` is PretextConfig's, which calls every method's; the first base's would shadow it.
    # Frozen like every group; a method's own options dataclass may be frozen or not (a frozen class may
    # have plain dataclass bases as long as one base is frozen: PretextConfig).
    return dataclasses.make_dataclass("PretextConfig", [], bases=(*reversed(options), PretextConfig),
                                      namespace={"validate": PretextConfig.validate}, frozen=True)


@dataclasses.dataclass(frozen=True)
class PretrainConfig(CommandConfig):
    # From scratch, on small images: resnet9, weak augmentation, SGD with a cosine schedule.
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(augment="flip_crop"))
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(backbone="resnet9", weights="none"))
    pretext: PretextConfig = dataclasses.field(default_factory=lambda: pretext_group()())
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=0.05, schedule="cosine", warmup_epochs=1.0, weight_decay=5e-4, batch_size=128, epochs=20)
    )
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    COMMAND = "pretrain"

    def validate(self):
        if self.optim.lr == "auto":
            raise TfxferError("--lr auto is for finetune (its range test fits a classifier); give pretrain a number.")
        return super().validate()


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    strategies: str = option(
        "scratch,head,full,lp-ft,l2sp@0.01", "Comma-separated strategies (scratch, head, full, stages:N, lp-ft, l2sp@ALPHA, lora:RANK, +bn)."
    )
    seeds: str = option("0,1,2", "Comma-separated seeds; each varies the labelled sample, the head's initialization and the data order.")
    name: Optional[str] = option(None, "Study folder under --output-dir (default: <data>-<backbone>).")
    keep_exports: str = option(
        "best", "SavedModels to keep: best (per strategy, the run best on validation) or all.", ("best", "all")
    )

    def validate(self):
        from tfxfer.strategies import parse_strategies

        parse_strategies(self.strategies)
        self.seed_list()

    def seed_list(self):
        try:
            seeds = [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise TfxferError(f"--seeds must be whole numbers separated by commas, got {self.seeds!r}.") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise TfxferError(f"--seeds must name at least one seed, none twice, got {self.seeds!r}.")
        return seeds


# A run's option that one strategy may still set, with an example of how.
_ONE_STRATEGY = {"lor": "lora:8+lora_alpha=16", "knn": "knn+knn_k=10"}


@dataclasses.dataclass(frozen=True)
class StudyConfig(CommandConfig):
    """A study: every strategy x seed (x fold) as an ordinary finetune run, with
    the options of `FinetuneConfig` shared by all runs, except the ones each
    run sets (`OWNED`)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(output_dir="studies"))
    study: StudyOptions = dataclasses.field(default_factory=StudyOptions)

    COMMAND = "study"
    # Options each run sets: from its strategy, seed and fold, and its own folder.
    OWNED = ("strategy", "freeze", "unfreeze", "l2sp", "train_bn", "seed", "fold", "run_name", "lora", "lora_alpha",
             "lora_targets", "lora_train", "probe", "knn_k", "knn_temperature", "knn_bank")

    def validate(self):
        # First: a group's own checks would otherwise name a run's option as if the study's were wrong.
        explicit = self.explicit_options() & set(self.OWNED)
        if explicit:
            key = sorted(explicit)[0]
            raise TfxferError(
                f"--{key.replace('_', '-')} is set by each run of a study (from --strategies, --seeds and --folds); drop "
                "it" + (f", or give it to one strategy, e.g. {_ONE_STRATEGY[key[:3]]}." if key[:3] in _ONE_STRATEGY else ".")
            )
        return super().validate()
