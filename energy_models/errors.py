"""The one exception type for bad user input, in the lower of the two packages.

`energy_models` imports nothing from `ddi_hw`; `ddi_hw.errors` re-exports this class as
`ddi_hw.errors.UserError`, so a bad preset, shape or cache folder raised here is caught by the
same `except UserError` as every `ddi_hw` error: the CLI prints its message on one line, exit 2.
"""


class UserError(Exception):
    """Bad input from the user (file, flag, preset, data). The message names the problem and the fix."""
