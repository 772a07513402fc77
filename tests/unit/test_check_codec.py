"""The codec conformance kit: every built-in codec passes it, deliberately broken codecs are caught
by the check meant for them, and ``metabridge check-codec`` exits 0, 1 or 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from metabridge.cli import main as cli
from metabridge.codecs.awesomerpc import ERROR_CODES, AwesomeRpcCodec, encode_frame
from metabridge.kit import builtin_samples
from metabridge.kit.conformance import Samples, SamplesError, assert_codec_conforms, check_codec
from metabridge.sdk.codec import DecodeStatus, Metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
FUZZ = 0.5


@pytest.mark.parametrize("name", sorted(builtin_samples.BUILTIN))
def test_every_builtin_codec_conforms_with_its_samples(name):
    report = check_codec(name, fuzz_seconds=FUZZ)
    assert report.ok, report.format()
    assert set(report.checks) == {"round trip", "truncation", "fuzz", "on_error", "mutation", "heartbeat", "max_frame_size"}
    assert report.cost and all(c.decode_us > 0 and c.encode_us > 0 and c.decode_bytes_per_s > 0 for c in report.cost)


def test_a_builtin_loaded_from_its_file_gets_its_builtin_samples():
    report = check_codec("codecs/awesomerpc.py:AwesomeRpcCodec", base_dir=str(REPO_ROOT), fuzz_seconds=0.1)
    assert report.ok, report.format()
    assert "7 sample frames" in report.checks["round trip"]


def test_a_codec_that_cannot_carry_headers_gets_a_note_not_a_failure():
    report = check_codec("awesomerpc", fuzz_seconds=0.1)
    assert report.ok
    assert any(check == "mutation" and "unchanged" in note for check, note in report.notes)


def test_a_codec_that_carries_the_mutation_is_counted():
    report = check_codec("dubbo", fuzz_seconds=0.1)
    assert report.checks["mutation"].startswith("4 frames carry")


# -- broken codecs ------------------------------------------------------------------------------

SAMPLES = builtin_samples.awesomerpc()


class KeyErrorOnGarbage(AwesomeRpcCodec):
    """Looks the version byte up in a table, so a byte it does not know raises KeyError."""

    VERSIONS = {1: "v1"}

    def decode(self, buffer, metadata):
        if buffer:
            self.VERSIONS[buffer[0]]
        return super().decode(buffer, metadata)


class ConsumesTruncatedFrames(AwesomeRpcCodec):
    """Takes the header off the buffer before the body is there."""

    def decode(self, buffer, metadata):
        if len(buffer) >= 13 and int.from_bytes(buffer[5:9], "big") > len(buffer):
            del buffer[:13]
            return DecodeStatus.WAIT_FOR_DATA
        return super().decode(buffer, metadata)


class ErrorRepliesWithoutId(AwesomeRpcCodec):
    def on_error(self, metadata, error):
        return encode_frame(0, metadata.properties["cmd"], rsp_code=ERROR_CODES[error.type])


class NoFrameSizeCheck(AwesomeRpcCodec):
    def check_frame_size(self, size):
        pass


class DropsHeadersOnMutation(AwesomeRpcCodec):
    """Rewrites every frame it encodes with a mutation, with cmd 99: the decoded cmd header changes."""

    def encode(self, metadata, mutation):
        return super().encode(metadata, {"cmd": "99"} if mutation else mutation)


def failed_checks(report) -> set[str]:
    return {f.check for f in report.failures}


def test_an_exception_other_than_codec_error_on_garbage_is_reported_with_a_shrunk_reproducer():
    report = check_codec(KeyErrorOnGarbage, SAMPLES, fuzz_seconds=FUZZ)
    assert failed_checks(report) == {"fuzz"}, report.format()
    failure = report.failures[0]
    assert "KeyError" in failure.message and "only CodecError" in failure.message
    assert failure.reproducer is not None and len(failure.reproducer) == 1
    with pytest.raises(KeyError):
        KeyErrorOnGarbage().decode(bytearray(failure.reproducer), Metadata())
    assert f"bytes.fromhex({failure.reproducer.hex()!r})" in report.format()


def test_consuming_bytes_of_a_truncated_frame_is_caught():
    report = check_codec(ConsumesTruncatedFrames, SAMPLES, fuzz_seconds=0.1)
    assert "truncation" in failed_checks(report), report.format()
    message = next(f.message for f in report.failures if f.check == "truncation")
    assert "request 0: the first 13 of its 18 bytes got WAIT_FOR_DATA but decode changed the buffer" in message


def test_an_error_reply_without_the_request_id_is_caught():
    report = check_codec(ErrorRepliesWithoutId, SAMPLES, fuzz_seconds=0.1)
    assert failed_checks(report) == {"on_error"}, report.format()
    assert "carries request id 0, the request has 1" in report.failures[0].message


def test_a_codec_that_never_checks_the_frame_size_is_caught():
    report = check_codec(NoFrameSizeCheck, SAMPLES, fuzz_seconds=0.1)
    assert failed_checks(report) == {"max_frame_size"}, report.format()
    assert "decoded a 18-byte frame with max_frame_size 17" in report.failures[0].message


def test_a_mutation_that_changes_other_headers_is_caught():
    report = check_codec(DropsHeadersOnMutation, SAMPLES, fuzz_seconds=0.1)
    assert failed_checks(report) == {"mutation"}, report.format()
    messages = [f.message for f in report.failures]
    assert any("request 0 encoded with mutation {'x-check': '1'} lost or changed headers it had: {'cmd': '2'}" in m for m in messages), messages


def test_assert_codec_conforms_raises_with_the_report():
    with pytest.raises(AssertionError, match=r"(?s)FAIL  on_error.*result: \d+ failure"):
        assert_codec_conforms(ErrorRepliesWithoutId, SAMPLES, fuzz_seconds=0.1)
    assert assert_codec_conforms(AwesomeRpcCodec, fuzz_seconds=0.1).ok


# -- samples --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": []}, "Samples.requests is empty"),
        ({"requests": ["text"]}, "Samples.requests[0] must be bytes"),
        ({"requests": b"\x01"}, "Samples.requests must be a list of frames"),
        ({"requests": [b"a"], "responses": [b"a", b"b"]}, "2 responses for 1 requests"),
    ],
)
def test_unusable_samples_are_refused(kwargs, message):
    with pytest.raises(SamplesError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Samples(**kwargs)


def test_a_codec_that_is_not_builtin_needs_samples():
    with pytest.raises(SamplesError, match="not a built-in codec"):
        check_codec(ErrorRepliesWithoutId)


# -- the command ----------------------------------------------------------------------------------

BROKEN_CODEC_FILE = '''
from metabridge.codecs.awesomerpc import AwesomeRpcCodec, encode_frame
from metabridge.kit.conformance import Samples


class NoIdErrors(AwesomeRpcCodec):
    def on_error(self, metadata, error):
        return encode_frame(0, 1, rsp_code=500)


SAMPLES = Samples(requests=[encode_frame(5, 1, b"x")])
OTHER = Samples(requests=[encode_frame(0, 1, b"x")])
NOT_SAMPLES = [b"x"]
'''


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN_CODEC_FILE)
    return path


def test_command_exits_0_for_a_conforming_codec(capsys):
    assert cli(["check-codec", "thrift", "--fuzz-seconds", "0.1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "check-codec thrift" in out and "(seed 3)" in out and out.rstrip().endswith("result: OK")


def test_command_exits_1_and_prints_the_failure(broken, capsys):
    assert cli(["check-codec", f"{broken}:NoIdErrors", "--samples", str(broken), "--fuzz-seconds", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  on_error" in out and "carries request id 0, the request has 5" in out


def test_command_takes_a_named_samples_object(broken, capsys):
    # OTHER's request has id 0, which the broken replies happen to carry: no failure.
    assert cli(["check-codec", f"{broken}:NoIdErrors", "--samples", f"{broken}:OTHER", "--fuzz-seconds", "0.1"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_codec"], "no installed package offers a codec of that name"),
        (["{broken}:Missing", "--samples", "{broken}"], "has no attribute 'Missing'"),
        (["awesomerpc", "--samples", "{broken}.missing.py"], "does not exist"),
        (["awesomerpc", "--samples", "{broken}:NOPE"], "defines no NOPE; write NOPE = Samples("),
        (["awesomerpc", "--samples", "{broken}:NOT_SAMPLES"], "NOT_SAMPLES is a list, not a metabridge.kit.conformance.Samples"),
        (["{broken}:NoIdErrors"], "not a built-in codec, so there are no built-in samples"),
    ],
)
def test_command_exits_2_when_the_codec_or_samples_cannot_be_loaded(broken, capsys, args, message):
    assert cli(["check-codec", *(a.format(broken=broken) for a in args)]) == 2
    assert message in capsys.readouterr().err
