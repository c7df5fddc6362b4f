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
"""

import dataclasses
import functools
import math
import os
import typing
from typing import Optional

import yaml

from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.runtime import PRECISIONS

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

# The names a user can type, declared here so that `tfxfer --help` and the
# config need no TensorFlow; the modules that implement them import these.
MONITORS = ("val_accuracy", "val_loss", "val_macro_f1")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
SCOPES = ("kernels", "all")  # L2-SP: kernels (as the paper) or all weights
DISTRIBUTE = ("none", "mirrored", "multiworker")
BN_MODES = ("auto", "on", "off")  # --train-bn (tfxfer.freezing.resolve_train_bn)
# The formats `tfxfer.export` registers; the command names a wrong one before TensorFlow loads.
EXPORT_FORMATS = ("saved_model", "onnx", "litert")
# `--recipe NAME` fills the options the user left unset. `tuned` is the defaults
# below (SGD, lr 1e-2, cosine decay, no augmentation), which the recipe study of
# STUDIES.md picked over `classic` (SGD, lr 1e-3, constant), the defaults they replaced.
RECIPES = {
    "tuned": {},
    "classic": {"optimizer": "sgd", "lr": 1e-3, "schedule": "constant", "warmup_epochs": 0.0, "augment": "none",
                "lr_decay": 1.0, "ema": None},
}


def option(default, help, choices=None, auto=False, path=False):
    """A config field: its default, its help text and, for a name, the allowed
    names; with `auto`, a number field that also takes the word `auto`; with
    `path`, a file or folder, where `~` and `$VARIABLES` expand."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "auto": auto, "path": path})


def expand_path(path):
    """`~` and `$VARIABLES` (`${VARIABLES}`) of a path expanded, as a shell would."""
    return os.path.expandvars(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: Optional[str] = option(None, "Built-in dataset (digits) or a tensorflow-datasets name, e.g. cifar10.")
    data_dir: Optional[str] = option(
        None, "Image folder: one sub-folder per class, or train/ (training/) plus val/ (valid/, validation/, dev/) "
        "and/or test/ (testing/), in any case.", path=True
    )
    csv: Optional[str] = option(
        None, "CSV of labelled images: columns path and label, optionally split (train, val, test); paths relative "
        "to the CSV's folder; separated by commas, semicolons, tabs or |.", path=True
    )
    csv_path_column: str = option("path", "Column of the --csv that holds each image's path.")
    csv_label_column: str = option("label", "Column of the --csv that holds each image's label.")
    tfrecord: Optional[str] = option(
        None, "TFRecord files of tf.train.Example records, plain or GZIP: a GLOB of training files, or SPLIT=GLOB "
        "pairs separated by commas (train, val, test).", path=True
    )
    tfrecord_image_key: str = option("image", "Feature of a --tfrecord record that holds the encoded image.")
    tfrecord_label_key: str = option("label", "Feature of a --tfrecord record that holds the label (integer or string).")
    tfds_data_dir: Optional[str] = option(
        None, "Folder with prepared tensorflow-datasets data (the offline route).", path=True
    )
    tfds_manual_dir: Optional[str] = option(
        None, "Folder with the archives tensorflow-datasets would download for --dataset (for cifar10: "
        "cifar-10-binary.tar.gz), put there by hand; tfds prepares the dataset from them, checksums checked.", path=True
    )
    train_split: str = option("train", "tfds split to train on (slicing allowed, e.g. 'train[:50%]').")
    val_split: Optional[str] = option(None, "tfds validation split; default 'validation', else carved from train.")
    test_split: Optional[str] = option(None, "tfds test split; default 'test' when the dataset has one.")
    val_fraction: float = option(0.1, "Share of train carved out (per class) as validation when there is none.")
    classes: Optional[str] = option(None, "Comma-separated class names: use only these classes, in this order.")
    labels_per_class: Optional[int] = option(None, "Seeded, stratified sample of N labelled training images per class.")
    max_train_examples: Optional[int] = option(None, "Train on a seeded sample of this many images.")
    folds: Optional[int] = option(None, "K: validate on one fold of a seeded, stratified K-fold split of the labelled training images.")
    fold: int = option(0, "With --folds: which fold (0..K-1) is the validation set.")
    augment: str = option(
        "none", "Training augmentation: none, or NAME[:VALUE] items separated by commas from flip, crop[:pad share], "
        "rotate[:degrees], zoom[:share], color[:strength], randaugment[:strength], mixup[:alpha], cutmix[:alpha]; "
        "flip_crop = flip,crop. Keras layers in the tf.data pipeline, seeded."
    )
    allow_leaks: bool = option(
        False, "Go on when test images are also training images (the pre-flight's leak check stops the run "
        "otherwise); the leak is still reported and kept in metrics.json."
    )

    def validate(self):
        if sum(x is not None for x in (self.dataset, self.data_dir, self.csv, self.tfrecord)) != 1:
            raise TfxferError("Give exactly one of --dataset NAME, --data-dir FOLDER, --csv FILE or --tfrecord GLOB.")
        from tfxfer.data.augment import parse_augment  # where the augmentations are built

        parse_augment(self.augment)
        if not 0.0 < self.val_fraction < 1.0:
            raise TfxferError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        for key in ("labels_per_class", "max_train_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise TfxferError(f"{key} must be at least 1, got {getattr(self, key)}.")
        if self.folds is not None and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise TfxferError(f"--folds must be at least 2 and --fold in 0..folds-1, got folds {self.folds}, fold {self.fold}.")

    def source_name(self):
        if self.csv:
            return os.path.splitext(os.path.basename(self.csv))[0]
        if self.tfrecord:
            return "tfrecord"
        return self.dataset or os.path.basename(os.path.normpath(self.data_dir or "data"))

    def source(self):
        """The keyword arguments of `tfxfer.data.load_splits` that name the data."""
        return {"name": self.dataset, "data_dir": self.data_dir, "csv": self.csv, "tfrecord": self.tfrecord,
                "tfrecord_keys": (self.tfrecord_image_key, self.tfrecord_label_key),
                "tfds_manual_dir": self.tfds_manual_dir, "csv_columns": (self.csv_path_column, self.csv_label_column)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = option("resnet50", "Backbone name; see `tfxfer backbones`.")
    weights: str = option("imagenet", "imagenet, none, a weights file, or a pretrain/finetune run folder.", path=True)
    image_size: Optional[int] = option(None, "Square input size in pixels (default: the backbone's; 32 works).")
    bn_momentum: Optional[float] = option(None, "Momentum of BatchNorm moving averages (default: the backbone's).")

    def validate(self):
        if self.image_size is not None and self.image_size < 28:
            raise TfxferError(f"image_size must be at least 28, got {self.image_size}.")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum < 1.0:
            raise TfxferError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}.")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    recipe: str = option(
        "tuned", "How the training goes, for the options not given: tuned (the defaults, chosen by a study) or "
        "classic (SGD, lr 1e-3, constant, no augmentation).", tuple(RECIPES)
    )
    strategy: Optional[str] = option(
        None, "Named strategy: scratch, head, full, stages:N, lp-ft or l2sp@ALPHA, each with an optional +bn; it sets "
        "freeze, unfreeze, l2sp and train_bn (scratch also weights: none)."
    )
    freeze: str = option("full", "head, full, stages:N or from:LAYER.")
    unfreeze: Optional[str] = option(
        None, "Freeze schedule by epoch, e.g. head@0,full@5 or head@0,full@25% (LP-FT); its first policy replaces --freeze."
    )
    train_bn: str = option(
        "auto", "BatchNorm of the training part: auto (trains from random weights, frozen from pretrained ones), on "
        "(always trains) or off (always frozen, in inference mode). A bare --train-bn is on.", BN_MODES
    )
    dropout: float = option(0.0, "Dropout rate before the new head.")
    top_k: int = option(5, "Also report top-K accuracy (when K is below the number of classes).")
    calibrate: bool = option(
        False, "Temperature scaling: fit a temperature on the validation split after training and fold it into the "
        "head, so the exports serve calibrated probabilities (accuracy is unchanged)."
    )
    l2sp: float = option(0.0, "L2-SP alpha: pull the backbone toward its starting weights (Li et al. 2018).")
    l2sp_scope: str = option("kernels", "Weights L2-SP pulls: kernels (as the paper) or all.", SCOPES)
    head_l2: float = option(0.0, "Plain L2 beta on the new head's kernel.")
    backbone_lr_mult: float = option(1.0, "Backbone learning rate = lr * this, through its own optimizer.")
    lr_decay: float = option(
        1.0, "Layer-wise learning-rate decay D: the backbone stage k steps below the head trains at lr * D^k "
        "(one optimizer per stage; see tfxfer backbones for the stages). 1 turns it off."
    )
    ema: Optional[float] = option(
        None, "Weight EMA decay, e.g. 0.999: validation, the best epoch, the test metrics and the export use the "
        "moving average of the weights."
    )
    feature_cache: str = option(
        "auto", "While the backbone is frozen, train the head on features computed once: auto (when not augmenting), "
        "memory, a folder (kept across runs), or off.", path=True
    )
    label_smoothing: float = option(0.0, "Label smoothing epsilon of the cross-entropy (Szegedy et al. 2016).")
    class_weight: Optional[str] = option(
        None, "balanced: weigh each class's loss by n / (classes * n_class) of the training images.", ("balanced",)
    )
    monitor: str = option("val_accuracy", "Validation metric that picks the best epoch (and early stopping).", MONITORS)
    early_stopping: Optional[int] = option(None, "Stop after this many epochs without a better --monitor value.")

    def validate(self):
        from tfxfer.freezing import parse_freeze, parse_unfreeze

        parse_freeze(self.freeze)
        if self.unfreeze:
            parse_unfreeze(self.unfreeze)
        _at_least(self, ("l2sp", "head_l2", "dropout", "label_smoothing"), 0.0)
        if not self.dropout < 1.0:
            raise TfxferError(f"dropout must be below 1, got {self.dropout}.")
        if not self.label_smoothing < 1.0:
            raise TfxferError(f"label_smoothing must be below 1, got {self.label_smoothing}.")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise TfxferError(f"early_stopping must be at least 1 epoch, got {self.early_stopping}.")
        if not self.backbone_lr_mult > 0:
            raise TfxferError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}.")
        if self.ema is not None and not 0 < self.ema < 1:
            raise TfxferError(f"ema must be between 0 and 1, e.g. 0.999, got {self.ema}.")
        if not 0 < self.lr_decay <= 1:
            raise TfxferError(f"lr_decay must be above 0 and at most 1, got {self.lr_decay}.")
        if self.top_k < 1:
            raise TfxferError(f"top_k must be at least 1, got {self.top_k}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("sgd", "sgd (momentum 0.9), adam or adamw.", OPTIMIZERS)
    lr: float = option(
        1e-2, "Learning rate (of the head, when the backbone has its own); auto runs the range test of "
        "tfxfer lr-find first and records its suggestion in the run's config.", auto=True
    )
    weight_decay: float = option(0.0, "Optimizer weight decay; never on the backbone while L2-SP is on.")
    schedule: str = option("cosine", "Learning-rate schedule (cosine decays to 0 after --warmup-epochs).", SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear warmup length before the cosine decay.")
    epochs: int = option(5, "Number of epochs (--time-budget picks it instead).")
    time_budget: Optional[str] = option(None, "Training time, e.g. 90s, 20m, 1.5h: picks the epochs that fit.")
    batch_size: int = option(64, "Batch size.")

    def validate(self):
        _at_least(self, ("weight_decay", "warmup_epochs"), 0.0)
        for key in ("lr", "epochs", "batch_size"):
            if getattr(self, key) != "auto" and not getattr(self, key) > 0:
                raise TfxferError(f"{key} must be > 0, got {getattr(self, key)}.")
        if self.time_budget is not None:
            from tfxfer.budget import parse_duration

            parse_duration(self.time_budget)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = option(0, "Seeds Python, NumPy, TensorFlow, the data selection, order and augmentation.")
    deterministic: bool = option(False, "TF op determinism: identical histories on any device, at a cost (README).")
    precision: str = option("auto", "auto: bfloat16 where the hardware has it, else float32.", PRECISIONS)
    jit_compile: bool = option(False, "Compile the training step with XLA (measure first on CPU).")
    cpu_speedups: str = option("auto", "Training-time CPU speed-ups: auto (those measured to pay on this CPU kind), "
                               "force (all), off.", ("auto", "off", "force"))
    distribute: str = option("none", "none; mirrored: the GPUs of this machine; multiworker: the workers of TF_CONFIG (README).", DISTRIBUTE)
    tensorboard: bool = option(False, "Write TensorBoard logs to the run's tensorboard/ folder (scalars, L2-SP, learning rate, a batch of images).")
    tracking: Optional[str] = option(None, "Experiment tracker to log the run to: mlflow (or give --mlflow).", ("mlflow",))
    mlflow: Optional[str] = option(
        None, "Track the run in MLflow: a bare --mlflow logs to ./mlflow.db with artifacts in ./mlruns (open them "
        "with `mlflow ui` there), --mlflow URI to that tracking server or store, --mlflow FOLDER to a folder store.",
        path=True
    )
    run_name: Optional[str] = option(None, "Run folder name under --output-dir (default: from data, backbone and method).")
    output_dir: str = option("saved_models", "Where run folders go.", path=True)

    def __post_init__(self):
        if self.mlflow and self.tracking is None:
            # --mlflow URI alone asks for MLflow. Set while the group is built (frozen afterwards), so every
            # copy and every reader sees it, validated or not.
            object.__setattr__(self, "tracking", "mlflow")

    def validate(self):
        if self.jit_compile and self.deterministic:
            raise TfxferError(
                "--jit-compile needs --no-deterministic: Keras silently turns XLA off while TF op determinism is on."
            )


def _at_least(group, keys, low):
    for key in keys:
        value = getattr(group, key)
        if not value >= low:  # also catches NaN
            raise TfxferError(f"{key} must be >= {low:g}, got {value}.")


class CommandConfig:
    """A command's config: one attribute per group. Subclasses are dataclasses."""

    # Keys a resumed run may change: where it is, how many epochs it runs, and whether a leak stops it.
    # Not the time budget: a resumed run keeps the epochs its budget picked.
    RESUMABLE = ("epochs", "run_name", "output_dir", "allow_leaks", "cpu_speedups")

    def groups(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self):
        for group in self.groups().values():
            group.validate()
        for group in self.groups().values():
            for f in dataclasses.fields(group):
                choices = f.metadata.get("choices")
                choices = choices() if callable(choices) else choices
                value = getattr(group, f.name)
                if choices and value is not None and value not in choices:
                    raise did_you_mean(value, choices, f.name.replace("_", "-"))
        return self

    def to_dict(self):
        return {name: dataclasses.asdict(group) for name, group in self.groups().items()}

    def flat(self):
        """`{option: value}` over every group."""
        return {k: v for group in self.to_dict().values() for k, v in group.items()}

    @classmethod
    def fields(cls):
        """`{option: (group name, dataclasses.Field, type)}` for every option of the command."""
        out = {}
        for group in dataclasses.fields(cls):
            # The type of the default, not the annotation: the pretext group grows as methods register.
            group_type = type(group.default_factory())
            hints = typing.get_type_hints(group_type)
            for f in dataclasses.fields(group_type):
                assert f.name not in out, f"option {f.name} is in two groups"
                out[f.name] = (group.name, f, _plain_type(hints[f.name]))
        return out

    def with_options(self, **options):
        """A copy with `options` (by option name, in any group) changed; the
        options the user set (`explicit`) stay those of this config.

        Configs are frozen: what a run decides (its name, a pretrained source's
        backbone, `--lr auto`'s rate, the time budget's epochs) goes into a
        copy, never into the config its caller holds."""
        fields = self.fields()
        grouped = {}
        for key, value in options.items():
            if key not in fields:
                raise did_you_mean(key, fields, "config key")
            grouped.setdefault(fields[key][0], {})[key] = value
        copy = dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **values) for name, values in grouped.items()}
        )
        explicit = getattr(self, "explicit", None)
        if explicit is not None:
            _set_explicit(copy, explicit)
        return copy

    def explicit_options(self):
        """The options the user set: from `load_config`, else any non-default value."""
        explicit = getattr(self, "explicit", None)
        if explicit is not None:
            return set(explicit)
        defaults = type(self).defaults()
        return {k for k, v in self.flat().items() if v != defaults[k]}

    @classmethod
    def defaults(cls):
        """`{option: default}`: a command may change a group's defaults."""
        return cls().flat()


def _plain_type(hint):
    """`Optional[int]` -> `int`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


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
        return self

    def first_policy(self):
        """The freeze policy the run starts with: --freeze, or the first phase of --unfreeze."""
        from tfxfer.freezing import parse_freeze, parse_unfreeze

        if self.transfer.unfreeze:
            return parse_unfreeze(self.transfer.unfreeze)[0].policy
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
        "scratch,head,full,lp-ft,l2sp@0.01", "Comma-separated strategies (scratch, head, full, stages:N, lp-ft, l2sp@ALPHA, +bn)."
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
    OWNED = ("strategy", "freeze", "unfreeze", "l2sp", "train_bn", "seed", "fold", "run_name")

    def validate(self):
        super().validate()
        explicit = self.explicit_options() & set(self.OWNED)
        if explicit:
            key = sorted(explicit)[0]
            raise TfxferError(
                f"--{key.replace('_', '-')} is set by each run of a study (from --strategies, --seeds and --folds); drop it."
            )
        return self


def load_config(path=None, kind=FinetuneConfig, validate=True, **overrides):
    """Defaults, then the YAML file at `path`, then the non-`None` `overrides`.

    Returns a `kind` (default `FinetuneConfig`), validated unless `validate`
    is false (a config that only names a run to resume), whose `explicit`
    attribute names the options the file or the overrides set.
    """
    values = {}
    if path:
        values = _read_yaml(expand_path(path))
    values = _flatten(values, kind)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_flat(values, kind, validate)


def config_from_flat(values, kind=FinetuneConfig, validate=True):
    """A validated `kind` from `{option: value}`; unknown options get a "did you mean"."""
    fields = kind.fields()
    if values.get("strategy") and "strategy" in fields:
        values = _with_strategy(values, fields)
    explicit = frozenset(values)
    if "recipe" in fields and values.get("recipe") in RECIPES:
        values = {**RECIPES[values["recipe"]], **values}  # what was given (or a strategy set) wins
    grouped = {}
    for key, value in values.items():
        if key not in fields:
            raise did_you_mean(key, fields, "config key")
        group, field, type_ = fields[key]
        if value is None and field.default is not None:
            raise TfxferError(f"Config key {key} cannot be null; {_accepts(type_, field)}, e.g. {field.default!r}.")
        if field.metadata.get("auto") and str(value).strip().lower() == "auto":
            grouped.setdefault(group, {})[key] = "auto"
            continue
        try:
            value = _coerce(key, value, type_)
            grouped.setdefault(group, {})[key] = expand_path(value) if field.metadata.get("path") and value else value
        except TfxferError as e:
            if not field.metadata.get("auto"):
                raise
            raise TfxferError(str(e).replace(" must be a number,", " must be a number or auto,")) from None
    config = kind(**{g.name: dataclasses.replace(g.default_factory(), **grouped.get(g.name, {})) for g in dataclasses.fields(kind)})
    _set_explicit(config, explicit)
    return config.validate() if validate else config


def _set_explicit(config, explicit):
    """Record on `config` the options the user set: not a field (it is neither
    saved nor compared), and written once, while the config is being built."""
    object.__setattr__(config, "explicit", explicit)


def _with_strategy(values, fields):
    """`values` plus the options its `strategy` sets; setting one of them to
    something else as well is a conflict."""
    from tfxfer.strategies import expand

    values = dict(values)
    def plain(key, value):  # a value as the config holds it; `auto` stays a word
        if fields[key][1].metadata.get("auto") and str(value).strip().lower() == "auto":
            return "auto"
        return _coerce(key, value, fields[key][2])

    for key, value in expand(values["strategy"]).items():
        if values.get(key) is not None and plain(key, values[key]) != plain(key, value):
            raise TfxferError(
                f"--{key.replace('_', '-')} {values[key]} conflicts with --strategy {values['strategy']}, "
                f"which sets it to {value}; drop one of them."
            )
        values[key] = value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error, not the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path):
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise TfxferError(f"Config file {path!r} does not exist.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "it is not valid YAML"
        raise TfxferError(f"Config file {path!r} has a YAML error{where}: {problem}.") from None
    if not isinstance(values, dict):
        raise TfxferError(f"Config file {path!r} must hold a mapping of keys to values.")
    return values


def _flatten(values, kind):
    """Accept grouped YAML (`optim: {lr: 0.1}`) as well as flat; `-` as `_`."""
    groups = {f.name for f in dataclasses.fields(kind)}
    flat = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in groups and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _accepts(type_, field):
    """What a field accepts, in words."""
    choices = field.metadata.get("choices")
    if choices and not callable(choices):
        return "it takes one of " + ", ".join(map(str, choices))
    return "it takes " + {bool: "true or false", int: "a whole number", float: "a number"}.get(type_, "text")


def _coerce(key, value, type_):
    if value is None:
        return None
    if type_ is bool:
        if not isinstance(value, bool):
            raise TfxferError(f"Config key {key} must be true or false, got {value!r}.")
        return value
    if type_ is str:
        if isinstance(value, bool):  # YAML reads on/off/yes/no as booleans: `train_bn: true` is on
            return "on" if value else "off"
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if isinstance(value, bool) or (type_ is int and isinstance(value, float) and not value.is_integer()):
        what = {int: "a whole number", float: "a number"}[type_]
        raise TfxferError(f"Config key {key} must be {what}, got {value!r}.")
    try:
        number = type_(value)
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number"}.get(type_, "text")
        raise TfxferError(f"Config key {key} must be {what}, got {value!r}.") from None
    if isinstance(number, float) and math.isnan(number):
        raise TfxferError(f"Config key {key} must be a number, got NaN.")
    return number
