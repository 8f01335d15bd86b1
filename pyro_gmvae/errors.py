"""Errors that mean "the user asked for something that cannot work".

The CLI prints these as one line and exits non-zero; everything else is a bug and keeps
its traceback.
"""


class UserInputError(ValueError):
    """Bad input: the message names the problem and the fix."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""
