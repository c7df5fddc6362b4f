"""Named fine-tuning strategies, each a shorthand for ordinary finetune options.

    scratch      the same backbone from random initialization (BatchNorm trains)
    head         feature extraction: the backbone is frozen
    full         every backbone layer trains
    stages:N     the last N stages train
    lp-ft        a linear probe for the first quarter of the epochs, then full
                 fine-tuning (Kumar et al., ICLR 2022): `--unfreeze head@0,full@25%`
    l2sp@ALPHA   full fine-tuning with the L2-SP pull toward the starting weights
    lora:RANK    low-rank adapters of RANK on the registry's target layers; the
                 backbone's own weights stay as loaded (`tfxfer.lora`)
    knn          no training: cosine k-NN votes over the training features
                 (`tfxfer.probes`; `+knn_k=`, `+knn_temperature=`)
    linear       no training of the backbone: logistic regression on its
                 features, the L2 strength chosen on the validation split

Any of them may end in `+bn`: BatchNorm statistics and parameters train too,
and in `+OPTION=VALUE` suffixes that set one of the recipe's options (`RECIPE`)
for that strategy alone, e.g. `full+lr=0.01+schedule=cosine+ema=0.999`: a
study of recipes is a study of strategies.

`expand` gives the options; `FinetuneConfig(strategy=...)`, `--strategy` and
`tfxfer study --strategies` all go through it, and a study prints each run's
options as a plain `tfxfer finetune` command, so any run can be repeated alone.
"""

import shlex

from tfxfer.errors import TfxferError, did_you_mean

__all__ = ["BASES", "LP_FT_SCHEDULE", "expand", "parse_strategies", "command_line"]

BASES = ("scratch", "head", "full", "stages:N", "lp-ft", "l2sp@ALPHA", "lora:RANK", "knn", "linear")
# The options a `+OPTION=VALUE` suffix may set: how the training goes, not what it trains.
RECIPE = ("lr", "schedule", "warmup_epochs", "optimizer", "weight_decay", "augment", "lr_decay", "ema",
          "backbone_lr_mult", "dropout", "label_smoothing", "lora_alpha", "lora_targets", "lora_train",
          "knn_k", "knn_temperature", "knn_bank")
LP_FT_SCHEDULE = "head@0,full@25%"

# Every option a strategy sets, so a strategy fully decides them (nothing leaks
# from the study's shared options into one strategy and not another).
_NEUTRAL = {"freeze": "full", "unfreeze": None, "l2sp": 0.0, "train_bn": "off", "lora": None, "probe": None}


def expand(strategy):
    """The finetune options of a strategy name: `{option: value}`.

    `weights` appears only for `scratch` (`"none"`); the others keep the
    run's weights.
    """
    name = str(strategy).strip()
    base, *suffixes = name.split("+")
    options = dict(_NEUTRAL, train_bn="off")
    for suffix in suffixes:
        key, equals, value = suffix.partition("=")
        if suffix == "bn":
            options["train_bn"] = "on"
        elif equals and key.replace("-", "_") in RECIPE and value:
            options[key.replace("-", "_")] = _number_or_text(value)
        else:
            raise TfxferError(f"Strategy {name!r} has the suffix {'+' + suffix!r}; a suffix is +bn or "
                              f"+OPTION=VALUE with OPTION one of {', '.join(RECIPE)}.")
    if base == "scratch":
        # Random BatchNorm statistics are worthless: from scratch, BN always trains.
        options.update(weights="none", train_bn="on")
    elif base in ("head", "full"):
        options["freeze"] = base
    elif base in ("knn", "linear"):
        options.update(probe=base, freeze="head")
    elif base.startswith("stages:") and base[7:].isdigit() and int(base[7:]) > 0:
        options["freeze"] = base
    elif base == "lp-ft":
        options.update(freeze="head", unfreeze=LP_FT_SCHEDULE)
    elif base.startswith("l2sp@"):
        try:
            alpha = float(base[5:])
        except ValueError:
            alpha = float("nan")
        if not alpha > 0:
            raise TfxferError(f"Strategy {name!r} needs a positive number after l2sp@, e.g. l2sp@0.01.")
        options["l2sp"] = alpha
    elif base.startswith("lora:"):
        if not base[5:].isdigit() or int(base[5:]) < 1:
            raise TfxferError(f"Strategy {name!r} needs a whole rank of at least 1 after lora:, e.g. lora:8.")
        options.update(lora=int(base[5:]), freeze="lora")
    else:
        raise did_you_mean(base, ("scratch", "head", "full", "stages:2", "lp-ft", "l2sp@0.01", "lora:8", "knn",
                                 "linear"), "strategy")
    return options


def _number_or_text(value):
    try:
        return float(value)
    except ValueError:
        return value


def parse_strategies(text):
    """`"scratch,full,l2sp@0.01"` (or a list) -> the names, each checked, no repeats.

    A value may hold commas of its own (`full+augment=flip,crop`): a piece that
    does not begin with a strategy continues the `+OPTION=VALUE` before it."""
    names = []
    for piece in (text.split(",") if isinstance(text, str) else text):
        piece = str(piece).strip()
        if not piece:
            continue
        if names and "=" in names[-1].rpartition("+")[2] and not _starts_a_strategy(piece):
            names[-1] += "," + piece
        else:
            names.append(piece)
    if not names:
        raise TfxferError("Give at least one strategy, e.g. --strategies scratch,full,l2sp@0.01.")
    for name in names:
        expand(name)
    if len(set(names)) != len(names):
        raise TfxferError(f"Strategy list {','.join(names)!r} names one strategy twice.")
    return names


def _starts_a_strategy(piece):
    base = piece.partition("+")[0]
    return base in ("scratch", "head", "full", "lp-ft", "knn", "linear") or base.startswith(("stages:", "l2sp@", "lora:"))


def command_line(flat, defaults, command="finetune"):
    """`tfxfer finetune --opt value ...` for the options of `flat` that differ from `defaults`."""
    parts = ["tfxfer", command]
    for key, value in flat.items():
        if value == defaults.get(key) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)
