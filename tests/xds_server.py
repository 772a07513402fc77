"""A state-of-the-world xDS server for tests: a real grpcio server serving RouteConfigurations
over RouteDiscoveryService.StreamRoutes and AggregatedDiscoveryService, like a MetaProtocol
control plane does.

``push(configs)`` makes a new version and sends it on every open stream (a stream opened later
gets the current version first); every DiscoveryRequest received is recorded with its stream, so
a test waits for the ACK or NACK it expects (``wait_for``). With ``tls`` (CA, certificate, key
files) it serves TLS and requires a client certificate signed by the CA (mTLS); the common name
of each stream's client certificate is recorded.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.route import v3 as route_v3
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.type import v3 as type_v3
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.protobuf import Any

TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


@dataclass
class Received:
    stream: int  # which stream (1, 2, ... in the order they were opened)
    request: DiscoveryRequest
    client_cn: str | None  # the client certificate's common name (mTLS)
    method: str = ""  # the RPC the stream is: RDS's StreamRoutes or ADS's StreamAggregatedResources

    @property
    def nack(self) -> bool:
        return self.request.error_detail is not None

    @property
    def error(self) -> str | None:
        return self.request.error_detail.message if self.request.error_detail is not None else None


class XdsServer:
    def __init__(self, address: str = "127.0.0.1:0", tls: tuple[Path, Path, Path] | None = None) -> None:
        self._lock = threading.Condition()
        self._streams: dict[int, queue.Queue] = {}
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._versions = itertools.count(1)
        self.version: str | None = None
        self.nonce: str | None = None  # of the latest push
        self._resources: list[Any] = []
        self.received: list[Received] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        def handler(method: str):
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(requests, context, method), request_deserializer=DiscoveryRequest.FromString, response_serializer=DiscoveryResponse.SerializeToString
            )

        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("envoy.service.route.v3.RouteDiscoveryService", {"StreamRoutes": handler("/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes")}),
                grpc.method_handlers_generic_handler(
                    "envoy.service.discovery.v3.AggregatedDiscoveryService",
                    {"StreamAggregatedResources": handler("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")},
                ),
            )
        )
        if tls is None:
            port = self._server.add_insecure_port(address)
        else:
            ca, cert, key = (Path(p).read_bytes() for p in tls)
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            port = self._server.add_secure_port(address, credentials)
        self.address = address if address.startswith("unix:") else f"{address.rpartition(':')[0]}:{port}"

    def start(self) -> XdsServer:
        self._server.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for out in self._streams.values():
                out.put(None)
        self._server.stop(grace=0).wait()

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def push(self, configs: Iterable[RouteConfiguration], version: str | None = None) -> tuple[str, str]:
        """A new version of the route configurations, sent on every open stream; (version, nonce)."""
        with self._lock:
            self.version = version or str(next(self._versions))
            self._resources = [Any(type_url=TYPE_URL, value=bytes(config)) for config in configs]
            response = self._response()
            for out in self._streams.values():
                out.put(response)
            return self.version, response.nonce

    def push_raw(self, resources: list[Any], type_url: str = TYPE_URL) -> str:
        """Resources as they are (not necessarily RouteConfigurations); returns the nonce."""
        with self._lock:
            self.version = str(next(self._versions))
            self._resources = resources
            response = self._response(type_url)
            for out in self._streams.values():
                out.put(response)
            return response.nonce

    def _response(self, type_url: str = TYPE_URL) -> DiscoveryResponse:
        self.nonce = str(next(self._nonces))
        return DiscoveryResponse(version_info=self.version, resources=list(self._resources), type_url=type_url, nonce=self.nonce)

    def wait_for(self, check: Callable[[Received], bool], timeout: float = 10.0, what: str = "a request") -> Received:
        """The first recorded request ``check`` holds for, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for received in self.received:
                    if check(received):
                        return received
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r.stream, r.request.version_info, r.request.response_nonce, r.error) for r in self.received]
                    raise TimeoutError(f"xDS server: no {what} within {timeout}s; received (stream, version, nonce, error): {seen}")
                self._lock.wait(left)

    def wait_streams(self, check: Callable[[Received], bool], streams: int, timeout: float = 10.0, what: str = "a request") -> list[Received]:
        """The first request ``check`` holds for on each of ``streams`` different streams."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found: dict[int, Received] = {}
                for received in self.received:
                    if received.stream not in found and check(received):
                        found[received.stream] = received
                if len(found) >= streams:
                    return list(found.values())
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r.stream, r.request.version_info, r.request.response_nonce, r.error) for r in self.received]
                    raise TimeoutError(f"xDS server: {what} on {len(found)} of {streams} streams within {timeout}s; received (stream, version, nonce, error): {seen}")
                self._lock.wait(left)

    def _stream(self, requests, context, method: str):
        out: queue.Queue = queue.Queue()
        client_cn = None
        if context.auth_context().get("x509_common_name"):
            client_cn = context.auth_context()["x509_common_name"][0].decode()
        with self._lock:
            stream = next(self._stream_ids)
            self._streams[stream] = out

        def read() -> None:
            first = True
            try:
                for request in requests:
                    with self._lock:
                        self.received.append(Received(stream, request, client_cn, method))
                        if first and self.version is not None:
                            out.put(self._response())
                        self._lock.notify_all()
                    first = False
            except grpc.RpcError:
                pass
            finally:
                out.put(None)

        threading.Thread(target=read, daemon=True, name=f"xds-stream-{stream}").start()
        context.add_callback(lambda: out.put(None))
        try:
            while True:
                response = out.get()
                if response is None:
                    return
                yield response
        finally:
            with self._lock:
                self._streams.pop(stream, None)
                self._lock.notify_all()


def aeraki_route(
    name: str,
    *,
    cluster: str | None = None,
    weighted: list[tuple[str, int]] | None = None,
    exact: dict[str, str] | None = None,
    prefix: dict[str, str] | None = None,
    regex: dict[str, str] | None = None,
    present: list[str] | None = None,
    hash_keys: list[str] | None = None,
    mirror: tuple[str, float] | None = None,
    request_mutation: dict[str, str] | None = None,
    response_mutation: dict[str, str] | None = None,
) -> route_v3.Route:
    """A MetaRouter route the way Aeraki's control plane writes it into a RouteConfiguration:
    prefix '/' plus header matchers for the attributes, a cluster or weighted clusters (with
    total_weight), hash policy by header, one mirror with a fraction of a million, mutations as
    request/response_headers_to_add."""
    headers = [route_v3.HeaderMatcher(name=k, exact_match=v) for k, v in (exact or {}).items()]
    headers += [route_v3.HeaderMatcher(name=k, prefix_match=v) for k, v in (prefix or {}).items()]
    headers += [route_v3.HeaderMatcher(name=k, safe_regex_match=matcher.RegexMatcher(google_re2=matcher.RegexMatcherGoogleRe2(), regex=v)) for k, v in (regex or {}).items()]
    headers += [route_v3.HeaderMatcher(name=k, present_match=True) for k in present or ()]
    action = route_v3.RouteAction()
    if weighted is not None:
        action.weighted_clusters = route_v3.WeightedCluster(
            clusters=[route_v3.WeightedClusterClusterWeight(name=n, weight=w) for n, w in weighted], total_weight=sum(w for _, w in weighted)
        )
    else:
        action.cluster = cluster
    action.hash_policy = [route_v3.RouteActionHashPolicy(header=route_v3.RouteActionHashPolicyHeader(header_name=k)) for k in hash_keys or ()]
    if mirror is not None:
        fraction = core.RuntimeFractionalPercent(default_value=type_v3.FractionalPercent(numerator=int(mirror[1] * 10000), denominator=type_v3.FractionalPercentDenominatorType.MILLION))
        action.request_mirror_policies = [route_v3.RouteActionRequestMirrorPolicy(cluster=mirror[0], runtime_fraction=fraction)]

    def options(items):
        return [core.HeaderValueOption(header=core.HeaderValue(key=k, value=v)) for k, v in (items or {}).items()]

    return route_v3.Route(
        name=name,
        match=route_v3.RouteMatch(prefix="/", headers=headers),
        route=action,
        request_headers_to_add=options(request_mutation),
        response_headers_to_add=options(response_mutation),
    )


def aeraki_route_config(name: str, routes: list[route_v3.Route]) -> RouteConfiguration:
    """Aeraki's RouteConfiguration: named HOST_PORT, one virtual host 'dummy' for every domain."""
    return RouteConfiguration(name=name, virtual_hosts=[route_v3.VirtualHost(name="dummy", domains=["*"], routes=routes)])


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1 / xds.test and a client certificate
    (common name metabridge-client), made with openssl; the files by name (ca, server, server_key,
    client, client_key)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", files["ca_key"], "-out", files["ca"], "-days", "2", "-subj", "/CN=metabridge-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, extensions in (
        ("server", "xds.test", "subjectAltName=DNS:xds.test,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "metabridge-client", "extendedKeyUsage=clientAuth\n"),
    ):
        csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
        ext.write_text(extensions)
        _openssl("req", *ec, "-keyout", files[f"{name}_key"], "-out", csr, "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", files["ca_key"], "-set_serial", str(int(time.time() * 1000) + len(name)), "-days", "2", "-out", files[name], "-extfile", ext)
    return files


def _openssl(*args) -> None:
    import subprocess

    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
