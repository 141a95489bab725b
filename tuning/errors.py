"""The one exception user-facing commands raise for bad input."""


class UsageError(Exception):
    """Bad input or an unusable node. The message is one line: the problem, then the fix.

    The CLI prints it as ``tune-moe: error: <message>`` and exits with status 2,
    before anything is written.
    """

    exit_code = 2
