"""The package as a user gets it: a wheel built from a clean clone, installed with its
dependencies into a fresh virtual environment outside the repository, runs validate, render and
a routed request through Envoy with a built-in codec named in the config (``ref: awesomerpc``).

The routed request runs in both bridge modes: in-process the installed package builds its
dynamic module from the C source it ships (``python -m metabridge.native.build``) and
``metabridge run --with-envoy`` starts Envoy alone with the module loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import metabridge
from examples.awesomerpc.client import call_sync
from tests.integration.harness import MODES, REPO, free_port, port_open, wait_until

def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env() -> dict:
    """No trace of the repository's virtualenv or source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh virtualenv with the wheel (and Envoy) installed."""
    root = tmp_path_factory.mktemp("package")
    _run(["git", "clone", "--quiet", REPO, root / "clone"], root)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "-w", root / "dist", root / "clone"], root)
    (wheel,) = (root / "dist").glob("metabridge-*.whl")
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    _run([base_python, "-m", "venv", root / "venv"], root)
    _run([root / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[envoy]"], root, timeout=600)
    return root / "venv" / "bin"


def test_the_wheel_holds_generated_code_codecs_license_and_entry_points(installed):
    (wheel,) = (installed.parent.parent / "dist").glob("metabridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "metabridge/_proto/network_ext_proc_pb2.py",
        "metabridge/_proto/ratelimit_pb2_grpc.py",
        "metabridge/codecs/awesomerpc.py",
        "metabridge/codecs/dubbo/__init__.py",
        "metabridge/codecs/thrift/__init__.py",
        "metabridge/py.typed",
        "metabridge-0.1.0.dist-info/licenses/LICENSE",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith(("codecs/", "bridge/", "tests/")) for n in names), "the wheel ships repository folders at top level"
    probe = _run(
        [
            installed / "python",
            "-c",
            "import importlib.metadata as m, metabridge;"
            "print(sorted(e.name for e in m.entry_points(group='metabridge.codecs')));"
            "print([e.load().__module__ for e in sorted(m.entry_points(group='metabridge.codecs'), key=lambda e: e.name)]);"
            "print(metabridge.CODEC_API_VERSION, metabridge.Codec.__module__)",
        ],
        installed,
    )
    lines = probe.stdout.splitlines()
    assert lines[0] == "['awesomerpc', 'dubbo', 'thrift']"
    assert lines[1] == "['metabridge.codecs.awesomerpc', 'metabridge.codecs.dubbo.codec', 'metabridge.codecs.thrift.codec']"
    assert lines[2] == f"{metabridge.CODEC_API_VERSION} metabridge.sdk.codec"


@pytest.mark.parametrize("mode", MODES)
def test_validate_render_and_a_routed_request_from_the_installed_wheel(installed, tmp_path, mode):
    backend_port, listener_port, admin_port = free_port(), free_port(), free_port()
    config = {
        "bridge": {"listen": f"unix:{tmp_path}/bridge.sock", "mode": mode},
        "envoy": {"admin_port": admin_port},
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},  # the built-in codec, by entry-point name
        "listeners": [
            {
                "name": "awesomerpc",
                "address": "127.0.0.1",
                "port": listener_port,
                "codec": "awesomerpc",
                "routes": [{"name": "everything", "route": {"cluster": "backend"}}],
            }
        ],
        "clusters": [{"name": "backend", "endpoints": [{"address": "127.0.0.1", "port": backend_port}]}],
    }
    config_path = tmp_path / "metabridge.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    metabridge = installed / "metabridge"
    if mode == "inprocess":  # the module, built where the package is installed, against its Python
        _run([installed / "python", "-m", "metabridge.native.build"], tmp_path)
        built = _run([installed / "python", "-c", "from metabridge.native import build; print(build.LIBRARY, build.LIBRARY.exists())"], tmp_path).stdout.split()
        assert built[1] == "True" and not built[0].startswith(str(REPO)), built

    _run([metabridge, "validate", "-c", config_path], tmp_path)  # includes `envoy --mode validate` with the wheel's Envoy
    rendered = yaml.safe_load(_run([metabridge, "render", "-c", config_path], tmp_path).stdout)
    assert [listener["name"] for listener in rendered["static_resources"]["listeners"]][:1] == ["awesomerpc"]
    filters = [f["name"] for f in rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]]
    assert filters[0] == ("envoy.filters.network.dynamic_modules" if mode == "inprocess" else "envoy.filters.network.ext_proc"), filters

    procs = []
    try:
        backend = subprocess.Popen([sys.executable, "-m", "examples.awesomerpc.server", "--port", str(backend_port), "--name", "v1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(backend)
        wait_until(lambda: port_open(backend_port), 10, "backend", backend)
        log = open(tmp_path / "run.log", "wb")
        run = subprocess.Popen([metabridge, "run", "-c", config_path, "--with-envoy", "--envoy-log-level", "error"], cwd=tmp_path, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(run)
        wait_until(lambda: port_open(listener_port), 30, "the installed metabridge's Envoy listener", run)
        reply = wait_until(lambda: call_sync("127.0.0.1", listener_port, 1, b"hello", timeout=2), 20, "a routed reply")
        assert (reply.rsp_code, reply.body) == (0, b"v1|hello")
        # The scaffold's templates ship in the wheel: a new codec project from the installed package.
        _run([metabridge, "new-codec", "pkgcheck", "--dir", tmp_path / "pkgcheck"], tmp_path)
        assert (tmp_path / "pkgcheck" / "pkgcheck.py").is_file() and (tmp_path / "pkgcheck" / "pkgcheck.yaml").is_file()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
