"""The one place bitsandbytes is imported: lazily, with an error that says what to install.

Example::

    bnb = import_bitsandbytes()          # the bitsandbytes module, or ModuleNotFoundError naming the fix
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

INSTALL_HINT = "pip install 'lightning_zenft[bnb]' (or: pip install 'bitsandbytes>=0.45')"


@functools.cache
def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes once, quietly; raise ``ModuleNotFoundError`` with the install command if it is missing."""
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    # Its CPU back end warns at import that an optional downloadable kernel is absent; the built-in one is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"4-bit quantization needs bitsandbytes, which is not installed ({err}). Install it: {INSTALL_HINT}."
        ) from err
    return bitsandbytes
