"""One run per study folder: an exclusive lock on ``<out>/<study>/.lock``.

The lock is an OS advisory lock (``flock``) on that file, so it dies with its process: a run
killed with SIGKILL never blocks the next one.  The file also records who holds it (pid, host,
start time, command); a later run that finds such a record from a process that no longer exists
reports it as a stale lock (the earlier run died without finishing) and takes over.  Where
``flock`` is unavailable the pid record alone decides.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sys
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_text(record: dict) -> str:
    if not record:
        return "another run"
    return (f"another run (pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
            f"{str(record.get('command', ''))[:160]})")


class StudyLock:
    """``with StudyLock(folder) as lock:`` -- ``lock.stale`` holds the record of a dead earlier holder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict | None = None

    def _refuse(self, record: dict) -> UserError:
        return UserError(f"the study folder {str(self.folder)!r} is in use by {_holder_text(record)}; two runs "
                         "into one folder would lose each other's results", str(self.path),
                         "wait for that run to finish, or choose another --out")

    def acquire(self) -> "StudyLock":
        host = socket.gethostname()
        for _attempt in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                from .results import os_error_reason

                raise UserError(f"cannot create the lock file {str(self.path)!r}: {os_error_reason(exc)}",
                                str(self.folder), "choose a writable folder (--out DIR)") from None
            record = _read_record(self.path)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise self._refuse(record) from None
                    raise UserError(f"cannot lock {str(self.path)!r}: {exc.strerror}", str(self.folder),
                                    "use a local folder for --out") from None
                # The file may have been removed and recreated by the holder's release meanwhile: the lock
                # must be on the file that is at the path now.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                record = _read_record(self.path)
            elif record.get("pid") and record.get("host") == host and _pid_alive(int(record["pid"])) \
                    and int(record["pid"]) != os.getpid():
                os.close(fd)
                raise self._refuse(record)
            if record.get("pid"):
                # Held by nobody now, yet a record is left: its run ended without releasing (killed, crashed).
                self.stale = record
            self.fd = fd
            mine = {"pid": os.getpid(), "host": host,
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)[:500]}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(mine).encode(), 0)
            except OSError:
                pass  # the flock still holds; the record is only for messages
            return self
        raise UserError(f"could not lock {str(self.path)!r}: it keeps being replaced", str(self.folder),
                        "check that no other run uses this folder")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self.fd)  # closing drops the flock
        finally:
            self.fd = None

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def stale_message(self) -> str | None:
        if not self.stale:
            return None
        return (f"note: found a stale lock in {self.folder} from pid {self.stale.get('pid')} on "
                f"{self.stale.get('host')} (started {self.stale.get('started')}), which is no longer running: "
                "that run ended without finishing; taking the folder over")
