"""User-facing errors.

Every check on user input raises :class:`ComflpError` with one line that names
the culprit; the command-line front-ends turn it into that line on stderr and
exit status 2, never a traceback. An ``OSError`` (a path that cannot be read
or written) is reported the same way, naming the path.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class ComflpError(Exception):
    """Bad input or an impossible request, explained in one line."""


# errors met while writing: the message says "cannot write", not "cannot access"
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: what could not be done, the path, the system's reason."""
    where = f" {err.filename}" if err.filename else ""
    verb = "write" if err.errno in _WRITE_ERRORS else "access"
    return f"cannot {verb}{where}: {err.strerror or err}"


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
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
