"""Storage exceptions. Messages are written for the end user (they are shown in the UI as they are)."""


class StorageError(Exception):
    """Any storage failure: the file is locked, not a DuckDB file, a write was not saved, the store is closed..."""


class NotFound(StorageError, LookupError):
    """A referenced row (completion, prompt, run, ...) does not exist."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message; keep it plain
        return str(self.args[0]) if self.args else ""


class InvalidInput(StorageError, ValueError):
    """The caller passed a value the schema does not accept (bad stars, empty prompt, bad file line...)."""


RESTORE_ADVICE = ("Restore the file from a backup (Studio.backup / Store.backup write one), or start with a different "
                  "--db path; keep the damaged file for recovery.")


def short(msg: object, limit: int = 300) -> str:
    """A database message on one line, cut to `limit` characters (for messages shown to the user)."""
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
