"""The one exception a user can cause and fix."""


class UserError(Exception):
    """Bad input, missing data, a refused archive: printed as one message, exit code 2."""

    exit_code = 2
