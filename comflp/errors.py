"""User-facing errors.

Every check on user input raises :class:`ComflpError` with one line that names
the culprit; the command-line front-ends turn it into that line on stderr and
exit status 2, never a traceback. An ``OSError`` (a path that cannot be read
or written) is reported the same way, naming the path.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class ComflpError(Exception):
    """Bad input or an impossible request, explained in one line."""


def exit_on_error(main: F) -> F:
    """Wrap a command's ``main`` so a :class:`ComflpError` prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ComflpError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            # unwritable outputs (read-only dir, file where a dir is needed, full disk) surface here
            # from whichever writer met them; the path and the system's reason are the culprit
            where = f" {err.filename}" if err.filename else ""
            print(f"error: cannot access{where}: {err.strerror or err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
