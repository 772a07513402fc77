"""The config file's JSON Schema (checked with jsonschema before the model is built)."""

from __future__ import annotations

import difflib
from typing import Any

# \Z, not $: the schema checks patterns with re.search, where $ also matches before a final
# newline, so "5s\n" would pass the schema and then fail to parse. The size must not be 0.
DURATION = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)\Z"
_SIZE = r"^0*[1-9][0-9]* ?(B|KiB|MiB|GiB)?\Z"


_duration = {"type": "string", "pattern": DURATION, "x-forms": "a number and a unit: 250ms, 5s, 1.5m, 1h"}
_size = {
    "oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _SIZE}],
    "x-forms": "bytes, or a number with B, KiB, MiB or GiB: 65536, 64KiB, 4MiB",
}
_rate = {
    "type": "object",
    "additionalProperties": False,
    "required": ["burst", "per_second"],
    "properties": {"burst": {"type": "integer", "minimum": 1}, "per_second": {"type": "number", "exclusiveMinimum": 0}},
}
_name = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"}
_port = {"type": "integer", "minimum": 0, "maximum": 65535}
_kv_list = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["key", "value"],
        "properties": {"key": {"type": "string", "minLength": 1}, "value": {"type": "string"}},
    },
}
_header_matcher = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "exact": {"type": "string"},
        "prefix": {"type": "string"},
        "suffix": {"type": "string"},
        "regex": {"type": "string"},
        "present": {"type": "boolean"},
        "invert": {"type": "boolean"},
    },
    "oneOf": [
        {"required": ["exact"]},
        {"required": ["prefix"]},
        {"required": ["suffix"]},
        {"required": ["regex"]},
        {"required": ["present"]},
    ],
}
_route = {
    "type": "object",
    "additionalProperties": False,
    "required": ["route"],
    "properties": {
        "name": {"type": "string"},
        "match": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"headers": {"type": "array", "items": _header_matcher}},
        },
        "route": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cluster": _name,
                "weighted_clusters": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "weight"],
                        "properties": {"name": _name, "weight": {"type": "integer", "minimum": 0}},
                    },
                },
            },
            "oneOf": [{"required": ["cluster"]}, {"required": ["weighted_clusters"]}],
        },
        "request_mutation": _kv_list,
        "response_mutation": _kv_list,
        "timeout": _duration,
        "hash_policy": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        "request_mirror_policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["cluster"],
                "properties": {"cluster": _name, "runtime_fraction": {"type": "number", "minimum": 0, "maximum": 100}},
            },
        },
        "retry_policy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "num_retries": {"type": "integer", "minimum": 0, "maximum": 10},
                "retry_on": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["connect_failure", "reset", "no_healthy_upstream", "timeout", "retriable_error"]},
                },
                "per_try_timeout": _duration,
            },
        },
    },
}
_filter = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": _name, "ref": {"type": "string", "minLength": 1}, "config": {"type": "object"}},
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["codecs", "listeners", "clusters"],
    "properties": {
        "bridge": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "listen": {"type": "string", "minLength": 1},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "metrics_port": _port,
                "metrics_address": {"type": "string", "minLength": 1},
                "log_level": {"enum": ["debug", "info", "warning", "error"]},
                "max_buffered_bytes": _size,
                "grpc": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "max_concurrent_streams": {"type": "integer", "minimum": 1},
                        "max_header_list_size": _size,
                        "max_frame_size": {"type": "integer", "minimum": 16384, "maximum": 16777215},
                        "max_message_size": _size,
                        "max_continuations": {"type": "integer", "minimum": 1},
                        "connection_window": {"type": "integer", "minimum": 65535, "maximum": 2147483647},
                        "reset_rate": _rate,
                        "ping_rate": _rate,
                        "settings_rate": _rate,
                    },
                },
            },
        },
        "envoy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "admin_address": {"type": "string"},
                "admin_port": _port,
                "message_timeout": _duration,
                "concurrency": {"type": "integer", "minimum": 1},
            },
        },
        "codecs": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": _name,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["ref"],
                "properties": {"ref": {"type": "string", "minLength": 1}, "options": {"type": "object"}},
            },
        },
        "listeners": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "port", "codec", "routes"],
                "properties": {
                    "name": _name,
                    "address": {"type": "string"},
                    "port": _port,
                    "codec": _name,
                    "routes": {"type": "array", "items": _route},
                    "filters": {"type": "array", "items": _filter},
                    "max_frame_size": _size,
                    "frame_timeout": _duration,
                    "max_requests_in_flight": {"type": "integer", "minimum": 1},
                    "max_client_buffer": _size,
                    "max_upstream_queue": _size,
                    "drain_probe_interval": _duration,
                    "request_timeout": _duration,
                    "idle_timeout": _duration,
                    "tunnel_setup_timeout": _duration,
                    "tunnels_per_cluster": {"type": "integer", "minimum": 1, "maximum": 64},
                },
            },
        },
        "clusters": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "endpoints"],
                "properties": {
                    "name": _name,
                    "connect_timeout": _duration,
                    "lb_policy": {"enum": ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["address", "port"],
                            "properties": {"address": {"type": "string"}, "port": _port},
                        },
                    },
                    "circuit_breakers": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "max_connections": {"type": "integer", "minimum": 1},
                            "max_pending_requests": {"type": "integer", "minimum": 1},
                        },
                    },
                    "health_check": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "interval": _duration,
                            "timeout": _duration,
                            "unhealthy_threshold": {"type": "integer", "minimum": 1},
                            "healthy_threshold": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
    },
}


def explain(error) -> str:
    """A schema error as a user reads it: the accepted forms of a duration or a size, and the
    nearest valid key for an unknown one (jsonschema's own wording stays for the rest)."""
    forms = error.schema.get("x-forms") if isinstance(error.schema, dict) else None
    if forms is None:
        parent = error.parent
        forms = parent.schema.get("x-forms") if parent is not None and isinstance(parent.schema, dict) else None
    if forms is not None:
        return f"{error.instance!r} is not valid here; use {forms}"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in known]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return "; ".join(hints) + f"; valid keys: {', '.join(known)}"
    return error.message
