"""The end every file-writing lrq CLI shares: run the job, turn its errors into one line on stderr
and an exit status, print the summary."""

from __future__ import annotations

import sys
from typing import Callable


def run_job(prog: str, out: str, job: Callable[[], object], errors: tuple[type[BaseException], ...],
            quiet: bool) -> int:
    """``job()`` returns a summary with ``lines()``.  ``errors``: the job's own error types (exit 1).
    An OSError (e.g. a full disk; writers have already removed their temporary file) exits 1 and
    Ctrl-C 130, both saying that nothing was written."""
    try:
        summary = job()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
    if not quiet:
        print("\n".join(summary.lines()))
    return 0
