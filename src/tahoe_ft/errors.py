"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: what is wrong, where, and how to fix it.

    The CLI catches it, prints ``error: <message>`` on one line and exits with status 2,
    without a traceback (set ``HYDRA_FULL_ERROR=1`` or ``TAHOE_FT_DEBUG=1`` to see one).
    """
