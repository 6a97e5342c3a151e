"""Compatibility names: the training loop's helpers moved to the package htc_fast.engine (one
module per concept). Import from there; this module only re-exports them for older imports."""
from htc_fast.engine import *  # noqa: F401,F403
from htc_fast.engine import __all__  # noqa: F401
