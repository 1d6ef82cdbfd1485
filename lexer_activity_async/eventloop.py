"""The event loop the command runs on: uvloop when it is installed (extra ``[uvloop]``)
and the platform is not Windows, else asyncio's own (uvloop's I/O paths are written in
C; the README's Performance section says what it gains here).
``LEXER_ACTIVITY_LOOP=asyncio`` forces asyncio's loop, ``=uvloop`` insists on uvloop;
unset or ``auto`` picks as above.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .exceptions import ConfigurationError

__all__ = ["LOOP_ENV", "loop_name", "run"]

LOOP_ENV = "LEXER_ACTIVITY_LOOP"
T = TypeVar("T")


def _uvloop() -> Any:
    if sys.platform == "win32":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: what `run` will use. `ConfigurationError` for an
    unknown `LOOP_ENV`, or ``uvloop`` asked for where it cannot run."""
    wanted = os.environ.get(LOOP_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "asyncio", "uvloop"):
        raise ConfigurationError(f"{LOOP_ENV} must be auto, asyncio or uvloop; got {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    if _uvloop() is not None:
        return "uvloop"
    if wanted == "uvloop":
        raise ConfigurationError(
            f"{LOOP_ENV}=uvloop but uvloop cannot be used here: install the extra "
            "(pip install 'lexer-activity-async[uvloop]'; not available on Windows)"
        )
    return "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop `loop_name` picks, as `asyncio.run` does."""
    try:
        name = loop_name()
    except ConfigurationError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    if name == "uvloop":
        result: T = _uvloop().run(main)
        return result
    return asyncio.run(main)
