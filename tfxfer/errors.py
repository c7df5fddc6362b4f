"""The one exception type a user can cause, and the "did you mean" helper."""

import difflib


class TfxferError(Exception):
    """A mistake the user can fix; the CLI prints its message as one sentence."""


def did_you_mean(name, choices, what):
    """Return a one-sentence error for an unknown `name`, naming close matches."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "choose one of: " + ", ".join(choices) + "."
    return TfxferError(f"Unknown {what} {name!r}; {hint}")
