"""User-facing errors: one line that names the file or key at fault and what to do about it."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in input or configuration. Entry points print it as one line, without a traceback."""


def exits_cleanly(main: F) -> F:
    """Wrap an entry point so a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            logging.getLogger(__name__).debug("user error", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
