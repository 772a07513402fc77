"""Route retries and request mirroring in the core (through the ext_proc transport, fake HCM)."""

from __future__ import annotations

from metabridge.config.model import ClusterConfig, Endpoint, HeaderMatch, MirrorPolicy, RetryPolicy, RouteConfig, WeightedCluster
from tests.unit.connection_harness import CLOSE, TIMEOUT, UNSPECIFIED, AwesomeRpcCodec, Harness, encode_frame, in_loop, parse_frames, wait_until

HOST = b"x-metabridge-host"


def clusters() -> dict[str, ClusterConfig]:
    two = tuple(Endpoint("127.0.0.1", 10001 + i) for i in range(2))
    return {"c1": ClusterConfig("c1", two), "shadow": ClusterConfig("shadow", (Endpoint("127.0.0.1", 10009),))}


def route(retry: RetryPolicy | None = None, mirrors=()) -> RouteConfig:
    return RouteConfig("r", (HeaderMatch("cmd", "exact", "1"),), (WeightedCluster("c1", 1),), {}, {}, retry=retry, mirrors=tuple(mirrors))


def harness(**kw) -> Harness:
    return Harness(routes=(route(**kw),), clusters=clusters())


def received(h: Harness) -> dict[int, list[int]]:
    return {sid: [flow for flow, *_ in parse_frames(bytes(data))] for sid, data in h.hcm.received.items()}


@in_loop
async def test_a_reset_mid_request_is_retried_once_on_the_other_host():
    h = harness(retry=RetryPolicy(num_retries=1, retry_on=frozenset({"reset"})))
    h.read(encode_frame(1, 1))
    first = next(iter(h.hcm.requests))
    h.hcm.accept(first)
    h.hcm.h2.reset_stream(first)
    h.write()
    assert len(h.hcm.requests) == 2, "a second tunnel, to the other host"
    second = max(h.hcm.requests)
    assert h.hcm.requests[second][HOST] != h.hcm.requests[first][HOST]
    assert received(h)[second] == [1] and h.client_frames() == []
    h.hcm.accept(second)
    h.hcm.send(second, encode_frame(1, 1, b"ok"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"ok")] and h.stats.request_retry == 1


@in_loop
async def test_without_a_retry_policy_a_reset_is_an_error_reply():
    h = harness()
    h.read(encode_frame(1, 1))
    sid = next(iter(h.hcm.requests))
    h.hcm.accept(sid)
    h.hcm.h2.reset_stream(sid)
    h.write()
    assert h.client_frames() == [(1, 1, UNSPECIFIED, b"")] and h.stats.request_retry == 0


@in_loop
async def test_per_try_timeout_retries_and_the_late_first_answer_is_dropped():
    h = Harness(routes=(route(retry=RetryPolicy(num_retries=1, retry_on=frozenset({"timeout"}), per_try_timeout=0.05)),), clusters=clusters(), request_timeout=5.0)
    h.read(encode_frame(1, 1))
    first = next(iter(h.hcm.requests))
    await wait_until(lambda: len(h.hcm.requests) == 2, "the retry after the per-try timeout")
    second = max(h.hcm.requests)
    for sid, body in ((first, b"late"), (second, b"retried")):
        h.hcm.accept(sid)
        h.hcm.send(sid, encode_frame(1, 1, body))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"retried")], "exactly one reply: the late first answer is dropped"


@in_loop
async def test_retries_stop_at_num_retries_with_one_error_reply():
    h = Harness(routes=(route(retry=RetryPolicy(num_retries=1, retry_on=frozenset({"timeout"}), per_try_timeout=0.03)),), clusters=clusters(), request_timeout=5.0)
    h.read(encode_frame(1, 1))
    await wait_until(lambda: h.client_frames(), "the final timeout")
    assert h.client_frames() == [(1, 1, TIMEOUT, b"")] and len(h.hcm.requests) == 2


@in_loop
async def test_a_retriable_error_response_is_retried_instead_of_passed_on():
    h = harness(retry=RetryPolicy(num_retries=1, retry_on=frozenset({"retriable_error"})))
    h.read(encode_frame(1, 1))
    first = next(iter(h.hcm.requests))
    h.hcm.accept(first)
    h.hcm.send(first, encode_frame(1, 1, rsp_code=503))
    h.write()
    second = max(h.hcm.requests)
    assert second != first and h.client_frames() == []
    h.hcm.accept(second)
    h.hcm.send(second, encode_frame(1, 1, b"ok"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"ok")]


class BrokenRetriableCodec(AwesomeRpcCodec):
    def is_retriable(self, response):
        raise KeyError("rsp_code")


@in_loop
async def test_an_exception_from_is_retriable_passes_the_response_on_and_counts_a_codec_error():
    h = Harness(routes=(route(retry=RetryPolicy(num_retries=1, retry_on=frozenset({"retriable_error"}))),), clusters=clusters(), codec_cls=BrokenRetriableCodec)
    h.read(encode_frame(1, 1))
    first = next(iter(h.hcm.requests))
    h.hcm.accept(first)
    h.hcm.send(first, encode_frame(1, 1, rsp_code=503))
    h.write()
    assert h.client_frames() == [(1, 1, 503, b"")]
    assert list(h.hcm.requests) == [first] and h.stats.codec_error == 1


@in_loop
async def test_a_mirror_gets_a_copy_and_its_answer_never_reaches_the_client():
    h = harness(mirrors=[MirrorPolicy("shadow", 100)])
    h.read(encode_frame(1, 1, b"x"))
    by_cluster = {r[b"x-metabridge-cluster"]: sid for sid, r in h.hcm.requests.items()}
    assert set(by_cluster) == {b"c1", b"shadow"}
    assert received(h)[by_cluster[b"shadow"]] == [1]
    for sid in by_cluster.values():
        h.hcm.accept(sid)
    h.hcm.send(by_cluster[b"shadow"], encode_frame(1, 1, b"from the mirror"))
    h.write()
    assert h.client_frames() == [], "the mirror's answer is dropped"
    h.hcm.send(by_cluster[b"c1"], encode_frame(1, 1, b"primary"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"primary")]
    assert (h.stats.mirror_sent, h.stats.mirror_response, h.stats.request_active) == (1, 1, 0)


@in_loop
async def test_a_failing_or_silent_mirror_never_touches_the_primary():
    h = Harness(routes=(route(mirrors=[MirrorPolicy("shadow", 100)]),), clusters=clusters(), request_timeout=0.05)
    h.read(encode_frame(1, 1))
    by_cluster = {r[b"x-metabridge-cluster"]: sid for sid, r in h.hcm.requests.items()}
    h.hcm.refuse(by_cluster[b"shadow"], b"NC")
    h.hcm.accept(by_cluster[b"c1"])
    h.hcm.send(by_cluster[b"c1"], encode_frame(1, 1, b"primary"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"primary")] and h.stats.mirror_failed == 1
    h.read(encode_frame(2, 1))  # now a mirror that never answers: it times out quietly
    await wait_until(lambda: h.stats.mirror_failed == 2, "the silent mirror's deadline")
    assert h.client_frames() == [(1, 1, 0, b"primary"), (2, 1, TIMEOUT, b"")], "only the primary's own timeout is answered"


@in_loop
async def test_copies_unanswered_when_the_client_leaves_are_counted_abandoned():
    """The client's connection carries the tunnels (Envoy ends them with it): a copy whose
    answer has not come when the client leaves is abandoned, counted and logged, not lost
    silently; the primary's accounting is untouched."""
    h = harness(mirrors=[MirrorPolicy("shadow", 100)])
    h.read(encode_frame(1, 1, b"x") + encode_frame(2, 1, b"y"))
    shadow = next(sid for sid, r in h.hcm.requests.items() if r[b"x-metabridge-cluster"] == b"shadow")
    for sid, flows in received(h).items():
        if sid != shadow:  # the primaries' tunnels (one per host) answer; the shadow's is still being set up
            h.hcm.accept(sid)
            for flow in flows:
                h.hcm.send(sid, encode_frame(flow, 1, b"primary"))
    h.write()
    assert sorted(h.client_frames()) == [(1, 1, 0, b"primary"), (2, 1, 0, b"primary")]
    assert received(h)[shadow] == [1, 2], "both copies were handed to HCM"
    h.close()  # the client leaves right after its replies
    mirror = h.stats.mirror("r", "shadow")
    assert (mirror.mirror_sent, mirror.mirror_response, mirror.mirror_failed, mirror.mirror_abandoned) == (2, 0, 0, 2)
    assert (h.stats.request_active, h.stats.downstream_cx_active, h.stats.cx_destroy_remote_with_active_rq) == (0, 0, 0)


@in_loop
async def test_a_client_fin_waits_for_the_mirror_copies():
    """When the connection itself decides to end (the client's FIN, a drain), it waits for
    the copies in flight as for its own requests: bounded by their deadline."""
    h = Harness(routes=(route(mirrors=[MirrorPolicy("shadow", 100)]),), clusters=clusters(), request_timeout=0.05)
    h.read(encode_frame(1, 1, b"x"))
    by_cluster = {r[b"x-metabridge-cluster"]: sid for sid, r in h.hcm.requests.items()}
    for sid in by_cluster.values():
        h.hcm.accept(sid)
    h.hcm.send(by_cluster[b"c1"], encode_frame(1, 1, b"primary"))
    h.write()
    answer = h.read(b"", end_of_stream=True)
    assert not any(m.connection_status == CLOSE for m in answer + h.emitted), "the copy is still in flight"
    h.hcm.send(by_cluster[b"shadow"], encode_frame(1, 1, b"mirror"))
    closing = h.write()
    assert any(m.connection_status == CLOSE for m in closing), "closed once the copy was answered"
    assert h.client_frames() == [(1, 1, 0, b"primary")] and h.stats.mirror("r", "shadow").mirror_response == 1
    # A copy that never answers holds the end only until its deadline.
    h = Harness(routes=(route(mirrors=[MirrorPolicy("shadow", 100)]),), clusters=clusters(), request_timeout=0.05)
    h.read(encode_frame(1, 1, b"x"))
    by_cluster = {r[b"x-metabridge-cluster"]: sid for sid, r in h.hcm.requests.items()}
    h.hcm.accept(by_cluster[b"c1"])
    h.hcm.send(by_cluster[b"c1"], encode_frame(1, 1, b"primary"))
    h.write()
    h.read(b"", end_of_stream=True)
    await wait_until(lambda: any(m.connection_status == CLOSE for m in h.emitted), "the end after the copy's deadline")
    assert h.stats.mirror("r", "shadow").mirror_failed == 1 and h.client_frames() == [(1, 1, 0, b"primary")]


@in_loop
async def test_the_mirror_fraction_holds():
    h = harness(mirrors=[MirrorPolicy("shadow", 25)])
    h.read(b"".join(encode_frame(i, 1) for i in range(1, 801)))
    assert 140 <= h.stats.mirror_sent <= 260, h.stats.mirror_sent  # 200 expected; 5 sigma is ±61


# ---- consistent hashing -------------------------------------------------------------------------------

HASH = b"x-metabridge-hash-key"


def hashed_harness() -> Harness:
    ring = {"ring": ClusterConfig("ring", tuple(Endpoint("127.0.0.1", 10001 + i) for i in range(3)), lb_policy="RING_HASH")}
    catch_all = RouteConfig("by-cmd", (), (WeightedCluster("ring", 1),), {}, {}, hash_policy=("cmd",))
    return Harness(routes=(catch_all,), clusters=ring)


@in_loop
async def test_each_new_key_asks_envoys_ring_and_keys_on_one_host_share_its_tunnel():
    h = hashed_harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2) + encode_frame(3, 1))
    assert {sid: r[HASH] for sid, r in h.hcm.requests.items()} == {1: b"1", 3: b"2"}, "one tunnel per new key"
    assert HOST not in h.hcm.requests[1], "the hash chooses the host, not the bridge"
    assert received(h) == {1: [1, 3], 3: [2]}
    h.hcm.accept(1, host=b"10.0.0.1:1")
    h.hcm.accept(3, host=b"10.0.0.1:1")  # key 2 hashes to the same host as key 1
    h.write()
    h.hcm.send(3, encode_frame(2, 2, b"two"))
    h.write()
    assert 3 in h.hcm.ended, "the second tunnel to one host is retired once idle"
    h.read(encode_frame(4, 2))
    assert received(h)[1] == [1, 3, 4], "key 2 now rides key 1's tunnel: same host"
    assert h.client_frames() == [(2, 2, 0, b"two")]


@in_loop
async def test_when_a_hosts_tunnel_ends_only_its_keys_are_looked_up_again():
    h = hashed_harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    h.hcm.accept(1, host=b"10.0.0.1:1")
    h.hcm.accept(3, host=b"10.0.0.2:1")
    h.hcm.send(1, encode_frame(1, 1))
    h.hcm.send(3, encode_frame(2, 2))
    h.write()
    h.hcm.h2.reset_stream(1)  # host 1 goes away
    h.write()
    h.read(encode_frame(3, 1) + encode_frame(4, 2))
    assert h.hcm.requests[max(h.hcm.requests)][HASH] == b"1", "key 1 asks the ring again"
    assert received(h)[3] == [2, 4], "key 2 stays on its host"
