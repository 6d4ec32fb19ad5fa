"""Errors a user causes (bad config, missing data, unknown model): reported in one line, exit 2."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints ``error: <message>`` and exits with 2.

    Raised before any work starts, so existing results are never touched.
    """

    exit_code = 2
