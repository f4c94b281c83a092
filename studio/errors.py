"""Errors the Studio API raises for the user to read."""


class StudioError(ValueError):
    """A user-facing error from the Studio API (bad input or a failed action); nothing was written."""
