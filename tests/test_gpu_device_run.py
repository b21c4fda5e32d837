"""The one-go device script's plumbing, on the CPU: steps, records, summary table."""
import json
import sys

from refattn.gpu import device_run


def test_steps_cover_the_device_work(tmp_path):
    names = [s.name for s in device_run.steps(str(tmp_path))]
    assert names == ["compile_check", "selfcheck", "pytest_gpu", "memcheck", "racecheck",
                     "benchmark"]
    assert sum(s.limit_s for s in device_run.steps(str(tmp_path))) <= device_run.DEADLINE_S
    assert device_run.DEADLINE_S < 10 * 60


def test_a_run_writes_its_record_and_table(tmp_path, capsys):
    rc = device_run.main(["--out", str(tmp_path), "--only", "pytest_gpu", "memcheck"])
    rec = json.loads((tmp_path / "device-run.json").read_text())
    assert set(rec["steps"]) == {"pytest_gpu", "memcheck"}
    assert rec["steps"]["pytest_gpu"]["status"] in ("passed", "failed")
    assert len(rec["kernel_sources_sha256"]) == 64
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("device:")
    assert (rc == 0) == all(s["status"] in ("passed", "skipped") for s in rec["steps"].values())


def test_a_timeout_kills_the_step(tmp_path):
    step = device_run.Step("sleep", [sys.executable, "-c", "import time; time.sleep(60)"],
                           1, "sleep.txt")
    r = device_run._run(step, str(tmp_path), 100)
    assert r["status"] == "timeout" and r["seconds"] < 30
