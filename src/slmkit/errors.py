"""User-facing errors: one clear line, exit status 2, no traceback."""


class SlmError(Exception):
    """A problem with the user's input (path, file, config, data). The CLI prints it as one line and exits 2."""


def require(condition: bool, message: str) -> None:
    """Raise SlmError(message) unless condition holds."""
    if not condition:
        raise SlmError(message)
