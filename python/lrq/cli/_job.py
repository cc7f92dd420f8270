"""The end every file-writing lrq CLI shares: run the job, turn its errors into one line on stderr
and an exit status, print the summary."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

from ..atomic import remove_own_temps

# The polite kills (`kill PID`, a closed terminal, a job scheduler's time limit) end the job like
# Ctrl-C: Python's default for them exits at once, skipping the `finally` blocks that remove a
# writer's temporary file, which then stays until the next run sweeps it (lrq.atomic).
POLITE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM / SIGHUP during a job (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` of the job swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def polite_signals_raise() -> Iterator[None]:
    """Within the block SIGTERM / SIGHUP raise Terminated in the main thread (handlers can only be
    set there: elsewhere this does nothing); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_terminated) for s in POLITE_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_job(prog: str, out: str, job: Callable[[], object], errors: tuple[type[BaseException], ...],
            quiet: bool) -> int:
    """``job()`` returns a summary with ``lines()``.  ``errors``: the job's own error types (exit 1).
    An OSError (e.g. a full disk; writers have already removed their temporary file) exits 1,
    Ctrl-C 130 and SIGTERM / SIGHUP 128 + the signal (the shell's convention), all saying that
    nothing was written."""
    try:
        with polite_signals_raise():
            summary = job()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        remove_own_temps()      # one the interrupt caught before its writer's `finally` began
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Terminated as e:
        remove_own_temps()
        print(f"{prog}: terminated by {e}; nothing written", file=sys.stderr)
        return 128 + e.signum
    if not quiet:
        print("\n".join(summary.lines()))
    return 0
