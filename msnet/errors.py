"""The error every room raises for a mistake a person can fix (the ground floor: imports nothing)."""


class MsnetError(Exception):
    """An error a person can fix: its message is one line that names the fix.

    The command-line layer prints it without a traceback and exits with code 2.
    """
