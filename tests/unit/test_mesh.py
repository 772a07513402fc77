"""Kubernetes manifests -> Config (metabridge.config.mesh): the mapping of every resource and field,
and every error and warning naming the resource and field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from metabridge.config import mesh
from metabridge.config.model import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]
HOST = "com.example.greeter"

SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: greeter, namespace: meta-dubbo}
spec:
  hosts: [com.example.greeter]
  ports:
    - {number: 20880, name: tcp-metaprotocol-dubbo, protocol: TCP}
  resolution: STATIC
  endpoints:
    - {address: 10.0.0.1, labels: {version: v1}}
    - {address: 10.0.0.2, ports: {tcp-metaprotocol-dubbo: 20881}, labels: {version: v2}}
"""
DESTINATION_RULE = """
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: greeter, namespace: meta-dubbo}
spec:
  host: com.example.greeter
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"""


def metarouter(routes: str = "", extra: str = "", hosts: str = "[com.example.greeter]") -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: greeter, namespace: meta-dubbo}}
spec:
  hosts: {hosts}
{textwrap.indent(textwrap.dedent(extra).strip(), "  ") if extra else ""}
  routes:
{textwrap.indent(textwrap.dedent(routes).strip(), "    ")}
"""


SPLIT = """
- name: split
  route:
    - destination: {host: com.example.greeter, subset: v1}
      weight: 80
    - destination: {host: com.example.greeter, subset: v2}
      weight: 20
"""


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
    return folder


def raw_of(folder: Path, base: Path | None = None) -> dict:
    return mesh.build_raw(folder, base)[0]


def errors_of(folder: Path, base: Path | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        mesh.load(folder, base)
    return str(raised.value)


def listener(raw: dict, port: int = 20880) -> dict:
    return next(entry for entry in raw["listeners"] if entry["port"] == port)


def clusters(raw: dict) -> dict[str, dict]:
    return {c["name"]: c for c in raw["clusters"]}


# -- the mapping -------------------------------------------------------------------------------


def test_dubbo_example_gives_the_config_a_file_with_the_same_content_gives(tmp_path):
    loaded = mesh.load(ROOT / "examples/mesh/dubbo")
    assert loaded.warnings == ()
    raw = raw_of(ROOT / "examples/mesh/dubbo")
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(raw))
    from_file = load(tmp_path / "same.yaml")
    assert dataclasses.replace(loaded.config, source="", base_dir=Path(".")) == dataclasses.replace(from_file, source="", base_dir=Path("."))

    (only,) = loaded.config.listeners
    assert (only.name, only.port, only.codec) == (f"outbound|20880||{HOST}", 20880, "dubbo")
    assert loaded.config.codecs["dubbo"].ref == "dubbo"
    canary, mirrored, split = only.routes
    assert [(h.name, h.kind, h.value) for h in canary.headers] == [("interface", "exact", "com.example.Greeter"), ("x-canary", "exact", "true")]
    assert [(w.name, w.weight) for w in canary.clusters] == [(f"outbound|20880|v2|{HOST}", 1)]
    assert [(m.cluster, m.fraction) for m in mirrored.mirrors] == [(f"outbound|20880|v2|{HOST}", 100.0)]
    assert [(w.name, w.weight) for w in split.clusters] == [(f"outbound|20880|v1|{HOST}", 80), (f"outbound|20880|v2|{HOST}", 20)]
    assert split.request_mutation == {"x-routed-by": "metabridge"}
    by_name = loaded.config.clusters
    assert sorted(by_name) == sorted(f"outbound|20880|{s}|{HOST}" for s in ("", "v1", "v2"))
    assert [(e.address, e.port) for e in by_name[f"outbound|20880|v2|{HOST}"].endpoints] == [("127.0.0.1", 10202)]
    assert len(by_name[f"outbound|20880||{HOST}"].endpoints) == 2
    assert {c.lb_policy for c in by_name.values()} == {"LEAST_REQUEST"}  # the DestinationRule's simple: LEAST_REQUEST


def test_service_entry_endpoint_ports_default_to_the_service_port(tmp_path):
    raw = raw_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE))
    found = clusters(raw)
    assert found[f"outbound|20880|v1|{HOST}"]["endpoints"] == [{"address": "10.0.0.1", "port": 20880}]
    assert found[f"outbound|20880|v2|{HOST}"]["endpoints"] == [{"address": "10.0.0.2", "port": 20881}]
    # No MetaRouter: Aeraki's default route to the whole service.
    assert listener(raw)["routes"] == [{"name": "default", "route": {"cluster": f"outbound|20880||{HOST}"}}]


def test_match_attributes_mutations_mirror_percentage_and_destination_port(tmp_path):
    routes = """
    - name: by-attributes
      match:
        attributes:
          method: {prefix: say}
          version: {regex: "1\\\\..*"}
          x-trace: {}
      route:
        - destination: {host: com.example.greeter, subset: v1, port: {number: 20880}}
      mirror: {host: com.example.greeter, subset: v2}
      mirrorPercentage: {value: 12.5}
      requestMutation: [{key: a, value: b}]
      responseMutation: [{key: c, value: d}]
    """
    raw = raw_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(routes)))
    (route,) = listener(raw)["routes"]
    assert route == {
        "name": "by-attributes",
        "match": {"headers": [{"name": "method", "prefix": "say"}, {"name": "version", "regex": "1\\..*"}, {"name": "x-trace", "present": True}]},
        "route": {"cluster": f"outbound|20880|v1|{HOST}"},
        "request_mirror_policies": [{"cluster": f"outbound|20880|v2|{HOST}", "runtime_fraction": 12.5}],
        "request_mutation": [{"key": "a", "value": "b"}],
        "response_mutation": [{"key": "c", "value": "d"}],
    }


def test_service_with_pods_endpoints_and_endpoint_slices_in_lists_and_multi_document_files(tmp_path):
    service = """
    apiVersion: v1
    kind: Service
    metadata: {name: echo, namespace: shop}
    spec:
      selector: {app: echo}
      ports:
        - {name: tcp-metaprotocol-thrift-echo, port: 9090, targetPort: rpc}
        - {name: http-admin, port: 8080}
    ---
    apiVersion: v1
    kind: List
    items:
      - apiVersion: v1
        kind: Pod
        metadata: {name: echo-a, namespace: shop, labels: {app: echo, version: v1}}
        spec: {containers: [{name: c, ports: [{name: rpc, containerPort: 9191}]}]}
        status: {phase: Running, podIP: 10.1.0.1}
      - apiVersion: v1
        kind: Pod
        metadata: {name: echo-pending, namespace: shop, labels: {app: echo, version: v1}}
        status: {phase: Pending}
      - apiVersion: v1
        kind: Pod
        metadata: {name: other, namespace: shop, labels: {app: other}}
        status: {phase: Running, podIP: 10.1.0.9}
    """
    slices = """
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: echo-x1, namespace: shop, labels: {kubernetes.io/service-name: echo}}
    ports: [{name: tcp-metaprotocol-thrift-echo, port: 9191}]
    endpoints:
      - addresses: [10.1.0.2]
        targetRef: {kind: Pod, name: echo-b, namespace: shop}
      - addresses: [10.1.0.3]
        conditions: {ready: false}
    ---
    apiVersion: v1
    kind: Endpoints
    metadata: {name: echo, namespace: shop}
    subsets:
      - addresses: [{ip: 10.1.0.4}]
        ports: [{name: tcp-metaprotocol-thrift-echo, port: 9191}, {name: http-admin, port: 8080}]
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: echo-b, namespace: shop, labels: {app: echo, version: v2}}
    """
    rule = """
    apiVersion: networking.istio.io/v1alpha3
    kind: DestinationRule
    metadata: {name: echo, namespace: shop}
    spec:
      host: echo
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """
    raw = raw_of(write(tmp_path / "m", service=service, slices=slices, rule=rule))
    host = "echo.shop.svc.cluster.local"
    found = clusters(raw)
    assert [e["address"] for e in found[f"outbound|9090||{host}"]["endpoints"]] == ["10.1.0.1", "10.1.0.2", "10.1.0.4"]
    assert {e["port"] for e in found[f"outbound|9090||{host}"]["endpoints"]} == {9191}  # the named targetPort
    assert [e["address"] for e in found[f"outbound|9090|v1|{host}"]["endpoints"]] == ["10.1.0.1"]
    assert [e["address"] for e in found[f"outbound|9090|v2|{host}"]["endpoints"]] == ["10.1.0.2"]  # labels via targetRef
    (only,) = raw["listeners"]  # the http-admin port is not a MetaProtocol port
    assert (only["name"], only["codec"]) == (f"outbound|9090||{host}", "thrift")


def test_destination_rule_traffic_policy_maps_to_cluster_keys_and_hash_policy(tmp_path):
    rule = """
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: greeter, namespace: meta-dubbo}
    spec:
      host: com.example.greeter
      trafficPolicy:
        loadBalancer: {consistentHash: {httpHeaderName: method}}
        connectionPool: {tcp: {maxConnections: 7, connectTimeout: 250ms}, http: {http1MaxPendingRequests: 9}}
        outlierDetection: {consecutive5xxErrors: 3}
      subsets:
        - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}}
        - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {}}}}}
    """
    folder = write(tmp_path / "m", se=SERVICE_ENTRY, dr=rule, mr=metarouter(SPLIT))
    raw, warnings = mesh.build_raw(folder)
    found = clusters(raw)
    whole = found[f"outbound|20880||{HOST}"]
    assert (whole["lb_policy"], whole["connect_timeout"], whole["circuit_breakers"]) == ("RING_HASH", "250ms", {"max_connections": 7, "max_pending_requests": 9})
    assert found[f"outbound|20880|v1|{HOST}"]["lb_policy"] == "LEAST_REQUEST"
    assert found[f"outbound|20880|v2|{HOST}"]["lb_policy"] == "MAGLEV"
    # v1's own policy replaces the hash; v2 hashes on x-user.
    assert listener(raw)["routes"][0]["hash_policy"] == ["x-user"]
    assert any("DestinationRule/meta-dubbo/greeter: spec.trafficPolicy.outlierDetection: not supported yet; ignored" in w for w in warnings)


def test_rate_limits_become_the_listener_filters(tmp_path):
    limits = """
    localRateLimit:
      tokenBucket: {fillInterval: 60s, maxTokens: 10, tokensPerFill: 10}
      conditions:
        - match: {attributes: {method: {exact: sayHello}}}
          tokenBucket: {fillInterval: 10s, maxTokens: 2}
    globalRateLimit:
      domain: production
      match: {attributes: {method: {exact: sayHello}}}
      rateLimitService: outbound|8081||rate-limit-server.meta-dubbo.svc.cluster.local
      requestTimeout: 100ms
      denyOnFail: true
      descriptors: [{property: method, descriptorKey: method}]
    """
    rls = """
    apiVersion: v1
    kind: Service
    metadata: {name: rate-limit-server, namespace: meta-dubbo}
    spec: {selector: {app: rls}, ports: [{name: grpc, port: 8081}]}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: rls-0, namespace: meta-dubbo, labels: {app: rls}}
    status: {phase: Running, podIP: 10.9.0.1}
    """
    raw = raw_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(SPLIT, limits), rls=rls))
    assert listener(raw)["filters"] == [
        {
            "name": "local_ratelimit",
            "config": {
                "token_bucket": {"max_tokens": 10, "fill_interval": "60s", "tokens_per_fill": 10},
                "conditions": [{"token_bucket": {"max_tokens": 2, "fill_interval": "10s"}, "match": {"headers": [{"name": "method", "exact": "sayHello"}]}}],
            },
        },
        {
            "name": "ratelimit",
            "config": {
                "domain": "production",
                "descriptors": [{"property": "method", "descriptor_key": "method"}],
                "rls": {"address": "10.9.0.1:8081"},  # the Service's endpoint
                "failure_mode_deny": True,
                "timeout": "100ms",
                "match": {"headers": [{"name": "method", "exact": "sayHello"}]},
            },
        },
    ]


def test_rate_limit_service_outside_the_manifests_is_called_by_name(tmp_path):
    limits = """
    globalRateLimit:
      domain: d
      rateLimitService: outbound|8081||rls.infra.svc.cluster.local
      descriptors: [{property: method, descriptorKey: method}]
    """
    raw = raw_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(SPLIT, limits)))
    assert listener(raw)["filters"][0]["config"]["rls"] == {"address": "rls.infra.svc.cluster.local:8081"}


def test_private_protocol_codec_from_the_annotation_and_base_config_overrides(tmp_path):
    protocol = """
    apiVersion: metaprotocol.aeraki.io/v1alpha1
    kind: ApplicationProtocol
    metadata:
      name: awesomerpc
      annotations: {metabridge.io/codec: "../codecs/awesomerpc.py:AwesomeRpcCodec"}
    spec: {protocol: awesomerpc, codec: aeraki.meta_protocol.codec.awesomerpc}
    """
    service = SERVICE_ENTRY.replace("tcp-metaprotocol-dubbo", "tcp-metaprotocol-awesomerpc-front")
    folder = write(tmp_path / "m", ap=protocol, se=service)
    raw = raw_of(folder)
    assert raw["codecs"] == {"awesomerpc": {"ref": f"{(tmp_path / 'codecs/awesomerpc.py').resolve()}:AwesomeRpcCodec"}}
    assert listener(raw)["codec"] == "awesomerpc"

    base = tmp_path / "base.yaml"
    base.write_text("bridge: {listen: 'unix:/tmp/x.sock', workers: 2}\ncodecs:\n  awesomerpc: {ref: awesomerpc, options: {a: 1}}\n")
    loaded = mesh.load(folder, base)
    assert loaded.config.codecs["awesomerpc"].ref == "awesomerpc" and loaded.config.codecs["awesomerpc"].options == {"a": 1}
    assert (loaded.config.bridge_listen, loaded.config.workers) == ("unix:/tmp/x.sock", 2)
    assert loaded.config.source == f"{base} + {folder}"


def test_base_config_listeners_and_clusters_are_kept_beside_the_derived_ones(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        (ROOT / "examples/thrift.yaml").read_text().replace("../codecs/thrift:ThriftCodec", "thrift")
    )
    config = mesh.load(write(tmp_path / "m", se=SERVICE_ENTRY), base).config
    assert [listener.name for listener in config.listeners] == ["thrift", f"outbound|20880||{HOST}"]
    assert {"thrift-v1", "thrift-v2", f"outbound|20880||{HOST}"} == set(config.clusters)


def test_a_config_knows_what_it_was_read_from_and_is_read_again_from_it(tmp_path):
    """A reload (SIGHUP, POST /reload, the in-process module's start) reads the config again from
    where it came from: its file, or its manifests folder with its base."""
    from metabridge.config.live import ConfigSource

    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "examples/thrift.yaml").read_text().replace("../codecs/thrift:ThriftCodec", "thrift"))
    folder = write(tmp_path / "m", se=SERVICE_ENTRY)
    for config in (mesh.load(folder, base).config, mesh.load(folder).config, load(base)):
        again = ConfigSource.of(config).load()
        assert again == config and (again.config_file, again.manifests) == (config.config_file, config.manifests)
    assert mesh.load(folder, base).config.config_file == base.resolve() and mesh.load(folder).config.config_file is None
    assert load(base).manifests is None and mesh.load(folder).config.manifests == folder.resolve()
    parsed = dataclasses.replace(load(base), config_file=None)
    with pytest.raises(ConfigError, match="not read from a file"):
        ConfigSource.of(parsed)


def test_unrelated_kinds_are_ignored_and_a_lone_file_is_accepted(tmp_path):
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n"
    folder = write(tmp_path / "m", se=SERVICE_ENTRY + "---\n" + deployment)
    raw, warnings = mesh.build_raw(folder / "se.yaml")
    assert [entry["name"] for entry in raw["listeners"]] == [f"outbound|20880||{HOST}"] and warnings == ()


# -- errors and warnings -------------------------------------------------------------------------


def test_unknown_protocol_in_a_port_name(tmp_path):
    folder = write(tmp_path / "m", se=SERVICE_ENTRY.replace("tcp-metaprotocol-dubbo", "tcp-metaprotocol-brpc"))
    message = errors_of(folder)
    assert f"{folder / 'se.yaml'}: ServiceEntry/meta-dubbo/greeter: spec.ports[0].name: unknown protocol 'brpc'" in message
    assert "add an ApplicationProtocol with spec.protocol: brpc" in message and "(line 8)" in message


def test_private_protocol_without_a_codec(tmp_path):
    protocol = "apiVersion: metaprotocol.aeraki.io/v1alpha1\nkind: ApplicationProtocol\nmetadata: {name: brpc}\nspec: {protocol: brpc, codec: aeraki.meta_protocol.codec.brpc}\n"
    message = errors_of(write(tmp_path / "m", ap=protocol, se=SERVICE_ENTRY))
    assert "ApplicationProtocol/default/brpc: spec.codec: 'aeraki.meta_protocol.codec.brpc' is not a codec metabridge has" in message
    assert "metabridge.io/codec" in message and "codecs.brpc in the base config" in message


def test_port_name_off_the_convention(tmp_path):
    message = errors_of(write(tmp_path / "m", se=SERVICE_ENTRY.replace("tcp-metaprotocol-dubbo", "metaprotocol-dubbo")))
    assert "ServiceEntry/meta-dubbo/greeter: spec.ports[0].name: port name 'metaprotocol-dubbo' does not follow the rule tcp-metaprotocol-<protocol>[-<suffix>]" in message


def test_nothing_to_listen_on(tmp_path):
    message = errors_of(write(tmp_path / "m", se=SERVICE_ENTRY.replace("tcp-metaprotocol-dubbo", "tcp-dubbo")))
    assert "no Service or ServiceEntry port named tcp-metaprotocol-<protocol>[-<suffix>]" in message


def test_metarouter_for_an_unknown_host(tmp_path):
    folder = write(tmp_path / "m", se=SERVICE_ENTRY, mr=metarouter(SPLIT, hosts="[org.example.nothere]"))
    message = errors_of(folder)
    assert "MetaRouter/meta-dubbo/greeter: spec.hosts[0]: host org.example.nothere is not a Service or ServiceEntry in the manifests (known: com.example.greeter)" in message


def test_subset_not_in_any_destination_rule(tmp_path):
    routes = SPLIT.replace("subset: v2", "subset: v3")
    message = errors_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(routes)))
    assert "MetaRouter/meta-dubbo/greeter: spec.routes[0].route[1].destination.subset: subset 'v3' is not defined in a DestinationRule for com.example.greeter (subsets: v1, v2)" in message
    message = errors_of(write(tmp_path / "n", se=SERVICE_ENTRY, mr=metarouter(SPLIT)))
    assert "subset 'v1' is not defined in a DestinationRule for com.example.greeter (subsets: none: no DestinationRule for this host)" in message


def test_subset_that_selects_no_endpoint(tmp_path):
    rule = DESTINATION_RULE.replace("{version: v2}", "{version: v9}")
    folder = write(tmp_path / "m", se=SERVICE_ENTRY, dr=rule)
    raw, warnings = mesh.build_raw(folder)
    assert f"outbound|20880|v2|{HOST}" not in clusters(raw)
    assert any("DestinationRule/meta-dubbo/greeter: spec.subsets[1].labels: subset 'v2' selects no endpoint" in w for w in warnings)
    folder = write(tmp_path / "n", se=SERVICE_ENTRY, dr=rule, mr=metarouter(SPLIT))
    assert f"spec.routes[0].route[1].destination.subset: outbound|20880|v2|{HOST} has no endpoints" in errors_of(folder)


def test_destination_port_that_is_not_a_metaprotocol_port(tmp_path):
    routes = SPLIT.replace("subset: v2}", "subset: v2, port: {number: 9999}}")
    message = errors_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(routes)))
    assert "spec.routes[0].route[1].destination.port.number: com.example.greeter has no MetaProtocol port 9999 (its tcp-metaprotocol-* ports: 20880)" in message


def test_bad_weights_regex_durations_and_matches(tmp_path):
    routes = SPLIT.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 0") + textwrap.dedent("""
    - name: bad-regex
      match: {attributes: {method: {regex: "("}}}
      route: [{destination: {host: com.example.greeter}}]
    - name: two-kinds
      match: {attributes: {method: {exact: a, suffix: b}}}
      route: [{destination: {host: com.example.greeter}}]
    - name: no-destination
    """)
    limits = """
    localRateLimit:
      tokenBucket: {fillInterval: 60 seconds, maxTokens: 10}
    """
    message = errors_of(write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(routes, limits)))
    assert "spec.routes[0].route: the destinations' weights add up to 0; give each a weight" in message
    assert "spec.routes[1].match.attributes.method.regex: invalid regular expression" in message
    assert "spec.routes[2].match.attributes.method: expected one of exact, prefix, regex (got suffix, exact)" in message
    assert "spec.routes[3].route: a route needs at least one destination" in message
    assert "spec.localRateLimit.tokenBucket.fillInterval: '60 seconds' is not a duration" in message


def test_two_services_on_one_port(tmp_path):
    other = SERVICE_ENTRY.replace("name: greeter", "name: admin").replace("com.example.greeter", "com.example.admin")
    message = errors_of(write(tmp_path / "m", a=SERVICE_ENTRY, b=other))
    assert "b.yaml: ServiceEntry/meta-dubbo/admin: spec.ports[0]: port 20880 is also a MetaProtocol port of ServiceEntry/meta-dubbo/greeter (com.example.greeter)" in message


def test_service_without_endpoints(tmp_path):
    service = "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec:\n  selector: {app: echo}\n  ports: [{name: tcp-metaprotocol-thrift, port: 9090}]\n"
    message = errors_of(write(tmp_path / "m", s=service))
    assert "Service/default/echo: spec.ports[0]: port 9090 of echo.default.svc.cluster.local has no endpoints" in message


def test_unsupported_fields_are_warnings_naming_them(tmp_path):
    routes = SPLIT + "  timeout: 1s\n"
    folder = write(tmp_path / "m", se=SERVICE_ENTRY, dr=DESTINATION_RULE, mr=metarouter(routes, "exportTo: ['.']"))
    _, warnings = mesh.build_raw(folder)
    assert any("MetaRouter/meta-dubbo/greeter: spec.exportTo: not supported yet; ignored" in w for w in warnings)
    assert any("MetaRouter/meta-dubbo/greeter: spec.routes[0].timeout: not supported yet; ignored" in w for w in warnings)


def test_not_a_resource_and_wrong_api_version(tmp_path):
    message = errors_of(write(tmp_path / "m", x="- just\n- a list\n"))
    assert "document 1: not a Kubernetes resource (no 'kind')" in message
    odd = SERVICE_ENTRY.replace("networking.istio.io/v1beta1", "example.com/v1")
    folder = write(tmp_path / "n", se=SERVICE_ENTRY, odd=odd.replace("name: greeter", "name: odd"))
    _, warnings = mesh.build_raw(folder)
    assert any("ServiceEntry/meta-dubbo/odd: apiVersion: 'example.com/v1' is not the ServiceEntry metabridge reads" in w for w in warnings)


# -- the command line ------------------------------------------------------------------------------


def metabridge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metabridge.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_validate_and_render_the_example_manifests():
    result = metabridge("validate", "--manifests", "examples/mesh", "--no-envoy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "examples/mesh: OK (2 listener(s), 6 cluster(s))"
    result = metabridge("render", "--manifests", "examples/mesh/thrift")
    assert result.returncode == 0, result.stderr
    names = {entry["name"] for entry in yaml.safe_load(result.stdout)["static_resources"]["listeners"]}
    assert names == {"outbound|9090||echo.meta-thrift.svc.cluster.local"}


def test_cli_reports_manifest_errors_and_a_missing_input(tmp_path):
    folder = write(tmp_path / "m", se=SERVICE_ENTRY, mr=metarouter(SPLIT, hosts="[nothere]"))
    result = metabridge("validate", "--manifests", str(folder), "--no-envoy")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "MetaRouter/meta-dubbo/greeter: spec.hosts[0]: host nothere.meta-dubbo.svc.cluster.local is not a Service or ServiceEntry" in result.stderr
    result = metabridge("validate", "--no-envoy")
    assert result.returncode == 2 and "give -c CONFIG, --manifests DIR, or both" in result.stderr


def test_metarouter_with_only_a_rate_limit_keeps_the_default_route(tmp_path):
    router = """
    apiVersion: metaprotocol.aeraki.io/v1alpha1
    kind: MetaRouter
    metadata: {name: greeter, namespace: meta-dubbo}
    spec:
      hosts: [com.example.greeter]
      localRateLimit:
        tokenBucket: {fillInterval: 60s, maxTokens: 2, tokensPerFill: 2}
    """
    raw = raw_of(write(tmp_path / "m", se=SERVICE_ENTRY, mr=router))
    assert listener(raw)["routes"] == [{"name": "default", "route": {"cluster": f"outbound|20880||{HOST}"}}]
    assert listener(raw)["filters"] == [{"name": "local_ratelimit", "config": {"token_bucket": {"max_tokens": 2, "fill_interval": "60s", "tokens_per_fill": 2}}}]


def test_a_field_of_the_wrong_type_is_named_with_its_line(tmp_path):
    entry = SERVICE_ENTRY.replace("number: 20880", "number: twenty")
    rule = DESTINATION_RULE.replace("{version: v1}", "[version, v1]")
    message = errors_of(write(tmp_path / "m", se=entry, dr=rule))
    assert "ServiceEntry/meta-dubbo/greeter: spec.ports[0].number: 'twenty' is not of type 'integer' (line 8)" in message
    assert "DestinationRule/meta-dubbo/greeter: spec.subsets[0].labels: ['version', 'v1'] is not of type 'object' (line 8)" in message
