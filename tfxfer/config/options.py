"""How a config field is declared (`option`) and how a command's groups are
gathered into one config (`CommandConfig`)."""

import dataclasses
import os
import typing

from tfxfer.errors import did_you_mean

__all__ = ["option", "expand_path", "CommandConfig"]


def option(default, help, choices=None, auto=False, path=False):
    """A config field: its default, its help text and, for a name, the allowed
    names; with `auto`, a number field that also takes the word `auto`; with
    `path`, a file or folder, where `~` and `$VARIABLES` expand."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "auto": auto, "path": path})


def expand_path(path):
    """`~` and `$VARIABLES` (`${VARIABLES}`) of a path expanded, as a shell would."""
    return os.path.expandvars(os.path.expanduser(path))


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
            set_explicit(copy, explicit)
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


def set_explicit(config, explicit):
    """Record on `config` the options the user set: not a field (it is neither
    saved nor compared), and written once, while the config is being built."""
    object.__setattr__(config, "explicit", explicit)
