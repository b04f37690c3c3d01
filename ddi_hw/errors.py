"""One exception type for bad user input: the CLI prints its message on one line and exits 2.

It is defined in `energy_models.errors` (the lower package, which must not import `ddi_hw`) and
re-exported here, so errors raised by the profiler and by `ddi_hw` are one and the same type.
"""
from energy_models.errors import UserError

__all__ = ["UserError"]
