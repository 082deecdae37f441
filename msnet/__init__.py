"""msnet: deep residual networks read as discretised ODEs.

The numerical core lives in :mod:`msnet.core` (no Hydra, no file I/O); the
command line in :mod:`msnet.cli`.
"""

__version__ = "0.1.0"


class MsnetError(Exception):
    """An error a person can fix: its message is one line that names the fix.

    The command-line layer prints it without a traceback and exits with code 2.
    """
