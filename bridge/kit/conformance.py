"""Conformance checks for a codec: what ``metabridge check-codec`` runs, also a pytest helper.

    from metabridge.kit.conformance import Samples, assert_codec_conforms

    def test_my_codec_conforms():
        assert_codec_conforms("myproto.codec:MyCodec", Samples(requests=[...], responses=[...]))

``check_codec`` decodes the author's sample frames the way the bridge does (a REQUEST-direction
instance for requests and heartbeats, a RESPONSE-direction one for responses) and checks round
trips, truncation, random and mutated input, error replies, mutations, heartbeats and the
max_frame_size bound; it also measures the cost per message. Every check is described in
docs/check-codec.md. Nothing here needs more than the standard library.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metabridge.registry import check_codec_class, load_codec_class
from metabridge.sdk.codec import (
    Codec,
    CodecError,
    DecodeStatus,
    Direction,
    Error,
    ErrorType,
    FrameTooLarge,
    MessageType,
    Metadata,
    ResponseStatus,
)

MUTATION = {"x-check": "1"}
"""The mutation the mutation check asks encode to carry."""

_REQUEST_TYPES = frozenset({MessageType.REQUEST, MessageType.ONEWAY, MessageType.HEARTBEAT, MessageType.STREAM_INIT})
_RESPONSE_TYPES = frozenset({MessageType.RESPONSE, MessageType.ERROR})
_REPLIED_TYPES = frozenset({MessageType.REQUEST, MessageType.ONEWAY, MessageType.STREAM_INIT})  # what on_error answers
_COST_SECONDS = 0.01  # time spent measuring one operation on one sample
_COST_MEMORY = 32 * 1024 * 1024  # bytes of pre-built input buffers per measurement
_SHRINK_SECONDS = 1.0  # per fuzz failure
_MAX_FUZZ_FAILURES = 5  # distinct fuzz failures reported


class SamplesError(ValueError):
    """Samples that are missing or not usable (not bytes, responses without requests, ...)."""


@dataclass
class Samples:
    """Whole encoded frames of a protocol, filled in by the codec's author.

    ``responses[i]`` is the reply to ``requests[i]`` (so there are at most as many responses as
    requests); ``heartbeats`` are HEARTBEAT requests; ``options`` are the codec's config options
    (``codecs.<name>.options``) that every instance under test gets.
    """

    requests: list[bytes]
    responses: list[bytes] = field(default_factory=list)
    heartbeats: list[bytes] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("requests", "responses", "heartbeats"):
            frames = getattr(self, kind)
            if isinstance(frames, (bytes, bytearray, str)) or not hasattr(frames, "__iter__"):
                raise SamplesError(f"Samples.{kind} must be a list of frames (bytes), got {type(frames).__name__}")
            frames = list(frames)
            for i, frame in enumerate(frames):
                if not isinstance(frame, (bytes, bytearray, memoryview)):
                    raise SamplesError(f"Samples.{kind}[{i}] must be bytes (a whole encoded frame), got {type(frame).__name__}")
                if not frame:
                    raise SamplesError(f"Samples.{kind}[{i}] is empty: a sample is a whole encoded frame")
            setattr(self, kind, [bytes(f) for f in frames])
        if not self.requests:
            raise SamplesError("Samples.requests is empty: give at least one whole request frame")
        if len(self.responses) > len(self.requests):
            raise SamplesError(f"Samples has {len(self.responses)} responses for {len(self.requests)} requests: responses[i] must be the reply to requests[i]")
        if not isinstance(self.options, dict):
            raise SamplesError(f"Samples.options must be a dict (the codec's config options), got {type(self.options).__name__}")


@dataclass(frozen=True)
class Failure:
    """One thing the codec got wrong; ``reproducer`` is the (shrunk) input of a fuzz failure."""

    check: str
    message: str
    reproducer: bytes | None = None

    def __str__(self) -> str:
        text = f"{self.check}: {self.message}"
        if self.reproducer is not None:
            text += f"\n    reproducer ({len(self.reproducer)} bytes): bytes.fromhex({self.reproducer.hex()!r})"
        return text


@dataclass(frozen=True)
class Cost:
    """What decoding and encoding (with an empty mutation) one sample costs, in microseconds."""

    sample: str
    size: int
    decode_us: float
    encode_us: float

    @property
    def decode_bytes_per_s(self) -> float:
        return self.size / self.decode_us * 1e6 if self.decode_us > 0 else float("inf")

    @property
    def encode_bytes_per_s(self) -> float:
        return self.size / self.encode_us * 1e6 if self.encode_us > 0 else float("inf")


@dataclass
class Report:
    """The outcome of ``check_codec``: ``ok`` when there are no failures; ``notes`` are
    observations that are not failures (a check skipped, a mutation the protocol cannot carry)."""

    codec: str
    failures: list[Failure] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (check, note)
    checks: dict[str, str] = field(default_factory=dict)  # check -> what it covered
    cost: list[Cost] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = [f"check-codec {self.codec}"]
        for check, summary in self.checks.items():
            failed = [f for f in self.failures if f.check == check]
            lines.append(f"  {'FAIL' if failed else 'ok':<5} {check:<15} {summary}")
            for failure in failed:
                lines.extend("        " + line for line in str(failure).removeprefix(f"{check}: ").splitlines())
            lines.extend(f"        note: {note}" for c, note in self.notes if c == check)
        for failure in self.failures:
            if failure.check not in self.checks:
                lines.append(f"  FAIL  {failure}")
        if self.cost:
            lines.append("  cost per message (decode; encode with no mutation):")
            width = max(len(c.sample) for c in self.cost)
            for c in self.cost:
                lines.append(
                    f"        {c.sample:<{width}} {c.size:>7} B   decode {c.decode_us:8.2f} µs {_rate(c.decode_bytes_per_s)}"
                    f"   encode {c.encode_us:8.2f} µs {_rate(c.encode_bytes_per_s)}"
                )
        lines.append(f"result: {'OK' if self.ok else f'{len(self.failures)} failure(s)'}")
        return "\n".join(lines)


def _rate(bytes_per_s: float) -> str:
    return f"({bytes_per_s / 1e6:7.1f} MB/s)" if bytes_per_s != float("inf") else "(      - MB/s)"


def check_codec(codec: type[Codec] | str, samples: Samples | None = None, *, base_dir: str = ".", fuzz_seconds: float = 2.0, seed: int = 0) -> Report:
    """Run every conformance check on ``codec`` (a Codec class or a config ``ref:``).

    Without ``samples``, a built-in codec uses its built-in samples (metabridge.kit.builtin_samples);
    any other codec raises SamplesError. A reference that cannot be loaded raises CodecLoadError.
    """
    if isinstance(codec, str):
        label, cls = codec, load_codec_class(codec, base_dir)
    else:
        label, cls = f"{codec.__module__}:{codec.__qualname__}", codec
        check_codec_class(cls, label)
    if samples is None:
        from metabridge.kit.builtin_samples import samples_for

        samples = samples_for(cls)
        if samples is None:
            raise SamplesError(f"{label}: not a built-in codec, so there are no built-in samples; pass Samples(requests=[...], ...) (check-codec: --samples FILE.py)")
    elif not isinstance(samples, Samples):
        raise SamplesError(f"samples must be a metabridge.kit.conformance.Samples, got {type(samples).__name__}")
    return _Checker(cls, samples, Report(label), fuzz_seconds, seed).run()


def assert_codec_conforms(codec: type[Codec] | str, samples: Samples | None = None, **kw: Any) -> Report:
    """pytest helper: run check_codec and raise AssertionError with the report when it fails."""
    report = check_codec(codec, samples, **kw)
    if not report.ok:
        raise AssertionError("the codec does not conform:\n" + report.format())
    return report


# -- the checks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    name: str  # "request 0"
    data: bytes
    direction: Direction


def _where(exc: BaseException) -> str:
    """Where an exception was raised: the innermost frame, as file:line in function."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}{_where(exc)}"


def _signature(exc: BaseException) -> tuple:
    """What makes two fuzz crashes the same bug: the exception type and where it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return (type(exc).__name__, last.filename if last else "", last.lineno if last else 0)


def _summary(metadata: Metadata) -> dict[str, Any]:
    """The metadata fields a round trip must preserve."""
    return {
        "message_type": metadata.message_type,
        "request_id": metadata.request_id,
        "stream_id": metadata.stream_id,
        "response_status": metadata.response_status,
        "operation_name": metadata.operation_name,
        "headers": dict(metadata.headers),
    }


def _differences(before: dict[str, Any], after: dict[str, Any]) -> str:
    return "; ".join(f"{key} {before[key]!r} became {after[key]!r}" for key in before if before[key] != after[key])


class _Checker:
    def __init__(self, cls: type[Codec], samples: Samples, report: Report, fuzz_seconds: float, seed: int) -> None:
        self.cls = cls
        self.samples = samples
        self.report = report
        self.fuzz_seconds = fuzz_seconds
        self.seed = seed
        self.all = (
            [_Sample(f"request {i}", d, Direction.REQUEST) for i, d in enumerate(samples.requests)]
            + [_Sample(f"response {i}", d, Direction.RESPONSE) for i, d in enumerate(samples.responses)]
            + [_Sample(f"heartbeat {i}", d, Direction.REQUEST) for i, d in enumerate(samples.heartbeats)]
        )
        self.decoded: dict[str, Metadata] = {}  # sample name -> its metadata, for samples that decode

    def fail(self, check: str, message: str, reproducer: bytes | None = None) -> None:
        self.report.failures.append(Failure(check, message, reproducer))

    def note(self, check: str, message: str) -> None:
        self.report.notes.append((check, message))

    def new(self, direction: Direction, max_frame_size: int | None = None) -> Codec:
        """An instance as the bridge makes one: options from the samples, direction set."""
        kwargs: dict[str, Any] = {"options": dict(self.samples.options)}
        if max_frame_size is not None:
            kwargs["max_frame_size"] = max_frame_size
        codec = self.cls(**kwargs)
        codec.direction = direction
        return codec

    def decode_whole(self, check: str, name: str, data: bytes, direction: Direction, codec: Codec | None = None) -> Metadata | None:
        """Decode ``data`` as one whole frame; a failure (and None) unless it is exactly one."""
        metadata, problem = self.decode_problem(data, direction, codec)
        if problem:
            self.fail(check, f"{name}: {problem}")
        return metadata

    def decode_problem(self, data: bytes, direction: Direction, codec: Codec | None = None) -> tuple[Metadata | None, str | None]:
        """(metadata, None) when ``data`` decodes as exactly one whole frame, else (None, why not)."""
        codec = codec or self.new(direction)
        buffer, metadata = bytearray(data), Metadata()
        try:
            status = codec.decode(buffer, metadata)
        except Exception as exc:
            return None, f"decode ({direction.value} direction) raised {_describe(exc)}"
        if status is not DecodeStatus.DONE:
            return None, f"decode ({direction.value} direction) returned {status} for a whole {len(data)}-byte frame"
        if buffer:
            return None, f"decode consumed {len(data) - len(buffer)} of the frame's {len(data)} bytes; it must remove exactly one whole frame"
        return metadata, None

    def run(self) -> Report:
        try:
            self.new(Direction.REQUEST)
        except Exception as exc:
            self.report.checks["instance"] = f"{self.cls.__name__}(options={self.samples.options!r})"
            self.fail("instance", f"creating an instance raised {_describe(exc)}; check Samples.options")
            return self.report
        for name, check in (
            ("round trip", self.check_round_trips),
            ("truncation", self.check_truncation),
            ("fuzz", self.check_fuzz),
            ("on_error", self.check_error_replies),
            ("mutation", self.check_mutation),
            ("heartbeat", self.check_heartbeats),
            ("max_frame_size", self.check_max_frame_size),
        ):
            try:
                self.report.checks[name] = check(name)
            except Exception as exc:  # a codec method failing where the check did not expect it
                self.report.checks[name] = "stopped early"
                self.fail(name, f"the codec raised {_describe(exc)}")
        self.measure_cost()
        return self.report

    # -- round trips ------------------------------------------------------------------------------

    def check_round_trips(self, check: str) -> str:
        for sample in self.all:
            codec = self.new(sample.direction)
            metadata = self.decode_whole(check, sample.name, sample.data, sample.direction, codec)
            if metadata is None:
                continue
            if metadata.frame != sample.data:
                self.fail(check, f"{sample.name}: metadata.frame is not the frame's own {len(sample.data)} bytes (got {len(metadata.frame)} bytes)")
            if sample.direction is Direction.RESPONSE and metadata.message_type in _REQUEST_TYPES:
                self.fail(check, f"{sample.name}: a RESPONSE-direction instance labels it {metadata.message_type.name}; label frames by self.direction (responses decode as RESPONSE or ERROR)")
            if sample.direction is Direction.REQUEST and metadata.message_type in _RESPONSE_TYPES:
                self.fail(check, f"{sample.name}: a REQUEST-direction instance labels it {metadata.message_type.name}; put response frames in Samples.responses, or label frames by self.direction")
            self.decoded[sample.name] = metadata
            self._back_to_back(check, sample)
            encoded = codec.encode(metadata, {})
            if not isinstance(encoded, (bytes, bytearray, memoryview)):
                self.fail(check, f"{sample.name}: encode returned {type(encoded).__name__}, not bytes")
                continue
            again = self.decode_whole(check, f"{sample.name} encoded with no mutation", bytes(encoded), sample.direction)
            if again is not None and _summary(again) != _summary(metadata):
                self.fail(check, f"{sample.name}: encoded with no mutation, it decodes to different metadata: {_differences(_summary(metadata), _summary(again))}")
        if self.cls.has_request_id:
            for i in range(len(self.samples.responses)):
                request, response = self.decoded.get(f"request {i}"), self.decoded.get(f"response {i}")
                if request is not None and response is not None and request.request_id != response.request_id:
                    self.fail(check, f"response {i} carries request id {response.request_id!r}, request {i} has {request.request_id!r}: responses[i] must answer requests[i]")
        return f"{len(self.all)} sample frames: each must decode whole, alone and back to back, and re-encode to the same metadata"

    def _back_to_back(self, check: str, sample: _Sample) -> None:
        """Two copies of a frame in one buffer: decode must take exactly the first, then the second."""
        codec, buffer = self.new(sample.direction), bytearray(sample.data * 2)
        for copy in ("first", "second"):
            try:
                status = codec.decode(buffer, Metadata())
            except Exception as exc:
                self.fail(check, f"{sample.name}: with two copies in the buffer, decoding the {copy} raised {_describe(exc)}")
                return
            left = len(sample.data) if copy == "first" else 0
            if status is not DecodeStatus.DONE or len(buffer) != left:
                self.fail(check, f"{sample.name}: with two copies in the buffer, decoding the {copy} returned {status} and left {len(buffer)} bytes, expected DONE and {left}")
                return

    # -- truncation -------------------------------------------------------------------------------

    def check_truncation(self, check: str) -> str:
        prefixes = 0
        for sample in self.all:
            prefixes += len(sample.data)
            growing = self.new(sample.direction)  # one instance, fed a buffer that grows byte by byte
            for n in range(len(sample.data)):
                prefix = sample.data[:n]
                problem = self._truncated(growing, prefix) or self._truncated(self.new(sample.direction), prefix)
                if problem:
                    self.fail(check, f"{sample.name}: the first {n} of its {len(sample.data)} bytes {problem}; a frame cut short must get WAIT_FOR_DATA with nothing consumed")
                    break
            else:
                self.decode_whole(check, f"{sample.name} (after growing byte by byte on one instance)", sample.data, sample.direction, growing)
        return f"{prefixes} proper prefixes: each must get WAIT_FOR_DATA with nothing consumed (on one instance growing, and on a fresh one)"

    @staticmethod
    def _truncated(codec: Codec, prefix: bytes) -> str | None:
        buffer = bytearray(prefix)
        try:
            status = codec.decode(buffer, Metadata())
        except Exception as exc:
            return f"made decode raise {_describe(exc)}"
        if status is not DecodeStatus.WAIT_FOR_DATA:
            return f"made decode return {status}"
        if buffer != prefix:
            return f"got WAIT_FOR_DATA but decode changed the buffer ({len(prefix)} bytes became {len(buffer)})"
        return None

    # -- fuzz -------------------------------------------------------------------------------------

    def check_fuzz(self, check: str) -> str:
        rng = random.Random(self.seed)
        mutate = _Mutator(rng, [s.data for s in self.all])
        found: dict[tuple, tuple[bytes, Direction, str]] = {}
        inputs = 0
        deadline = time.perf_counter() + self.fuzz_seconds
        while time.perf_counter() < deadline and len(found) < _MAX_FUZZ_FAILURES:
            sample = rng.choice(self.all)
            direction = sample.direction if rng.random() < 0.8 else rng.choice(list(Direction))
            data = mutate.random_bytes() if rng.random() < 0.2 else mutate(sample.data)
            inputs += 1
            problem = self._fuzz_one(data, direction)
            if problem is not None and problem[0] not in found:
                found[problem[0]] = (data, direction, problem[1])
        for signature, (data, direction, message) in found.items():
            def same(candidate: bytes, signature=signature, direction=direction) -> bool:
                problem = self._fuzz_one(candidate, direction)
                return problem is not None and problem[0] == signature

            small = _shrink(data, same, time.perf_counter() + _SHRINK_SECONDS)
            message = self._fuzz_one(small, direction)[1]
            self.fail(check, f"a {direction.value}-direction decode of {len(small)} bytes (shrunk from {len(data)}) {message}; only CodecError and its subclasses may escape decode", small)
        return f"{inputs} random and mutated inputs in {self.fuzz_seconds:g} s (seed {self.seed}): only CodecError may escape decode"

    def _fuzz_one(self, data: bytes, direction: Direction) -> tuple[tuple, str] | None:
        """Decode ``data`` frame after frame on a fresh instance; (signature, what went wrong) or None."""
        codec, buffer = self.new(direction), bytearray(data)
        while buffer:
            before = bytes(buffer)
            try:
                status = codec.decode(buffer, Metadata())
            except CodecError:
                return None
            except Exception as exc:
                return _signature(exc), f"raised {_describe(exc)}"
            if status is DecodeStatus.WAIT_FOR_DATA:
                if buffer != before:
                    return ("wait-changed",), f"returned WAIT_FOR_DATA but changed the buffer ({len(before)} bytes became {len(buffer)})"
                return None
            if status is not DecodeStatus.DONE:
                return ("status",), f"returned {status!r}, not a DecodeStatus"
            if len(buffer) >= len(before):
                return ("done-nothing",), "returned DONE without consuming any bytes (the bridge would decode that buffer forever)"
        return None

    # -- error replies ----------------------------------------------------------------------------

    def check_error_replies(self, check: str) -> str:
        replies = requests = 0
        for i in range(len(self.samples.requests)):
            name = f"request {i}"
            if name not in self.decoded or self.decoded[name].message_type not in _REPLIED_TYPES:
                continue
            requests += 1
            problems: dict[str, list[str]] = {}  # what is wrong -> the error types it is wrong for
            for error_type in ErrorType:
                codec = self.new(Direction.REQUEST)
                request = self.decode_whole(check, name, self.samples.requests[i], Direction.REQUEST, codec)
                if request is None:
                    break
                request.frame = b""  # as the bridge does once the request has been sent upstream
                replies += 1
                for problem in self._error_reply_problems(codec, request, error_type):
                    problems.setdefault(problem, []).append(error_type.name)
            for problem, types in problems.items():
                which = "every ErrorType" if len(types) == len(ErrorType) else ", ".join(types)
                self.fail(check, f"on_error for {name} ({which}): {problem}")
        with_id = " with the request's id" if self.cls.has_request_id else ""
        return f"{replies} replies to {requests} requests ({len(ErrorType)} error types each): each must decode as an error response{with_id}"

    def _error_reply_problems(self, codec: Codec, request: Metadata, error_type: ErrorType) -> list[str]:
        try:
            reply = codec.on_error(request, Error(error_type, "check-codec error reply"))
        except Exception as exc:
            return [f"raised {_describe(exc)} (it must not need metadata.frame, which the bridge releases once a request is sent)"]
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            return [f"returned {type(reply).__name__}, not bytes"]
        if not reply and request.message_type is MessageType.ONEWAY:
            return []  # a oneway request's client reads no reply
        decoded, problem = self.decode_problem(bytes(reply), Direction.RESPONSE)
        if decoded is None:
            return [f"the reply: {problem}"]
        problems = []
        if decoded.message_type not in _RESPONSE_TYPES:
            problems.append(f"the reply decodes as {decoded.message_type.name}, not RESPONSE or ERROR")
        if decoded.response_status is not ResponseStatus.ERROR:
            problems.append(f"the reply decodes with response_status {decoded.response_status.name}; an error reply must say ERROR")
        if self.cls.has_request_id and decoded.request_id != request.request_id:
            problems.append(f"the reply carries request id {decoded.request_id!r}, the request has {request.request_id!r} (has_request_id is True, so the client matches replies by id)")
        return problems

    # -- mutation ---------------------------------------------------------------------------------

    def check_mutation(self, check: str) -> str:
        unchanged, carried = [], 0
        for sample in self.all:
            original = self.decoded.get(sample.name)
            if original is None or original.message_type is MessageType.HEARTBEAT:
                continue  # heartbeats are answered by the bridge, never forwarded
            codec = self.new(sample.direction)
            metadata = self.decode_whole(check, sample.name, sample.data, sample.direction, codec)
            if metadata is None:
                continue
            try:
                encoded = codec.encode(metadata, dict(MUTATION))
            except CodecError as exc:
                self.fail(check, f"{sample.name}: encode with mutation {MUTATION} raised {_describe(exc)}; a key the protocol cannot carry should be ignored")
                continue
            if bytes(encoded) == sample.data:
                unchanged.append(sample.name)
                continue
            label = f"{sample.name} encoded with mutation {MUTATION}"
            mutated = self.decode_whole(check, label, bytes(encoded), sample.direction)
            if mutated is None:
                continue
            before, after = _summary(original), _summary(mutated)
            lost = {k: v for k, v in before.pop("headers").items() if after["headers"].get(k) != v}
            headers = after.pop("headers")
            if before != after:
                self.fail(check, f"{label} decodes to different metadata: {_differences(before, after)}")
            if lost:
                self.fail(check, f"{label} lost or changed headers it had: {lost}")
            if headers.get("x-check") == "1":
                carried += 1
            elif headers:
                self.fail(check, f"{label} changed the frame, but its decoded headers do not show x-check=1: {headers}")
            else:
                self.note(check, f"{label} changed the frame, but decode shows no headers for this message, so the mutation could not be seen")
        if unchanged:
            self.note(check, f"encode returned the frame unchanged for {', '.join(unchanged)}: the codec does not carry the header x-check there (fine when the protocol has nowhere to put it)")
        return f"{carried} frames carry the mutation {MUTATION} into their decoded headers"

    # -- heartbeats -------------------------------------------------------------------------------

    def check_heartbeats(self, check: str) -> str:
        if not self.samples.heartbeats:
            self.note(check, "no heartbeat samples (Samples.heartbeats), nothing to check")
            return "skipped"
        for i in range(len(self.samples.heartbeats)):
            name = f"heartbeat {i}"
            metadata = self.decoded.get(name)
            if metadata is None:
                continue
            if metadata.message_type is not MessageType.HEARTBEAT:
                self.fail(check, f"{name} decodes as {metadata.message_type.name}, not HEARTBEAT")
                continue
            try:
                reply = self.new(Direction.REQUEST).heartbeat_reply(metadata)
            except Exception as exc:
                self.fail(check, f"heartbeat_reply for {name} raised {_describe(exc)}")
                continue
            decoded = self.decode_whole(check, f"the heartbeat_reply to {name}", bytes(reply), Direction.RESPONSE)
            if decoded is None:
                continue
            if decoded.message_type not in (MessageType.RESPONSE, MessageType.HEARTBEAT):
                self.fail(check, f"the heartbeat_reply to {name} decodes as {decoded.message_type.name}, not RESPONSE (or HEARTBEAT)")
            if decoded.response_status is not ResponseStatus.OK:
                self.fail(check, f"the heartbeat_reply to {name} decodes with response_status {decoded.response_status.name}, not OK")
            if self.cls.has_request_id and decoded.request_id != metadata.request_id:
                self.fail(check, f"the heartbeat_reply to {name} carries request id {decoded.request_id!r}, the heartbeat has {metadata.request_id!r}")
        return f"{len(self.samples.heartbeats)} heartbeat samples: each must decode as HEARTBEAT, and heartbeat_reply as an OK reply"

    # -- max_frame_size ---------------------------------------------------------------------------

    def check_max_frame_size(self, check: str) -> str:
        # A frame that is all header is whole when its size becomes known, so "before the frame
        # is whole" is asked of the largest sample of each direction only.
        largest = {d: max((s for s in self.all if s.direction is d), key=lambda s: len(s.data), default=None) for d in Direction}
        checked = 0
        for sample in self.all:
            size = len(sample.data)
            if size < 2:
                continue
            checked += 1
            self.decode_whole(check, f"{sample.name} with max_frame_size {size} (its own size)", sample.data, sample.direction, self.new(sample.direction, size))
            codec = self.new(sample.direction, size - 1)
            for n in range(1, size + 1):
                try:
                    status = codec.decode(bytearray(sample.data[:n]), Metadata())
                except FrameTooLarge:
                    if n == size and sample is largest[sample.direction]:
                        self.fail(check, f"{sample.name}: with max_frame_size {size - 1}, FrameTooLarge came only once the whole {size}-byte frame was there; call self.check_frame_size as soon as the size is known")
                    break
                except Exception as exc:
                    self.fail(check, f"{sample.name}: with max_frame_size {size - 1}, decode of {n} bytes raised {_describe(exc)} instead of FrameTooLarge")
                    break
                if status is DecodeStatus.DONE:
                    self.fail(check, f"{sample.name}: decoded a {size}-byte frame with max_frame_size {size - 1}; call self.check_frame_size with the frame's size")
                    break
        return f"{checked} frames: one byte over max_frame_size each must raise FrameTooLarge (the largest of each direction before it is whole), at the limit decode"

    # -- cost -------------------------------------------------------------------------------------

    def measure_cost(self) -> None:
        for sample in self.all:
            if sample.name.startswith("heartbeat") or sample.name not in self.decoded:
                continue
            codec = self.new(sample.direction)
            try:
                decode_us = _per_call(lambda n: [(bytearray(sample.data), Metadata()) for _ in range(n)], lambda b: codec.decode(*b), len(sample.data))
                metadata = Metadata()
                codec.decode(bytearray(sample.data), metadata)
                encode_us = _per_call(lambda n: [metadata] * n, lambda m: codec.encode(m, {}), 0)
            except Exception as exc:
                self.fail("cost", f"{sample.name}: decoding or encoding it again raised {_describe(exc)}")
                continue
            self.report.cost.append(Cost(sample.name, len(sample.data), decode_us, encode_us))


def _per_call(inputs: Callable[[int], list], call: Callable[[Any], Any], size: int) -> float:
    """Microseconds per ``call``, timed with perf_counter over enough calls for about
    _COST_SECONDS (a short first run sets the count); the inputs are built beforehand so their
    cost is not counted."""
    limit = max(10, _COST_MEMORY // max(size, 1))
    n = 10
    while True:
        batch = inputs(n)
        start = time.perf_counter()
        for item in batch:
            call(item)
        elapsed = time.perf_counter() - start
        if elapsed >= _COST_SECONDS / 2 or n >= limit:
            return elapsed / n * 1e6
        n = min(limit, max(n * 2, int(n * _COST_SECONDS / max(elapsed, 1e-9))))


class _Mutator:
    """Seeded random inputs: random bytes, and sample frames with a few edits each."""

    INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF)
    WORDS = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)

    def __init__(self, rng: random.Random, corpus: list[bytes]) -> None:
        self.rng = rng
        self.corpus = corpus
        self.longest = max((len(c) for c in corpus), default=64)

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 2 * self.longest))

    def __call__(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            getattr(self, self.rng.choice(("flip", "byte", "word", "insert", "delete", "truncate", "duplicate", "splice", "append")))(out)
        return bytes(out)

    def _pos(self, out: bytearray) -> int:
        return self.rng.randrange(len(out)) if out else 0

    def flip(self, out: bytearray) -> None:
        if out:
            out[self._pos(out)] ^= 1 << self.rng.randrange(8)

    def byte(self, out: bytearray) -> None:
        if out:
            out[self._pos(out)] = self.rng.choice(self.INTERESTING)

    def word(self, out: bytearray) -> None:
        width = self.rng.choice((2, 4))
        if len(out) >= width:
            value = self.rng.choice(self.WORDS + (len(out), len(out) - 1)) & ((1 << 8 * width) - 1)
            pos = self.rng.randrange(len(out) - width + 1)
            out[pos : pos + width] = value.to_bytes(width, self.rng.choice(("big", "little")))

    def insert(self, out: bytearray) -> None:
        pos = self._pos(out)
        out[pos:pos] = self.rng.randbytes(self.rng.randint(1, 8))

    def delete(self, out: bytearray) -> None:
        if out:
            pos = self._pos(out)
            del out[pos : pos + self.rng.randint(1, 8)]

    def truncate(self, out: bytearray) -> None:
        del out[self._pos(out) :]

    def duplicate(self, out: bytearray) -> None:
        if out:
            pos = self._pos(out)
            chunk = out[pos : pos + self.rng.randint(1, 16)]
            out[pos:pos] = chunk

    def splice(self, out: bytearray) -> None:
        other = self.rng.choice(self.corpus)
        out[self._pos(out) :] = other[self.rng.randrange(len(other)) :]

    def append(self, out: bytearray) -> None:
        out += self.rng.choice(self.corpus)


def _shrink(data: bytes, fails: Callable[[bytes], bool], deadline: float) -> bytes:
    """A smaller input that still fails: delta debugging (drop ever smaller chunks while the
    failure stays), then bytes set to zero where that keeps it, until ``deadline``."""
    chunks = 2
    while len(data) >= 2 and time.perf_counter() < deadline:
        size = -(-len(data) // chunks)
        for start in range(0, len(data), size):
            candidate = data[:start] + data[start + size :]
            if fails(candidate):
                data, chunks = candidate, max(chunks - 1, 2)
                break
        else:
            if size == 1:
                break
            chunks = min(chunks * 2, len(data))
    for pos in range(len(data)):
        if time.perf_counter() >= deadline:
            break
        if data[pos]:
            candidate = data[:pos] + b"\x00" + data[pos + 1 :]
            if fails(candidate):
                data = candidate
    return data


__all__ = ["MUTATION", "Cost", "Failure", "Report", "Samples", "SamplesError", "assert_codec_conforms", "check_codec"]
