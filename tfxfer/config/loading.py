"""Building a config from defaults, a YAML file and overrides: `load_config`
and `config_from_flat`, with the strategy and recipe expansion and the value
checks that name the key and what it takes."""

import dataclasses
import math

import yaml

from tfxfer.config.commands import FinetuneConfig
from tfxfer.config.groups import RECIPES
from tfxfer.config.options import expand_path, set_explicit
from tfxfer.errors import TfxferError, did_you_mean

__all__ = ["load_config", "config_from_flat"]


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
    set_explicit(config, explicit)
    return config.validate() if validate else config


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
