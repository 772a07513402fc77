"""docs/writing-a-codec.md's starter works as written: its codec, config and shell commands, taken
from the page (only the ports changed to free ones), route a request through Envoy to the echo
backend and print what the page says; a request no route matches gets the ROUTE_NOT_FOUND reply.

In both modes: as written (the bridge process behind ext_proc), and with ``mode: inprocess``
added to the config's ``bridge:`` section (the core inside Envoy, docs/inprocess.md).
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import urllib.request

import pytest

from metabridge.native import build as native_build
from tests.integration.commands import BIN, Processes
from tests.integration.harness import MODES, REPO, free_port, port_open

GUIDE = REPO / "docs" / "writing-a-codec.md"
PORTS = ("9000", "9001", "9902")  # the page's listener, backend and admin ports


def _starter() -> tuple[str, str, list[str], str]:
    """The starter section's codec, config, shell commands and the output it promises."""
    section = GUIDE.read_text().split("## A starter to copy", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```(python|yaml|sh)\n(.*?)```", section, re.S))
    promised = re.search(r"prints the backend's answer, `(b'.*?')`", section).group(1)
    return blocks["python"], blocks["yaml"], blocks["sh"].splitlines(), promised


def _argv(line: str, ports: dict[str, str]) -> list[str]:
    for old, new in ports.items():
        line = line.replace(old, new)
    argv = shlex.split(line.removesuffix("&").strip())
    return [{"python": sys.executable, "metabridge": str(BIN / "metabridge")}.get(argv[0], argv[0]), *argv[1:]]


@pytest.mark.parametrize("mode", MODES)
def test_the_starter_routes_a_request_through_envoy(tmp_path, mode):
    codec, config, commands, promised = _starter()
    if mode == "inprocess":
        assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"
        assert config.startswith("bridge:\n")
        config = config.replace("bridge:\n", "bridge:\n  mode: inprocess\n", 1)
    ports = {old: str(free_port()) for old in PORTS}
    (tmp_path / "tinyrpc.py").write_text(codec)
    text = config.replace("/tmp/metabridge-tinyrpc.sock", str(tmp_path / "bridge.sock"))
    for old, new in ports.items():
        text = text.replace(old, new)
    (tmp_path / "tinyrpc.yaml").write_text(text)
    backend, run, client = (_argv(line, ports) for line in commands)
    procs = Processes(tmp_path)
    try:
        echo = procs.start("echo", backend)
        procs.wait(lambda: port_open(int(ports["9001"])), 15, "the page's echo backend", echo)
        bridge = procs.start("run", run)
        ready = f"http://127.0.0.1:{ports['9902']}/ready"
        procs.wait(lambda: urllib.request.urlopen(ready, timeout=1).status == 200, 30, "Envoy started by metabridge run", bridge)
        procs.wait(lambda: port_open(int(ports["9000"])), 10, "Envoy's listener", bridge)

        answered = subprocess.run(client, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert answered.returncode == 0, answered.stderr + procs.logs()
        assert answered.stdout.strip() == promised

        unrouted = subprocess.run([*client[:-2], "Nobody/hello", "hi"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert unrouted.returncode == 0, unrouted.stderr + procs.logs()
        reply = ast.literal_eval(unrouted.stdout.strip())  # the bytes the one-liner prints
        assert reply[8] == 1 and reply.endswith(b"Nobody/hello" + b"no route matches Nobody/hello"), reply
    finally:
        procs.stop()
