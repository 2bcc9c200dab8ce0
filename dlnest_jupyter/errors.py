"""The one exception type users see: its message is a single line that says what to fix."""


class DLNestError(Exception):
    """Bad input or an unusable project/package. Shown as one line, never as a traceback."""
