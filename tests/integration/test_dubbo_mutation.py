"""request_mutation and response_mutation through a real Envoy and the bridge, on Dubbo messages
whose attachments use what the arguments (requests) or the result (responses) defined.

Hessian2 numbers class definitions, type names and object slots per body, so an attachment may
be an object of a class an argument defined (written ``0x60`` + fields, no class name), a list
naming its type by the number of one an argument wrote, or a back-reference (``Q``) to an
argument. The codec splices the mutated attachments at the offsets it found while reading the
whole body (it used to read the map on its own and fail with HessianError); these tests check
that end to end, with independent Hessian2 code on both sides:

- the requests are written by dubbo-ssl-python's consumer (``call``, or its encoder sent over a
  raw socket), or are hand-built byte vectors with the forms that writer does not use;
- providers are scripted: they read every frame they receive with dubbo-ssl-python's reader and
  answer with bodies written by its writer (dubbo-py's provider cannot read these bodies, and
  dubbo-ssl-python's consumer cannot read result types with attachments, so the response side
  is read over a raw socket);
- a dubbo-py provider behind another route serves healthy calls on other connections meanwhile.

On a failure, the assertion message holds the bytes sent, the bytes that arrived and the
bridge's log lines about the codec (in-process: the core's lines in Envoy's log).

Every test runs in both modes (the ``proxy`` fixture's parameter): the bridge process behind
ext_proc, and the core inside Envoy (bridge.mode inprocess, docs/inprocess.md). Nothing here is
about the bridge as a separate process.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.harness import MODES, Proxy, proxy_factory, stack_class
from tests.peers.dubbo_peers import (
    ConsumerError,
    JavaObject,
    ScriptedProvider,
    call,
    call_raw,
    exchange_raw,
    read_body_with_dubbo_ssl,
    request_with_dubbo_ssl,
    response_frame,
    start_provider,
    write_with_dubbo_ssl,
)

HOST = "127.0.0.1"
DUBBO_CODEC = "codecs/dubbo:DubboCodec"
RECORDER = "com.example.Recorder"  # request_mutation route: a scripted provider that records
PROFILES = "com.example.Profiles"  # response_mutation route: a scripted provider answering with attachments
GREETER = "com.example.Greeter"  # no mutation: a dubbo-py provider, for the healthy calls
USER = "com.example.User"
REQUEST_MUTATION = {"x-routed-by": "metabridge", "x-tag": "green"}  # one added, one replaced in place
RESPONSE_MUTATION = {"x-tag": "green", "x-served-via": "metabridge"}
STATUS_OK, SERVICE_ERROR = 20, 70


def s(text: str) -> bytes:
    """A short ASCII Hessian2 string (length byte, bytes): for the hand-built vectors."""
    raw = text.encode("ascii")
    assert len(raw) < 32
    return bytes([len(raw)]) + raw


def request_frame(request_id: int, body: bytes) -> bytes:
    return struct.pack(">HBBqi", 0xDABB, 0xC2, 0, request_id, len(body)) + body


# -- what is sent ----------------------------------------------------------------------------------

# save(User{ann, 3}, [1, 2, 3]) with attachments owner = User{bob, 4} (class #0, defined by the
# first argument: written 0x60 + fields) and ids = [7, 8] (type '[int' by number, written by the
# second); the shape of PEER_CROSSING_REQUEST_BODY in tests/unit/test_dubbo_codec.py.
PEER_ARGS = [JavaObject(USER, {"name": "ann", "age": 3}), [1, 2, 3]]
PEER_ATTACHMENTS = {"owner": JavaObject(USER, {"name": "bob", "age": 4}), "ids": [7, 8], "x-tag": "blue"}

# Hand-built (HAND_CROSSING_REQUEST_BODY of the unit tests, for RECORDER): a class by number
# ('O'), a typed list naming its type by number, back-references. Object slots: #0 ann, #1 her
# tags, #2 the map argument, #3 cat, #4 cat's tags, #5 the attachments map, #6 bob, #7 bob's tags.
HAND_ARGUMENTS = (
    s("2.0.2") + s(RECORDER) + s("1.0.0") + s("save") + s("Lcom/example/U;Ljava/util/Map;")
    + b"C" + s("com.example.U") + b"\x92" + s("name") + s("tags")
    + b"\x60" + s("ann") + b"V" + s("[string") + b"\x91" + s("a")
    + b"H" + s("k") + b"O\x90" + s("cat") + b"\x70\x90" + b"Z"
)
HAND_REQUEST_BODY = (
    HAND_ARGUMENTS
    + b"H"
    + s("owner") + b"\x60" + s("bob") + b"\x71\x90" + s("b")  # class #0 and type #0 from the arguments
    + s("same") + b"\x51\x90"  # the first argument itself
    + s("x-tag") + s("blue")
    + b"Z"
)

# The PROFILES provider's answers. profile(): OK with attachments (result type 4), the value
# User{ann, ids [1, 2]}, attachments owner = User{bob, ids [7, 8]} (class #0 and type '[int' by
# number, both defined by the value) and x-tag = blue, all by one dubbo-ssl-python writer.
PROFILE_VALUE = JavaObject(USER, {"name": "ann", "ids": [1, 2]})
PROFILE_ATTACHMENTS = {"owner": JavaObject(USER, {"name": "bob", "ids": [7, 8]}), "x-tag": "blue"}
PROFILE_RESULT = write_with_dubbo_ssl(4, PROFILE_VALUE)  # result type and value: the bytes the consumer must get
PROFILE_BODY = write_with_dubbo_ssl(4, PROFILE_VALUE, attachments=PROFILE_ATTACHMENTS)
# broken(): an exception with attachments (result type 3), hand-built: the cause is an object of
# the exception's class, "again" refers back to the exception (slot #0).
BROKEN_RESULT = b"\x93" + b"C" + s("java.lang.RuntimeException") + b"\x91" + s("detailMessage") + b"\x60" + s("boom")
BROKEN_BODY = BROKEN_RESULT + b"H" + s("cause") + b"\x60" + s("inner") + s("again") + b"\x51\x90" + s("x-tag") + s("blue") + b"Z"


# -- scripted providers ------------------------------------------------------------------------------


def _request_id(frame: bytes) -> int:
    return struct.unpack_from(">q", frame, 4)[0]


def _heartbeat_reply(frame: bytes) -> bytes | None:
    if frame[2] & 0x40:  # two-way event
        return struct.pack(">HBBqi", 0xDABB, 0x22, STATUS_OK, _request_id(frame), 1) + b"N"
    return None


def _unreadable(name: str, frame: bytes, exc: Exception) -> bytes:
    """A SERVICE_ERROR reply saying why the provider could not read a frame: the consumer fails at
    once with the reason instead of waiting for its timeout."""
    message = f"{name}: dubbo-ssl-python cannot read the request: {exc!r}; body {frame[16:].hex()}"
    return response_frame(_request_id(frame), write_with_dubbo_ssl(message), status=SERVICE_ERROR)


def answer_recorder(frame: bytes) -> bytes | None:
    """save(user, ...) -> "saved <user's name> via <x-routed-by>", read from the request with
    dubbo-ssl-python's reader (so the answer shows the provider could read it)."""
    if frame[2] & 0x20:
        return _heartbeat_reply(frame)
    try:
        values = read_body_with_dubbo_ssl(frame)
        answer = f"saved {values[5]['name']} via {values[-1].get('x-routed-by')}"
    except Exception as exc:  # noqa: BLE001 - reported to the consumer
        return _unreadable("recorder", frame, exc)
    return response_frame(_request_id(frame), write_with_dubbo_ssl(1, answer))


def answer_profiles(frame: bytes) -> bytes | None:
    """profile() -> PROFILE_BODY, broken() -> BROKEN_BODY."""
    if frame[2] & 0x20:
        return _heartbeat_reply(frame)
    try:
        method = read_body_with_dubbo_ssl(frame)[3]
    except Exception as exc:  # noqa: BLE001 - reported to the consumer
        return _unreadable("profiles", frame, exc)
    bodies = {"profile": PROFILE_BODY, "broken": BROKEN_BODY}
    if method not in bodies:
        return response_frame(_request_id(frame), write_with_dubbo_ssl(f"profiles: no method {method}"), status=SERVICE_ERROR)
    return response_frame(_request_id(frame), bodies[method])


# -- the stack -----------------------------------------------------------------------------------------


def route(cluster: str, interface: str, **extra) -> dict:
    return {"name": cluster, "match": {"headers": [{"name": "interface", "exact": interface}]}, "route": {"cluster": cluster}, **extra}


def kv(mutation: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in mutation.items()]


@pytest.fixture(params=MODES)
def proxy(request, tmp_path) -> Iterator[Proxy]:
    """One dubbo listener with three routes: RECORDER (request_mutation) and PROFILES
    (response_mutation) to scripted providers, GREETER (no mutation) to a dubbo-py provider."""
    backends = {
        "recorder": lambda: ScriptedProvider(answer_recorder),
        "profiles": lambda: ScriptedProvider(answer_profiles),
        "greeter": lambda: start_provider(GREETER, name="greeter"),
    }
    routes = [
        route("recorder", RECORDER, request_mutation=kv(REQUEST_MUTATION)),
        route("profiles", PROFILES, response_mutation=kv(RESPONSE_MUTATION)),
        route("greeter", GREETER),
    ]
    mode = request.param
    with proxy_factory(tmp_path, codec="dubbo", ref=DUBBO_CODEC, example="examples/dubbo.yaml", start_backend=lambda cluster, start: start(), stack_cls=stack_class(mode), bridge={"mode": mode}) as make:
        yield make({cluster: backends[cluster] for cluster in backends}, routes)


def bridge_codec_lines(p: Proxy) -> str:
    """The bridge's log lines about codecs and mutations (for failure messages)."""
    lines = [line for line in p.stack.log("bridge").splitlines() if any(word in line.lower() for word in ("codec", "mutation", "error", "hessian", "traceback", "bad_request"))]
    return "\n".join(lines[-30:]) or "(none)"


def report(p: Proxy, what: str, sent: bytes, arrived) -> str:
    """A failure message: the frame sent, what arrived (a frame, or the frames a provider
    received) and the bridge's codec log lines."""
    if isinstance(arrived, (bytes, bytearray)):
        arrived_text = arrived.hex()
    elif isinstance(arrived, list):
        arrived_text = f"{len(arrived)} frame(s) at the provider: " + ", ".join(frame.hex() for frame in arrived)
    else:
        arrived_text = repr(arrived)
    return f"{what}\nsent:    {sent.hex()}\narrived: {arrived_text}\nbridge log:\n{bridge_codec_lines(p)}"


def assert_healthy(p: Proxy, tag: str) -> None:
    """Calls without mutation on connections of their own succeed: dubbo-py's consumer on a fresh
    connection, and dubbo-ssl-python's (its pooled connection)."""
    raw = call_raw(HOST, p.port, GREETER, "whoami", request_id=900, timeout=5)
    assert (raw.status, raw.data) == (STATUS_OK, "greeter"), f"{tag}: {raw.status} {raw.data!r} {raw.error!r}\n{bridge_codec_lines(p)}"
    assert call(HOST, p.port, GREETER, "echo", [tag]) == tag


def assert_no_codec_errors(p: Proxy) -> None:
    log = p.stack.log("bridge")
    assert "codec_error" not in log and "Traceback" not in log and "cannot be applied" not in log, bridge_codec_lines(p)


# -- request side --------------------------------------------------------------------------------------


def check_recorded(p: Proxy, received: bytes, sent: bytes, arguments_end: int) -> None:
    """The provider got the sent body with the arguments byte for byte, the original attachments
    intact (object values included) and REQUEST_MUTATION applied."""
    assert received[4:12] == sent[4:12], report(p, "request id changed", sent, received)
    assert struct.unpack_from(">i", received, 12)[0] == len(received) - 16, report(p, "body length not patched", sent, received)
    assert received[16:arguments_end] == sent[16:arguments_end], report(p, "arguments not copied byte for byte", sent, received)
    try:
        before, after = read_body_with_dubbo_ssl(sent), read_body_with_dubbo_ssl(received)
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(report(p, f"dubbo-ssl-python cannot read what the provider received: {exc!r}", sent, received)) from None
    assert after[:-1] == before[:-1], report(p, "body fields or arguments changed", sent, received)
    expected = {**before[-1], **REQUEST_MUTATION}
    assert after[-1] == expected, report(p, f"attachments: expected {expected!r}, provider saw {after[-1]!r}", sent, received)
    # x-tag is replaced where it was, x-routed-by appended after the original entries.
    assert list(after[-1]) == [*before[-1], "x-routed-by"], report(p, "attachment order", sent, received)
    assert isinstance(after[-1]["owner"], dict) and after[-1]["owner"]["name"] == "bob"


def test_request_mutation_keeps_arguments_and_attachments_that_use_their_classes(proxy):
    p = proxy
    recorder = p.backends["recorder"]
    assert_healthy(p, "before")

    # 1. dubbo-ssl-python's consumer, twice on its connection (the second decode reuses the
    # first's parse of the body fields; the map holds objects, so its parse is never reused).
    for attempt in range(2):
        try:
            answer = call(HOST, p.port, RECORDER, "save", PEER_ARGS, PEER_ATTACHMENTS)
        except ConsumerError as exc:
            sent = request_with_dubbo_ssl(0, RECORDER, "save", PEER_ARGS, PEER_ATTACHMENTS)
            raise AssertionError(report(p, f"attempt {attempt}: the consumer raised {exc!r}", sent, recorder.received)) from None
        assert answer == "saved ann via metabridge", f"attempt {attempt}: {answer!r}\n{bridge_codec_lines(p)}"
    assert len(recorder.received) == 2
    # What the consumer sent: the same encoder, same call (ids differ; check_recorded compares
    # them, so take each received frame's id). The arguments end where the first written
    # value after them, the map, starts: at the length of the body without the map.
    arguments = write_with_dubbo_ssl("2.0.2", RECORDER, "1.0.0", "save", "Lcom/example/User;[I", *PEER_ARGS)
    for received in recorder.received:
        sent = request_with_dubbo_ssl(_request_id(received), RECORDER, "save", PEER_ARGS, PEER_ATTACHMENTS)
        assert sent[16:].startswith(arguments), "the peer writes the arguments as this test expects"
        check_recorded(p, received, sent, 16 + len(arguments))
    assert_healthy(p, "between")

    # 2. Hand-built: class by number, typed list by type number, back-references.
    sent = request_frame(31, HAND_REQUEST_BODY)
    [reply] = exchange_raw(HOST, p.port, sent)
    assert len(recorder.received) == 3, report(p, "the provider did not get the hand-built request", sent, reply)
    check_recorded(p, recorder.received[2], sent, 16 + len(HAND_ARGUMENTS))
    assert reply[3] == STATUS_OK and _request_id(reply) == 31, report(p, "reply to the hand-built request", sent, reply)
    assert read_body_with_dubbo_ssl(reply) == [1, "saved ann via metabridge"]
    after = read_body_with_dubbo_ssl(recorder.received[2])
    assert after[-1]["same"] == after[5] and after[-1]["owner"] == {"name": "bob", "tags": ["b"]}

    assert_healthy(p, "after")
    assert_no_codec_errors(p)


# -- response side -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, result, body",
    [("profile", PROFILE_RESULT, PROFILE_BODY), ("broken", BROKEN_RESULT, BROKEN_BODY)],
    ids=["value+attachments (peer writer)", "exception+attachments (hand-built)"],
)
def test_response_mutation_keeps_the_result_and_mutates_attachments_that_use_its_classes(proxy, method, result, body):
    p = proxy
    assert_healthy(p, "before")
    request = request_with_dubbo_ssl(41, PROFILES, method, [], {"x-trace": "t-1"})
    provider_sent = response_frame(41, body)
    for attempt in range(2):  # two requests pipelined on one connection; then again on a second one
        replies = exchange_raw(HOST, p.port, request + request_with_dubbo_ssl(42, PROFILES, method), replies=2)
        replies.sort(key=_request_id)
        for reply, request_id in zip(replies, (41, 42), strict=True):
            where = f"attempt {attempt}, request {request_id}: "
            assert _request_id(reply) == request_id and reply[3] == STATUS_OK, report(p, where + "status or id", provider_sent, reply)
            assert struct.unpack_from(">i", reply, 12)[0] == len(reply) - 16, report(p, where + "body length", provider_sent, reply)
            assert reply[16:].startswith(result), report(p, where + "result not copied byte for byte", provider_sent, reply)
            try:
                before, after = read_body_with_dubbo_ssl(provider_sent), read_body_with_dubbo_ssl(reply)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(report(p, where + f"dubbo-ssl-python cannot read the reply: {exc!r}", provider_sent, reply)) from None
            assert after[:-1] == before[:-1], report(p, where + "result changed", provider_sent, reply)
            expected = {**before[-1], **RESPONSE_MUTATION}
            assert after[-1] == expected, report(p, where + f"attachments: expected {expected!r}, got {after[-1]!r}", provider_sent, reply)
            assert list(after[-1]) == [*before[-1], "x-served-via"], report(p, where + "attachment order", provider_sent, reply)
        assert_healthy(p, f"after attempt {attempt}")
    assert len(p.backends["profiles"].received) == 4
    assert_no_codec_errors(p)


# -- beside other clients ------------------------------------------------------------------------------


def test_mutated_traffic_and_healthy_calls_on_other_connections_together(proxy):
    """Connections carrying mutated requests and responses, and connections with plain calls, at
    the same time: every call gets its own answer."""
    p = proxy
    stop = threading.Event()

    def mutated(worker: int) -> int:
        done = 0
        while not stop.is_set() and done < 15:
            hand = request_frame(1000 + worker, HAND_REQUEST_BODY)
            peer = request_with_dubbo_ssl(2000 + worker, PROFILES, "profile")
            replies = {_request_id(r): r for r in exchange_raw(HOST, p.port, hand + peer, replies=2)}
            assert read_body_with_dubbo_ssl(replies[1000 + worker]) == [1, "saved ann via metabridge"], report(p, "recorder reply", hand, replies[1000 + worker])
            profile = read_body_with_dubbo_ssl(replies[2000 + worker])
            assert profile[-1] == {**read_body_with_dubbo_ssl(response_frame(0, PROFILE_BODY))[-1], **RESPONSE_MUTATION}, report(p, "profile reply", peer, replies[2000 + worker])
            done += 1
        return done

    def healthy(worker: int) -> int:
        for i in range(15):
            raw = call_raw(HOST, p.port, GREETER, "echo", [f"w{worker}-{i}"], request_id=i, timeout=5)
            assert (raw.status, raw.data) == (STATUS_OK, f"w{worker}-{i}"), f"{raw.status} {raw.data!r} {raw.error!r}\n{bridge_codec_lines(p)}"
        return 15

    with ThreadPoolExecutor(max_workers=6) as pool:
        mutated_runs = [pool.submit(mutated, w) for w in range(3)]
        healthy_runs = [pool.submit(healthy, w) for w in range(3)]
        try:
            assert [f.result(timeout=30) for f in healthy_runs] == [15, 15, 15]
            assert [f.result(timeout=30) for f in mutated_runs] == [15, 15, 15]
        finally:
            stop.set()
    assert call(HOST, p.port, RECORDER, "save", PEER_ARGS, PEER_ATTACHMENTS) == "saved ann via metabridge"
    assert_healthy(p, "after")
    assert_no_codec_errors(p)
