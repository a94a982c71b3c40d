"""The base of every error a user can fix: the CLI prints these as one message, no traceback."""


class VisiontuneError(Exception):
    """Bad input or configuration; the message names the file, the field and the fix."""
