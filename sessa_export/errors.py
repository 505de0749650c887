"""One exception type for problems the user can fix: the CLI prints its message and exits 2."""


class SessaExportError(Exception):
    """Bad input or an unmet requirement, with a message that says what to do."""
