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


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (its type name when empty), for a one-line error.

    Lines are joined, not dropped: transformers' config validators put the reason on the second line."""
    text = " ".join(str(exc).split())
    return text[:limit] if text else type(exc).__name__


class GateFailed(Exception):
    """An artifact answered worse than its gate allows. The message is the table of what drifted how much."""


def exits_cleanly(main: F) -> F:
    """Wrap an entry point: a UserError becomes `error: <message>` and exit status 2; a failed gate
    prints its table and exits 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except GateFailed as exc:
            print(f"parity gate failed:\n{exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except UserError as exc:
            logging.getLogger(__name__).debug("user error", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
