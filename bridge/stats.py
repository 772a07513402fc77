"""Per-listener counters with the reference's names (MetaProtocol's stats).

Plain integers on the hot path (an attribute increment); exporters read them when scraped.
"""

from __future__ import annotations

COUNTERS = (
    "request",
    "request_decoding_error",
    "request_decoding_success",
    "request_oneway",
    "request_twoway",
    "request_heartbeat",
    "request_stream",
    "request_stream_unknown",
    "request_overflow",
    "request_redispatched",
    "request_retry",
    "mirror_sent",
    "mirror_response",
    "mirror_failed",
    "response",
    "response_success",
    "response_error",
    "response_decoding_error",
    "response_unmatched",
    "local_response_route_not_found",
    "local_response_cluster_not_found",
    "local_response_no_healthy_upstream",
    "local_response_bad_response",
    "local_response_over_limit",
    "local_response_timeout",
    "local_response_unspecified",
    "idle_timeout",
    "downstream_cx_total",
    "ext_proc_stream_without_request",
    "downstream_cx_closed_bad_request",
    "downstream_cx_frame_timeout",
    "downstream_paused_in_flight",
    "downstream_paused_upstream_full",
    "downstream_cx_overflow",
    "downstream_cx_drained",
    "codec_error",
    "filter_error",
    "internal_error",
    "tunnel_opened",
    "tunnel_failed",
)


GAUGES = ("request_active", "downstream_cx_active")


class ListenerStats:
    __slots__ = COUNTERS + GAUGES

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
