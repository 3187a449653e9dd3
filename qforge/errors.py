"""The one exception type qforge raises for bad input; the CLI prints its message, not a traceback."""


class QForgeError(Exception):
    """A user-facing error: bad path, corrupt file, unsupported architecture, impossible settings."""
