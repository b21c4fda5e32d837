"""Installation: the wheel works on its own, and CI runs what the README says."""
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, **kwargs):
    """Run a command; on failure show its output in the assertion."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _readme_commands()[:2]
    assert "refattn" in main_job.split("&&")[-1]
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_gpu_package_imports_without_cuda():
    import refattn.gpu
    status = refattn.gpu.device_status()
    if not status.startswith("ok"):
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            refattn.gpu.require_device()


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    """Build the wheel, install it into a fresh venv that sees this environment's
    dependencies through a path entry (no downloads; the path's own .pth files, such
    as an editable refattn, are not processed), and import the three packages from
    outside the source tree."""
    src, dist = tmp_path / "src", tmp_path / "dist"   # build a copy: no build/ in ROOT
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "reports"))
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src)
    wheel = next(dist.glob("refattn-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    deps = [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    _run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    code = ("import refattn, refattn.analysis, refattn.gpu, pathlib; "
            "print(pathlib.Path(refattn.__file__).parent); "
            "print(refattn.gpu.__name__, *refattn.mechanisms())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where, installed = _run(py, "-c", code, cwd=tmp_path, env=env).splitlines()
    assert Path(where).is_relative_to(env_dir), where
    source = _run(sys.executable, "-c", code, cwd=tmp_path, env=env).splitlines()[1]
    assert installed == source
