"""The one exception type the CLI turns into a single readable error line."""


class UserFacingError(Exception):
    """A problem the operator can fix (bad input, missing data, failed gate).

    The CLI prints ``error: <message>`` and exits non-zero instead of a traceback,
    so the message must name the problem and, where it helps, what to do about it.
    """
