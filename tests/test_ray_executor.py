"""`run --executor ray`: the same cells as a local run, a killed worker retried, a killed driver resumed.

One local Ray instance (2 CPUs) serves the whole module: Ray takes tens of seconds to start on 2 cores.
Ray is the optional extra `.[ray]`, which the README's test line (and so CI) installs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from attnres_quant.cli import main as cli_main
from attnres_quant.pipeline import ray_executor

ROOT = Path(__file__).resolve().parents[1]
KILLED_UNIT = "killtest/tiny-block/int4_all"   # the test hook kills this unit's first attempt
# The default study's models and variants (RTN W8A8 / int4 / hybrid and GPTQ), at tiny limits.
DEFAULT_STUDY_FAST = ["--tasks", "proxy_mc", "--limit", "2", "--set", "bench.enabled=false",
                      "--set", "quality.max_tokens=64", "--set", "quality.seq_len=32",
                      "--set", "calibration.samples=2", "--set", "calibration.seq_len=32", "--set", "device=cpu",
                      # one torch thread in both runs: a reduction over 1 or 2 threads rounds differently
                      "--set", "bench.threads=1"]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for the module; workers inherit the test hook's environment variable."""
    os.environ[ray_executor.TEST_KILL_ENV] = KILLED_UNIT
    for attempt in range(3):  # a busy 2-core machine can miss Ray's 30 s node start-up deadline
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop(ray_executor.TEST_KILL_ENV, None)


def mini_study(tmp_path: Path, name: str = "mini") -> Path:
    cfg = {"name": name, "seed": 0, "device": "cpu", "dtype": "bfloat16", "models": [{"path": "zoo:tiny-block"}],
           "variants": [{"name": "int4_all", "method": "rtn", "default": {"weight": "int4", "group_size": 32}},
                        {"name": "int4_hybrid", "method": "rtn", "default": {"weight": "int4", "group_size": 32},
                         "rules": [{"select": "depth.*", "weight": "bf16"}]}],
           "tasks": ["proxy_mc"], "eval": {"batch_size": 8, "limit": 3},
           "quality": {"max_tokens": 128, "seq_len": 64}, "bench": {"enabled": False, "threads": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_without_ray(args: list[str], cwd: Path) -> None:
    """`run` in a fresh interpreter where importing ray fails: the local executor must not need it."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from attnres_quant.cli import main\n"
            f"rc = main({args!r})\n"
            "assert 'ray' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None], 'ray imported'\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(ray_executor.TEST_KILL_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def local_mini(tmp_path_factory):
    """The mini study run locally, once, in an interpreter without Ray."""
    tmp = tmp_path_factory.mktemp("local_mini")
    run_without_ray(["run", str(mini_study(tmp)), "--out", str(tmp / "out")], tmp)
    return json.loads((tmp / "out" / "mini" / "results.json").read_text())


def results(out: Path, name: str) -> dict:
    return json.loads((out / name / "results.json").read_text())


def values(data: dict, kinds=("task:", "quality", "depth", "plan", "model")) -> dict:
    return {k: v["value"] for k, v in data["cells"].items() if k.split("/", 2)[2].startswith(kinds)}


def assert_same_cells(ray_run: dict, local_run: dict) -> None:
    assert set(ray_run["cells"]) == set(local_run["cells"])
    assert all(c["status"] == "ok" for c in ray_run["cells"].values())
    mine, theirs = values(ray_run), values(local_run)
    for key in theirs:
        assert mine[key] == theirs[key], key


@pytest.mark.timeout(1800)  # 10 units twice; minutes on an idle 2-core machine, more on a shared one
def test_ray_runs_the_default_study_with_the_cells_of_a_local_run(tmp_path, ray_address):
    config = str(ROOT / "configs" / "int4_hybrid.yaml")
    assert cli_main(["run", config, "--out", str(tmp_path / "local"), *DEFAULT_STUDY_FAST]) == 0
    assert cli_main(["run", config, "--out", str(tmp_path / "ray"), "--executor", "ray", *DEFAULT_STUDY_FAST]) == 0
    local, distributed = results(tmp_path / "local", "int4_hybrid"), results(tmp_path / "ray", "int4_hybrid")
    assert len([k for k in local["cells"] if "/task:" in k]) == 2 * 5   # models x (baseline + 4 variants)
    assert_same_cells(distributed, local)
    assert distributed["meta"]["executor"]["name"] == "ray" and "executor" not in local["meta"]
    assert not distributed["meta"]["executor"].get("retried")
    # which text each model's calibration and quality used: recorded by the tasks, relayed to the driver
    assert distributed["meta"]["data"] == local["meta"]["data"]
    assert set(local["meta"]["data"]["tiny-block"]) == {"quality", "calibration"}
    assert (tmp_path / "ray" / "int4_hybrid.md").read_text().count("gptq_int4_hybrid") >= 1
    # sample logs are written by the tasks beside results.json, at the same relative paths
    samples = distributed["cells"]["tiny-standard/gptq_int4_hybrid/task:proxy_mc"]["value"]["proxy_mc"]
    assert (tmp_path / "ray" / "int4_hybrid" / samples["samples_path"]).is_file()


def test_ray_variants_score_against_the_saved_baseline(tmp_path, ray_address, local_mini):
    """`quality.kl_top_k: all` under Ray: the baseline task saves its log-probs and depth weights, the
    variant tasks free their baseline copy and read the file; the figures equal the local resident run's."""
    cfg = yaml.safe_load(mini_study(tmp_path).read_text())
    cfg["quality"]["kl_top_k"] = "all"
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["run", str(tmp_path / "mini.yaml"), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 0
    data = results(tmp_path / "out", "mini")
    assert (tmp_path / "out" / "mini" / "baseline_topk" / "tiny-block" / "depth.safetensors").is_file()
    for variant in ("int4_all", "int4_hybrid"):
        mine = data["cells"][f"tiny-block/{variant}/quality"]["value"]
        theirs = local_mini["cells"][f"tiny-block/{variant}/quality"]["value"]
        assert mine["kl_source"] == "exact, from the saved baseline"
        for key in ("kl_mean", "kl_p99", "same_top_p", "ppl", "base_ppl", "bpb", "depth_js_mean"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (variant, key)


def test_a_killed_worker_is_retried_once_and_its_cells_are_kept(tmp_path, ray_address, local_mini):
    path = mini_study(tmp_path, "killtest")
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 0
    data = results(tmp_path / "out", "killtest")
    assert_same_cells(data, local_mini)
    # the first attempt died (os._exit) right after delivering its first cell; the retry did the rest
    cells = data["cells"]
    assert cells["tiny-block/int4_all/plan"]["attempt"] == 1
    assert cells["tiny-block/int4_all/task:proxy_mc"]["attempt"] == 2
    assert cells["tiny-block/int4_all/status"]["attempt"] == 2
    assert cells["tiny-block/int4_hybrid/status"]["attempt"] == 1
    assert data["meta"]["executor"]["retried"] == {"tiny-block/int4_all": 2}


def test_resume_after_killing_the_ray_driver_continues(tmp_path, ray_address, local_mini):
    path, out = mini_study(tmp_path), tmp_path / "out"
    results_path = out / "mini" / "results.json"
    driver = subprocess.Popen([sys.executable, "-m", "attnres_quant", "run", str(path), "--out", str(out),
                               "--executor", "ray", "--address", ray_address],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if results_path.exists() and '"tiny-block/bf16/task:proxy_mc"' in results_path.read_text():
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver ended before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = json.loads(results_path.read_text())["cells"]
    assert "tiny-block/bf16/task:proxy_mc" in before and len(before) < len(local_mini["cells"])
    assert cli_main(["run", str(path), "--out", str(out), "--executor", "ray", "--resume"]) == 0
    after = json.loads(results_path.read_text())
    for key, cell in before.items():
        assert after["cells"][key] == cell, f"finished cell {key} was recomputed"
    assert_same_cells(after, local_mini)


def test_ray_needs_its_extra_and_address_needs_ray(tmp_path, monkeypatch, capsys):
    from attnres_quant.pipeline.executors import make_executor

    path = mini_study(tmp_path)
    assert cli_main(["run", str(path), "--out", str(tmp_path), "--address", "auto"]) == 2
    assert "--address was given without --executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(Exception, match=r'pip install -e "\.\[ray\]"'):
        make_executor(type("Args", (), {"executor": "ray", "address": None, "cpus_per_task": 1})())
    assert not (tmp_path / "mini").exists()


def test_a_task_no_node_can_hold_is_refused_before_submission(ray_address):
    from attnres_quant.errors import UserError

    options = ray_executor.task_options(None, "cpu", 1, memory=10 ** 18)
    with pytest.raises(UserError, match="no node of the Ray cluster can run a task of model m"):
        ray_executor.check_feasible(options, "m")
    ray_executor.check_feasible(ray_executor.task_options(None, "cpu", 1, memory=2 ** 20), "m")
    assert ray_executor.task_options(None, "cuda", 2, None)["num_gpus"] == 1
    assert ray_executor.unit_memory_bytes(10 ** 6, "bfloat16") == 4 * 10 ** 6 + (1 << 30)
