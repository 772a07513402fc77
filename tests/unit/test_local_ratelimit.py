"""The local rate limit filter through a connection (ext_proc transport, fake HCM): its place
before the router, OVER_LIMIT replies, lazy refill, conditions, buckets shared by worker processes,
config errors that name the field, and examples/governance.yaml."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from metabridge.cli import main as cli_main
from metabridge.config.model import load, parse
from metabridge.core.chain import FilterChain
from metabridge.core.runtime import build_runtimes
from metabridge.filters import BUILTIN, build_filters
from metabridge.filters.local_ratelimit import LocalRateLimitFilter
from metabridge.registry import CodecLoadError
from metabridge.sdk.filter import Filter, FilterStatus
from tests.unit.connection_harness import OVER_LIMIT, ROUTE_NOT_FOUND, Harness, encode_frame, in_loop, parse_frames

REPO = Path(__file__).resolve().parents[2]
GOVERNANCE = REPO / "examples" / "governance.yaml"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(config, clock=None, **kwargs) -> LocalRateLimitFilter:
    return LocalRateLimitFilter(config, listener="test", clock=clock or FakeClock(), **kwargs)


def bucket(max_tokens, tokens_per_fill=None, fill_interval="1s") -> dict:
    b = {"max_tokens": max_tokens, "fill_interval": fill_interval}
    if tokens_per_fill is not None:
        b["tokens_per_fill"] = tokens_per_fill
    return b


def with_filters(*filters: Filter) -> Harness:
    h = Harness()
    h.runtime.chain = FilterChain(filters, "test", h.stats)
    return h


def routed(h: Harness) -> list[int]:
    """Flows that reached HCM (the router forwarded them), in order."""
    return sorted(flow for data in h.hcm.received.values() for flow, *_ in parse_frames(bytes(data)))


def refused(h: Harness) -> list[int]:
    return [flow for flow, _cmd, code, _ in h.client_frames() if code == OVER_LIMIT]


def frames(cmd: int, flows) -> bytes:
    return b"".join(encode_frame(flow, cmd) for flow in flows)


class Recorder(Filter):
    name = "after"

    def __init__(self) -> None:
        super().__init__({}, listener="test")
        self.seen = []

    def on_request(self, request):
        self.seen.append(request.metadata.request_id)
        return FilterStatus.CONTINUE


@in_loop
async def test_over_the_limit_requests_get_over_limit_and_never_reach_later_filters_or_the_router():
    rl, after = limiter({"token_bucket": bucket(3)}), Recorder()
    h = with_filters(rl, after)
    h.read(frames(1, range(1, 6)))
    assert routed(h) == [1, 2, 3]
    assert h.client_frames() == [(4, 1, OVER_LIMIT, b""), (5, 1, OVER_LIMIT, b"")]
    assert after.seen == [1, 2, 3]
    assert rl.stats.snapshot() == {"ok": 3, "rate_limited": 2, "unlimited": 0}
    assert h.stats.local_response_over_limit == 2 and h.stats.request_active == 3


@in_loop
async def test_the_bucket_is_shared_by_the_listeners_connections():
    rl = limiter({"token_bucket": bucket(2)})
    first, second = with_filters(rl), with_filters(rl)
    first.read(frames(1, [1]))
    second.read(frames(1, [1, 2]))
    assert routed(first) == [1] and routed(second) == [1]
    assert refused(second) == [2]


@in_loop
async def test_the_limiter_runs_before_the_router():
    rl = limiter({"token_bucket": bucket(1)})
    h = with_filters(rl)
    h.read(encode_frame(1, 9) + encode_frame(2, 1))  # cmd 9 has no route, but it took the token
    assert h.client_frames() == [(1, 9, ROUTE_NOT_FOUND, b""), (2, 1, OVER_LIMIT, b"")]
    assert routed(h) == []


@in_loop
async def test_tokens_refill_lazily_per_whole_interval_up_to_max_tokens():
    clock = FakeClock()
    rl = limiter({"token_bucket": bucket(5, 2, "1s")}, clock)
    h = with_filters(rl)
    flows = iter(range(1, 1000))

    def admitted(n: int) -> int:
        before = len(routed(h))
        h.read(frames(1, [next(flows) for _ in range(n)]))
        return len(routed(h)) - before

    assert admitted(7) == 5, "starts full"
    clock.t += 0.75
    assert admitted(3) == 0, "no refill before a whole fill_interval"
    clock.t += 0.25
    assert admitted(3) == 2, "tokens_per_fill after one interval"
    clock.t += 1.5
    assert admitted(3) == 2, "one whole interval (the half is kept for the next)"
    clock.t += 0.5
    assert admitted(3) == 2
    clock.t += 60
    assert admitted(9) == 5, "never more than max_tokens"
    assert rl.stats.ok == 16 and rl.stats.rate_limited == 2 + 3 + 1 + 1 + 1 + 4


@in_loop
async def test_tokens_per_fill_defaults_to_one():
    clock = FakeClock()
    rl = limiter({"token_bucket": bucket(2, fill_interval="100ms")}, clock)
    h = with_filters(rl)
    h.read(frames(1, [1, 2, 3]))
    clock.t += 0.25
    h.read(frames(1, [4, 5, 6]))
    assert routed(h) == [1, 2, 4, 5]


@in_loop
async def test_the_first_matching_condition_wins_else_the_default_bucket():
    rl = limiter(
        {
            "token_bucket": bucket(2),
            "conditions": [
                {"match": {"headers": [{"name": "cmd", "exact": "2"}]}, "token_bucket": bucket(1)},
                {"match": {"headers": [{"name": "cmd", "regex": "[23]"}]}, "token_bucket": bucket(3)},
            ],
        }
    )
    h = with_filters(rl)
    h.read(frames(2, [1, 2, 3]) + frames(3, [4, 5, 6, 7]) + frames(1, [8, 9, 10]))
    assert refused(h) == [2, 3, 7, 10], "cmd 2: 1 (the first condition, though the second matches too); cmd 3: 3; cmd 1: the default's 2"
    assert routed(h) == [1, 4, 5, 6, 8, 9]


@in_loop
async def test_without_a_default_bucket_requests_no_condition_matches_are_not_limited():
    rl = limiter({"conditions": [{"match": {"headers": [{"name": "cmd", "exact": "2"}]}, "token_bucket": bucket(1)}]})
    h = with_filters(rl)
    h.read(frames(1, range(1, 51)) + frames(2, [51, 52]))
    assert refused(h) == [52]
    assert rl.stats.snapshot() == {"ok": 1, "rate_limited": 1, "unlimited": 50}


@in_loop
async def test_a_condition_without_match_matches_every_request():
    rl = limiter({"token_bucket": bucket(5), "conditions": [{"token_bucket": bucket(1)}]})
    h = with_filters(rl)
    h.read(frames(1, [1, 2]))
    assert refused(h) == [2]


def test_with_several_workers_the_workers_share_each_bucket(tmp_path):
    """Four workers' filters (one per worker process in a bridge) over one shared directory
    admit the configured rate between them, however the requests fall on them: one worker alone
    can take the whole bucket, as with one worker."""
    clock = FakeClock()
    config = {"token_bucket": bucket(10, 5, "1s"), "conditions": [{"match": {"headers": [{"name": "cmd", "exact": "2"}]}, "token_bucket": bucket(3, 1, "1s")}]}
    workers = [limiter(config, clock, workers=4, shared_dir=tmp_path) for _ in range(4)]
    default = [w.default for w in workers]
    assert [b.take(clock.t) for b in default[:1] for _ in range(11)] == [True] * 10 + [False], "a full bucket of 10 for the first worker alone"
    assert not any(b.take(clock.t) for b in default), "empty for every worker"
    clock.t += 1.0
    assert sum(b.take(clock.t) for b in default for _ in range(3)) == 5, "one fill of 5, shared"
    total = 0
    for step in range(1, 21):  # 20 more fills, the requests on a different worker each time
        clock.t = 1001.0 + step
        while default[step % 4].take(clock.t):
            total += 1
    assert total == 5 * 20
    # Each bucket of the config is its own shared bucket: cmd 2's condition is untouched so far.
    conditional = [w.conditions[0][1] for w in workers]
    assert sum(b.take(clock.t) for b in conditional for _ in range(2)) == 3
    assert len(list(tmp_path.iterdir())) == 2
    # The same bucket is the same file; another listener's, or other numbers (a reload), another.
    again = limiter(config, clock, workers=4, shared_dir=tmp_path).default
    assert not again.take(clock.t), "the same bucket built again (a reload, a restarted worker) carries on, empty"
    elsewhere = LocalRateLimitFilter({"token_bucket": bucket(10, 5, "1s")}, listener="other", clock=clock, workers=4, shared_dir=tmp_path).default
    assert elsewhere.take(clock.t), "another listener's bucket is its own"
    changed = limiter({"token_bucket": bucket(11, 5, "1s")}, clock, workers=4, shared_dir=tmp_path).default
    assert changed.take(clock.t) and changed.tokens == 10, "a changed bucket starts full"


def test_one_worker_keeps_its_bucket_in_process_and_a_shared_bucket_is_opened_at_the_first_request(tmp_path):
    assert limiter({"token_bucket": bucket(1)}, workers=1, shared_dir=tmp_path).shared_dir is None
    rl = limiter({"token_bucket": bucket(2)}, workers=2, shared_dir=tmp_path / "buckets")
    assert not (tmp_path / "buckets").exists(), "building the filter (metabridge validate) creates nothing"
    assert rl.default.tokens == 2 and rl.default.take(1000.0) and rl.default.tokens == 1
    assert len(list((tmp_path / "buckets").iterdir())) == 1
    rl.default.close()


def _take_shared(path: str, start, results, takes: int) -> None:
    """In a separate process: attach to the shared bucket at ``path``, wait for the others at
    ``start``, then take ``takes`` tokens at once with them (the same fake time: no refill)."""
    from metabridge.filters.local_ratelimit import SharedTokenBucket

    shared = SharedTokenBucket(10**9, 1, 3600.0, "token_bucket", Path(path))
    got = shared.take(1000.0)
    start.wait()
    results.put(got + sum(shared.take(1000.0) for _ in range(takes)))


def test_processes_taking_from_one_shared_bucket_at_once_never_lose_an_update(tmp_path):
    """Four processes take 50,000 tokens each from one bucket, all at the same time: the bucket
    is exactly what they took lower. (Without the flock, a run lost most of the updates.)"""
    import multiprocessing

    from metabridge.filters.local_ratelimit import SharedTokenBucket

    path, takes = tmp_path / "b.bucket", 50_000
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_take_shared, args=(str(path), start, results, takes)) for _ in range(4)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert got == [1 + takes] * 4, "every take found a token"
    left = SharedTokenBucket(10**9, 1, 3600.0, "token_bucket", path)
    assert left.take(1000.0) and left.tokens == 10**9 - 4 * (1 + takes) - 1
    left.close()


def test_a_worker_shares_with_its_supervisors_other_workers_and_the_supervisor_removes_the_buckets(tmp_path):
    from metabridge.filters import local_ratelimit as module

    own = module.default_shared_dir()
    assert own == module.shared_dir_for(os.getpid()), "not a worker process: its own directory"
    with concurrent_spawn() as pool:
        assert pool.submit(_default_dir).result() == str(module.shared_dir_for(os.getpid())), "a worker: its supervisor's"
    where = module.shared_dir_for(os.getpid())
    rl = limiter({"token_bucket": bucket(1)}, workers=2)
    assert rl.shared_dir == where
    assert rl.default.take(1000.0) and where.is_dir()
    rl.default.close()
    module.remove_shared_buckets(os.getpid())
    assert not where.exists()


def _default_dir() -> str:
    from metabridge.filters.local_ratelimit import default_shared_dir

    return str(default_shared_dir())


def concurrent_spawn():
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def test_a_worker_count_that_is_not_a_positive_integer_is_refused():
    with pytest.raises(ValueError, match="workers"):
        limiter({"token_bucket": bucket(1)}, workers=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"token_bucket": {"fill_interval": "1s"}}, "token_bucket: 'max_tokens' is a required property"),
        ({"token_bucket": bucket(0)}, "token_bucket.max_tokens: 0 is less than the minimum of 1"),
        ({"token_bucket": bucket(1, 0)}, "token_bucket.tokens_per_fill: 0 is less than the minimum of 1"),
        ({"token_bucket": {"max_tokens": "10", "fill_interval": "1s"}}, "token_bucket.max_tokens: '10' is not of type 'integer'"),
        ({"token_bucket": bucket(1, fill_interval="soon")}, "token_bucket.fill_interval: 'soon' is not a duration (accepted: a number and a unit"),
        ({"token_bucket": bucket(1, fill_interval="0s")}, "token_bucket.fill_interval: must be more than 0"),
        ({"token_bucket": {"max_tokens": 1, "fill_interval": "1s", "burst": 2}}, "token_bucket: unknown key 'burst'; valid keys: fill_interval, max_tokens, tokens_per_fill"),
        ({"bucket": bucket(1)}, "(config): unknown key 'bucket' (did you mean 'token_bucket'?)"),
        ({"conditions": [{"match": {}}]}, "conditions[0]: 'token_bucket' is a required property"),
        ({"conditions": [{"match": {"headers": [{"name": "cmd"}]}, "token_bucket": bucket(1)}]}, "conditions[0].match.headers[0]: "),
        ({"conditions": [{"match": {"headers": [{"name": "cmd", "exact": "1"}, {"name": "x", "regex": "("}]}, "token_bucket": bucket(1)}]}, "conditions[0].match.headers[1].regex: invalid regular expression"),
        ({"conditions": [{"match": {"cmd": "1"}, "token_bucket": bucket(1)}]}, "conditions[0].match: unknown key 'cmd'; valid keys: headers"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(config, message):
    with pytest.raises(ValueError) as caught:
        limiter(config)
    assert message in str(caught.value)


def test_a_bad_config_in_the_file_names_the_listener_entry_and_the_field():
    raw = yaml.safe_load(GOVERNANCE.read_text())
    raw["listeners"][0]["filters"][0]["config"]["token_bucket"]["max_tokens"] = -1
    config = parse(raw, str(GOVERNANCE), GOVERNANCE.parent)
    with pytest.raises(CodecLoadError) as caught:
        build_runtimes(config)
    assert "listeners[awesomerpc].filters[0]: 'local_ratelimit' rejects its config: ValueError: token_bucket.max_tokens: -1 is less than the minimum of 1" in str(caught.value)


def test_local_ratelimit_is_built_in_by_name():
    assert "local_ratelimit" in BUILTIN
    config = load(GOVERNANCE)
    built = build_filters(config.listeners[0], config)
    assert isinstance(built[0], LocalRateLimitFilter) and built[0].name == "local_ratelimit"
    assert built[0].default.capacity == 100 and len(built[0].conditions) == 1


def test_the_governance_example_validates(capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli_main(["validate", "-c", str(GOVERNANCE), "--no-envoy"]) == 0
    finally:
        # The command installs its JSON handler on this test's captured stderr; later tests
        # must not log into that stream once pytest has closed it.
        root.handlers[:], root.level = handlers, level
    runtime = build_runtimes(load(GOVERNANCE))["awesomerpc"]
    assert [f.name for f in runtime.chain.filters] == ["local_ratelimit", "ratelimit", "fault", "fault"]


@in_loop
async def test_the_governance_example_limits_cmd_2_to_its_condition_bucket():
    runtime = build_runtimes(load(GOVERNANCE))["awesomerpc"]
    limit = runtime.chain.filters[0]
    limit.clock = lambda: limit.default.last_fill  # no fill boundary in the middle of the test
    h = Harness()
    h.runtime.chain = runtime.chain
    h.read(frames(2, range(1, 13)))
    assert refused(h) == [11, 12], "cmd 2: 10 a second"


def test_the_buckets_of_a_supervisor_killed_with_sigkill_are_removed_at_the_next_start():
    import subprocess
    import sys

    from metabridge.filters import local_ratelimit as module

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale, running = module.shared_dir_for(int(gone.stdout)), module.shared_dir_for(os.getpid())
    for directory in (stale, running):
        directory.mkdir(exist_ok=True)
        (directory / "bucket").write_bytes(b"x")
    try:
        assert stale in module.remove_stale_shared_buckets()
        assert not stale.exists() and (running / "bucket").exists(), "a running supervisor's buckets stay"
    finally:
        module.remove_shared_buckets(os.getpid())
        module.remove_shared_buckets(int(gone.stdout))
