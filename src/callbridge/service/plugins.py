"""What the host application plugs in by name (``CALLBRIDGE_TOOLS``, ``CALLBRIDGE_CONTEXT_FUNCTION``)."""

from __future__ import annotations

import os
import pkgutil
import sys


def load_object(dotted: str, setting: str) -> object:
    """``package.module:name``, imported as ``python -m`` would find it: from the working directory too, so that a
    module next to where ``callbridge serve`` runs needs no ``PYTHONPATH`` (the directory goes last on the path: it
    never shadows an installed package)."""
    module, colon, name = dotted.partition(":")
    if not module or not colon or not name:
        raise ValueError(f"{setting} must look like 'package.module:name', got {dotted!r}")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)
    return pkgutil.resolve_name(dotted)
