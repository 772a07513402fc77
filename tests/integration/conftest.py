"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.harness import Stack, awesomerpc_config, free_port, stack_class


@pytest.fixture
def mode() -> str:
    """The bridge.mode a test runs in; tests that apply to both parametrize it with MODES."""
    return "ext_proc"


@pytest.fixture
def stack(tmp_path, mode):
    """Factory (in the test's ``mode``): stack(routes, backends=..., extra_clusters=..., cluster_options=..., envoy_args=...,
    **listener_options) -> a started Stack of example awesomerpc backends, the bridge and Envoy,
    with ``listen_port`` set; every stack it made is stopped after the test."""
    started: list[Stack] = []

    def make(routes, backends=("v1", "v2"), extra_clusters=None, cluster_options=None, envoy_args=None, **listener_options):
        ports = {name: free_port() for name in backends}
        cfg = awesomerpc_config(free_port(), {**ports, **(extra_clusters or {})}, routes, **listener_options)
        for cluster in cfg["clusters"]:
            cluster.update((cluster_options or {}).get(cluster["name"], {}))
        s = stack_class(mode)(tmp_path, cfg, ports, envoy_args=envoy_args)
        started.append(s)
        s.listen_port = cfg["listeners"][0]["port"]
        return s.start()

    yield make
    for s in started:
        s.stop()
