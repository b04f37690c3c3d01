"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (file, flag, preset, data). The message names the problem and the fix."""
