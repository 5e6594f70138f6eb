"""User-facing errors.

Anything raised as `UserError` is a mistake in the user's input (a config key, a data file, a
checkpoint path). Entry points print its message on one line and exit non-zero, without a
traceback; everything else is a bug and keeps its traceback.
"""

import functools
import sys


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and where."""


def cli_main(fn):
    """Decorate a CLI `main`: UserError -> one line on stderr and exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
