"""nemt: fast, verifiable explanations for medical image models."""
import random as _random

__version__ = "0.1.0"

# rich (nemt's progress bars; MONAI imports it too) draws from the global `random` when its style module is
# first imported: import it here under the caller's RNG state, so that importing nemt leaves that state as it was
_state = _random.getstate()
try:
    import rich.style  # noqa: F401
finally:
    _random.setstate(_state)
del _state
