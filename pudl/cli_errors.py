"""How every `pudl` command ends on a mistake a user can make: one red line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import errno
import functools
import sys

from rich.console import Console
from rich.markup import escape

from pudl.errors import UserError, write_failed

err_console = Console(stderr=True)


def user_errors(fn):
    """Print UserError (and a full disk) as one red line and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # escape: a path or a server's reply may hold [brackets] that rich would take for markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            # writers that do not name their file (logs, JSON): shutil puts the destination in filename2
            where = e.filename2 or e.filename or "a file in the run directory"
            err_console.print(f"[bold red]error:[/] {escape(write_failed(where, e))}", highlight=False,
                              soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted: everything finished so far is in the cache; rerun to resume")
            sys.exit(130)

    return wrapper
