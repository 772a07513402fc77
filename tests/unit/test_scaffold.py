"""``metabridge new-codec``: what it writes, and what it refuses (exit 2, nothing written)."""

from __future__ import annotations

import pytest

from metabridge.cli import main
from metabridge.config.model import load
from metabridge.core.runtime import build_runtimes

FILES = {"myrpc.py", "samples.py", "test_codec.py", "myrpc.yaml", "backend.py", "client.py", "README.md"}


def new_codec(*args: str) -> int:
    return main(["new-codec", *args])


def test_writes_a_project_whose_config_loads(tmp_path):
    target = tmp_path / "proj"
    assert new_codec("myrpc", "--dir", str(target), "--port", "12000") == 0
    assert {p.name for p in target.iterdir()} == FILES
    config = load(target / "myrpc.yaml")
    assert config.envoy_admin_port == 12002
    listener = config.listener("myrpc")
    assert listener.port == 12000
    assert {e.port for c in config.clusters.values() for e in c.endpoints} == {12001}
    build_runtimes(config)  # imports and checks the generated codec, compiles the routes
    readme = (target / "README.md").read_text()
    for command in ("python -m pytest", "metabridge check-codec ./myrpc.py:MyrpcCodec --samples samples.py", "python backend.py", "metabridge run -c myrpc.yaml --with-envoy", "python client.py"):
        assert command in readme


def test_default_folder_is_the_name_and_class_is_camel_case(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert new_codec("my_rpc") == 0
    assert "class MyRpcCodec(Codec):" in (tmp_path / "my_rpc" / "my_rpc.py").read_text()
    assert "ref: ./my_rpc.py:MyRpcCodec" in (tmp_path / "my_rpc" / "my_rpc.yaml").read_text()


@pytest.mark.parametrize(
    "name, why",
    [
        ("my-rpc", "Python identifier"),
        ("1rpc", "Python identifier"),
        ("_rpc", "Python identifier"),
        ("class", "keyword"),
        ("json", "standard library's json"),
        ("asyncio", "standard library's asyncio"),
        ("samples", "generated project or metabridge"),
        ("metabridge", "generated project or metabridge"),
        ("hpack", "installed hpack"),
    ],
)
def test_refuses_a_bad_name(tmp_path, capsys, name, why):
    target = tmp_path / "out"
    assert new_codec(name, "--dir", str(target)) == 2
    err = capsys.readouterr().err
    assert why in err and repr(name) in err and "e.g." in err
    assert not target.exists()


def test_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    (tmp_path / "myrpc.py").write_text("# mine\n")
    (tmp_path / "notes.txt").write_text("keep\n")
    assert new_codec("myrpc", "--dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (tmp_path / "myrpc.py").read_text() == "# mine\n"
    assert new_codec("myrpc", "--dir", str(tmp_path), "--force") == 0
    assert "class MyrpcCodec" in (tmp_path / "myrpc.py").read_text()
    assert (tmp_path / "notes.txt").read_text() == "keep\n"  # files it does not generate are left alone


def test_an_empty_folder_is_fine(tmp_path):
    assert new_codec("myrpc", "--dir", str(tmp_path)) == 0
    assert {p.name for p in tmp_path.iterdir()} == FILES


@pytest.mark.parametrize("port", ["0", "65534"])
def test_refuses_a_port_without_room_for_backend_and_admin(tmp_path, capsys, port):
    assert new_codec("myrpc", "--dir", str(tmp_path / "out"), "--port", port) == 2
    assert "1..65533" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_a_file_in_place_of_the_folder(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert new_codec("myrpc", "--dir", str(tmp_path / "out")) == 2
    assert "not a folder" in capsys.readouterr().err
