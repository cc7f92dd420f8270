"""Crash-safe file writes: a file under its final name is always complete.

Every writer of a final file (model outputs, caches, sidecars, downloads) writes a temporary file
in the destination's directory, fsyncs it, renames it over the final name and fsyncs the
directory.  A process killed at any point (SIGKILL, OOM, power loss) leaves at worst a temporary
file, never a partial file under the final name.

    atomic_write_text(side, json.dumps(d))         # small files
    with atomic_path(out) as tmp:                  # a tool writes the file itself
        tools.run("llama-quantize", [src, tmp, "Q4_0"])
    fd, tmp = create_temp(out)                     # a writer that streams into the file
    ...; commit(tmp, out)
    with temp_dir(out) as d:                       # scratch files beside the output
        ...

Temporary names carry the writer's identity,
``.<final name>.lrqtmp.<host>.<pid>.<process start>.<random><final suffix>``, so that
``remove_stale_temps`` removes exactly the temporaries whose writer is gone (killed) and never one
a live writer is still filling.  The final suffix stays last because tools look at it
(llama-imatrix warns that a GGUF output not named ``*.gguf`` may be meant as its old format).

A cache entry is a data file and a JSON sidecar ``<data>.json`` (``store_entry`` /
``load_entry``): the old sidecar is removed before the data file is replaced, the sidecar is
written last and records the recipe (the inputs) and the data file's size and mtime, so an entry
is used only when both files are there and agree; a kill at any point makes the entry a miss,
never a stale or partial hit.

Temporary files are created by the kernel with mode 0666 minus the umask, like any open();
nothing here changes the process-wide umask (which would race with other threads).

Standard library only: lrq.fetch uses it, and the build imports lrq.fetch before lrq's
dependencies are installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["temp_path", "create_temp", "commit", "atomic_path", "atomic_write_bytes",
           "atomic_write_text", "fsync_file", "fsync_dir", "remove_stale_temps", "temp_dir", "is_temp",
           "temp_owner_alive", "sidecar", "load_entry", "store_entry"]

TAG = "lrqtmp"
# A temporary made on another host (a cache directory on a shared file system) cannot be checked
# for a live writer; it is removed only when older than this (a longer write than two days is
# implausible, a leaked multi-GB temporary for longer is a real cost).
FOREIGN_STALE_S = 2 * 86400
# final names longer than this are replaced by a hash in temporary names (NAME_MAX is 255)
_MAX_KEY = 160
_TEMP = re.compile(rf"^\.(?P<key>.+)\.{TAG}\.(?P<host>[A-Za-z0-9-]*)\.(?P<pid>\d+)\."
                   rf"(?P<start>\d*)\.(?P<rand>[0-9a-f]{{8}})(?P<suffix>\.[^.]*)?$")


def _key(final_name: str) -> str:
    if len(final_name) <= _MAX_KEY:
        return final_name
    return "h" + hashlib.sha1(final_name.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32]


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (field 22 of /proc/<pid>/stat, clock ticks since boot):
    None when no such process runs (a zombie has finished writing), "" when it runs but its start
    time is unknown (no /proc).  The start time tells a reused PID from the writer's own."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except OSError:
        pass
    else:
        fields = stat[stat.rindex(b")") + 2:].split()    # the command name may hold spaces
        if fields[0] in (b"Z", b"X"):
            return None
        return fields[19].decode()
    try:                                                   # no /proc (not Linux)
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


_self: tuple[int, str] | None = None


def _self_start() -> str:
    global _self
    pid = os.getpid()
    if _self is None or _self[0] != pid:     # a forked child has its own identity
        _self = (pid, _proc_start(pid) or "")
    return _self[1]


def temp_path(final: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh temporary name beside ``final`` (not created).  ``suffix`` defaults to final's."""
    final = Path(final)
    suffix = final.suffix if suffix is None else suffix
    return final.with_name(f".{_key(final.name)}.{TAG}.{_host()}.{os.getpid()}.{_self_start()}."
                           f"{secrets.token_hex(4)}{suffix}")


# Every temporary this process has created or handed out.  A writer removes its own in a
# `finally`, but an interrupt (Ctrl-C, or SIGTERM / SIGHUP raised as an exception by
# lrq.cli._job) can land between the file's creation and the start of the block that would remove
# it (e.g. inside a writer's constructor, before its `with`): the job's handler then removes what
# is left with remove_own_temps().  Committed temporaries no longer exist under their name.
_OWN_TEMPS: set[Path] = set()


def remove_own_temps() -> None:
    """Remove every temporary this process made that still exists (after an interrupt)."""
    for tmp in list(_OWN_TEMPS):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        _OWN_TEMPS.discard(tmp)


def create_temp(final: str | os.PathLike, suffix: str | None = None) -> tuple[int, Path]:
    """Create a new, empty temporary file beside ``final``: (an fd open for writing, its path).
    The kernel applies the umask to mode 0666, as for a file made by open()."""
    for _ in range(16):
        tmp = temp_path(final, suffix)
        _OWN_TEMPS.add(tmp)              # before the file exists: no window without an owner
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:          # 32 random bits under one PID: practically never
            _OWN_TEMPS.discard(tmp)
            continue
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {final}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:          # some file systems refuse fsync on a directory; the rename stands
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, final: str | os.PathLike, *, synced: bool = False) -> Path:
    """fsync ``tmp`` (unless ``synced``), rename it over ``final``, fsync the directory."""
    final = Path(final)
    if not synced:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent if str(final.parent) else ".")
    return final


@contextlib.contextmanager
def temp_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory beside ``near`` (large intermediates stay on its file system, /tmp may
    be small), removed on exit; one left by a killed run is removed by remove_stale_temps."""
    near = Path(near)
    parent = near.parent if str(near.parent) else Path(".")
    remove_stale_temps(parent, near.name)
    d = temp_path(near, "")
    os.mkdir(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path for ``final`` that the body (or a tool it runs) writes; committed when
    the body returns, removed when it raises.  FileNotFoundError if the body wrote nothing.
    Temporaries of killed writers beside ``final`` are removed first."""
    final = Path(final)
    remove_stale_temps(final.parent if str(final.parent) else ".", final.name)
    tmp = temp_path(final, suffix)
    _OWN_TEMPS.add(tmp)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp} was not written (for {final})")
        commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    remove_stale_temps(path.parent if str(path.parent) else ".", path.name)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return commit(tmp, path, synced=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def is_temp(name: str) -> bool:
    """Whether a file name is one of this module's temporary names."""
    return _TEMP.match(name) is not None


def temp_owner_alive(name: str) -> bool:
    """Whether the writer of temporary ``name`` may still be running (True for another host's)."""
    m = _TEMP.match(name)
    if m is None:
        raise ValueError(f"{name} is not an lrq temporary name")
    if m["host"] != _host():
        return True
    now = _proc_start(int(m["pid"]))
    if now is None:
        return False
    return not (m["start"] and now and now != m["start"])     # a reused PID is another process


def remove_stale_temps(directory: str | os.PathLike, final_name: str | None = None,
                       older_than: float = 0.0) -> list[Path]:
    """Remove the temporaries in ``directory`` (those for ``final_name`` only, if given) whose
    writer is no longer running and that are at least ``older_than`` seconds old; another
    host's temporaries only after FOREIGN_STALE_S.  Returns the paths removed."""
    directory = Path(directory)
    want = _key(final_name) if final_name is not None else None
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    host = _host()
    for name in names:
        m = _TEMP.match(name)
        if m is None or (want is not None and m["key"] != want):
            continue
        p = directory / name
        try:
            age = now - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        if m["host"] == host:
            if age < older_than or temp_owner_alive(name):
                continue
        elif age < max(older_than, FOREIGN_STALE_S):
            continue
        try:
            if stat.S_ISDIR(p.lstat().st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


# ---- cache entries: a data file and its JSON sidecar ----------------------------------------

def sidecar(data: str | os.PathLike) -> Path:
    data = Path(data)
    return data.with_name(data.name + ".json")


def _file_stamp(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_entry(data: str | os.PathLike, recipe: Any) -> dict | None:
    """The sidecar of cache entry ``data`` if the entry is valid for ``recipe`` (sidecar present,
    same recipe, data file of the recorded size and mtime), else None.

    A sidecar without a file stamp, written before entries carried one, is trusted once when its
    recipe matches (those writers, too, renamed only complete data files) and then rewritten with
    the stamp."""
    data = Path(data)
    side = sidecar(data)
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
        st = data.stat()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict):
        return None
    if "file" not in saved:
        if saved == recipe:                                # an older stock-file sidecar: the recipe
            saved = {"recipe": recipe}
        elif saved.get("recipe") != recipe:
            return None
        saved = {**saved, "file": _file_stamp(st)}
        atomic_write_text(side, json.dumps(saved, indent=1))
        return saved
    if saved.get("recipe") != recipe or saved.get("file") != _file_stamp(st):
        return None
    return saved


def store_entry(data: str | os.PathLike, recipe: Any,
                produce: Callable[[Path], dict | None]) -> dict:
    """Make cache entry ``data``: ``produce(tmp)`` writes the data to the temporary path ``tmp``
    (and may return more fields for the sidecar); then the data file is committed and the sidecar
    written last.  Returns the sidecar's content.  Temporaries of killed writers in the directory
    are removed first; on any error nothing but the old entry's data file remains."""
    data = Path(data)
    side = sidecar(data)
    directory = data.parent if str(data.parent) else Path(".")
    remove_stale_temps(directory)
    side.unlink(missing_ok=True)          # from here on the old entry is a miss
    tmp = temp_path(data)
    try:
        extra = produce(tmp) or {}
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp} was not written (for {data})")
        fsync_file(tmp)
        st = tmp.stat()                   # a rename keeps size and mtime
        os.replace(tmp, data)
        fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    saved = {"recipe": recipe, "file": _file_stamp(st), **extra}
    atomic_write_text(side, json.dumps(saved, indent=1))
    return saved
