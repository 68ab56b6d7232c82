"""The one exception type users see: a single line saying what, where, and what to do."""


class RetmaskError(Exception):
    """Bad input or environment; the CLI prints it as one line and exits non-zero."""
