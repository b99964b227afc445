"""Exceptions shared by the reference and every backend (SPEC §1, §9).

Backends raise these same classes with the same messages, so a user's
``except`` clause works whichever framework is underneath.
"""


class PEERConfigError(ValueError):
    """A PEERConfig field has an invalid value or combination."""


class PEERInputError(ValueError):
    """An argument of forward/vjp (x, dy, mask, routing, params, state) is invalid."""


class PEERCheckpointError(ValueError):
    """A checkpoint does not fit its config or is malformed."""
