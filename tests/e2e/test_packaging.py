"""The distribution as a user gets it: the wheel's contents and metadata, an install outside
the repository, the ``kvnode`` console script, and the README's library example.

The wheel is built offline from this tree (``pip wheel --no-deps --no-build-isolation``, with
the hatchling of the test environment) and installed ``--no-deps`` into a fresh venv outside
the repository. The venv is created ``--system-site-packages`` and given this environment's
site-packages as its last path entry (a ``.pth`` line), so the dependencies resolve without a
network while ``trio_raft`` and ``trio_raft_kv`` themselves can only come from the wheel: the
editable install's own ``.pth`` files are not processed there, and every command runs from a
directory outside the repository.
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import trio_raft

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: float = 180,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(out), str(ROOT)], cwd=out)
    wheels = list(out.glob("trio_raft-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents_and_metadata(wheel: Path) -> None:
    assert wheel.name == f"trio_raft-{trio_raft.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = f"trio_raft-{trio_raft.__version__}.dist-info"
        meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"trio_raft", "trio_raft_kv", dist_info}, tops
    for required in ("trio_raft/py.typed", "trio_raft_kv/py.typed", "trio_raft/_version.py",
                     "trio_raft_kv/cli.py", "trio_raft_kv/_proto/trio_raft/kv/v1/__init__.py",
                     "trio_raft/transport/_proto/trio_raft/transport/v1/__init__.py",
                     f"{dist_info}/licenses/LICENSE"):
        assert required in names, required
    assert not any("kvnode_lib" in n or "kvproto" in n or "__pycache__" in n for n in names)
    assert re.search(r"^kvnode = trio_raft_kv\.cli:main$", entry_points, re.M), entry_points

    assert meta["Name"] == "trio-raft"
    assert meta["Version"] == trio_raft.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier") or []
    for c in ("Framework :: Trio", "Typing :: Typed", "Operating System :: POSIX",
              "License :: OSI Approved :: Apache Software License",
              "Programming Language :: Python :: 3.11"):
        assert c in classifiers, c
    assert set(meta.get_all("Provides-Extra") or []) >= {"kv", "test", "codegen"}
    requires = meta.get_all("Requires-Dist") or []
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith("prometheus") for r in core), core  # service-only: kv extra
    assert any(r.startswith("prometheus-client") and "extra == 'kv'" in r for r in requires)
    assert any(r.startswith("grpclib") and "<0.5" in r for r in core), core
    assert any(r.startswith("cryptography") for r in core), core
    assert any(r.startswith("pynacl") for r in core), core
    assert "Project-URL" not in meta


def test_installed_outside_the_repository(wheel: Path,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("installed")
    assert ROOT not in work.parents
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        cwd=work)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=work).stdout.strip())
    # The dependencies: this environment's site-packages, searched after the venv's own.
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         str(wheel)], cwd=work)

    r = run([str(venv / "bin" / "kvnode"), "--version"], cwd=work)
    assert r.stdout.strip() == f"kvnode {trio_raft.__version__}"
    r = run([str(py), "-c", "import trio_raft, trio_raft_kv, trio_raft_kv.cli; "
             "print(trio_raft.__file__); print(trio_raft_kv.__file__)"], cwd=work)
    files = [Path(line) for line in r.stdout.split()]
    assert len(files) == 2 and all(site in f.parents for f in files), (files, site)
    r = subprocess.run([str(venv / "bin" / "kvnode"), "status", "--addr", "nohost"], cwd=work,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def readme_library_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The library in 20 lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "no python block under 'The library in 20 lines'"
    return match.group(1)


def test_readme_library_example_runs(tmp_path: Path) -> None:
    code = readme_library_example()
    assert len(code.strip().splitlines()) <= 40
    (tmp_path / "example.py").write_text(code)
    temp = tmp_path / "tmp"  # where the example's tempfile.mkdtemp() data dir goes
    temp.mkdir()
    r = run([sys.executable, "example.py"], cwd=tmp_path, timeout=60,
            env={**os.environ, "TMPDIR": str(temp)})
    assert re.fullmatch(r"apples = 1 at index \d+\n", r.stdout), r.stdout
    data_dirs = list(temp.iterdir())
    assert len(data_dirs) == 1 and any(data_dirs[0].rglob("*")), data_dirs  # a real WAL
