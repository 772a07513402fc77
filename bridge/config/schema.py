"""The config file's JSON Schema (checked with jsonschema before the model is built)."""

from __future__ import annotations

import difflib
from typing import Any

from metabridge.config.units import DURATION, SIZE, duration_problem, size_problem

__all__ = ["DURATION", "DURATION_VALUE", "SCHEMA", "SIZE_VALUE", "explain"]

# The syntax of durations and sizes is defined (and explained) in units; x-unit names it for explain().
DURATION_VALUE: dict[str, Any] = {"type": "string", "pattern": DURATION, "x-unit": "duration"}
SIZE_VALUE: dict[str, Any] = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": SIZE}], "x-unit": "size"}
_rate = {
    "type": "object",
    "additionalProperties": False,
    "required": ["burst", "per_second"],
    "properties": {"burst": {"type": "integer", "minimum": 1}, "per_second": {"type": "number", "exclusiveMinimum": 0}},
}
# '|' for Istio's names (outbound|PORT|SUBSET|HOST), which listeners and clusters from manifests take.
_name = {"type": "string", "pattern": r"^[A-Za-z0-9_.|-]+\Z", "x-unit": "name"}
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
        "timeout": DURATION_VALUE,
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
                "per_try_timeout": DURATION_VALUE,
            },
        },
    },
}
ROUTE = _route  # one route's schema, also for routes received over RDS (metabridge.xds)
_file = {"type": "string", "minLength": 1}
# A listener's routes from an xDS server (docs/rds.md).
_rds = {
    "type": "object",
    "additionalProperties": False,
    "required": ["server", "route_config_name"],
    "properties": {
        "server": {"type": "string", "minLength": 1},
        "route_config_name": {"type": "string", "minLength": 1},
        "api": {"enum": ["rds", "ads"]},
        "node_id": {"type": "string", "minLength": 1},
        "node_cluster": {"type": "string", "minLength": 1},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ca"],
            "properties": {"ca": _file, "cert": _file, "key": _file, "server_name": {"type": "string", "minLength": 1}},
            "dependentRequired": {"cert": ["key"], "key": ["cert"]},
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
                "mode": {"enum": ["ext_proc", "inprocess"]},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "metrics_port": _port,
                "metrics_address": {"type": "string", "minLength": 1},
                "log_level": {"enum": ["debug", "info", "warning", "error"]},
                "max_buffered_bytes": SIZE_VALUE,
                "grpc": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "max_concurrent_streams": {"type": "integer", "minimum": 1},
                        "max_header_list_size": SIZE_VALUE,
                        "max_frame_size": {"type": "integer", "minimum": 16384, "maximum": 16777215},
                        "max_message_size": SIZE_VALUE,
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
                "message_timeout": DURATION_VALUE,
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
                "required": ["name", "port", "codec"],  # and routes, or rds (checked in model.parse)
                "properties": {
                    "name": _name,
                    "address": {"type": "string"},
                    "port": _port,
                    "codec": _name,
                    "routes": {"type": "array", "items": _route},
                    "rds": _rds,
                    "filters": {"type": "array", "items": _filter},
                    "max_frame_size": SIZE_VALUE,
                    "frame_timeout": DURATION_VALUE,
                    "max_requests_in_flight": {"type": "integer", "minimum": 1},
                    "max_client_buffer": SIZE_VALUE,
                    "max_upstream_queue": SIZE_VALUE,
                    "drain_probe_interval": DURATION_VALUE,
                    "request_timeout": DURATION_VALUE,
                    "idle_timeout": DURATION_VALUE,
                    "tunnel_setup_timeout": DURATION_VALUE,
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
                    "connect_timeout": DURATION_VALUE,
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
                            "interval": DURATION_VALUE,
                            "timeout": DURATION_VALUE,
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
    """A schema error as a user reads it: what is wrong with a duration or a size and the forms
    accepted, and the nearest valid key for an unknown one (jsonschema's wording for the rest)."""
    unit = _unit(error.schema) or (_unit(error.parent.schema) if error.parent is not None else None)
    if unit == "duration":
        return duration_problem(error.instance)
    if unit == "size":
        return size_problem(error.instance)
    if unit == "name" and isinstance(error.instance, str):
        return f"{error.instance!r} is not a name: use letters, digits, '_', '.' and '-'"
    if error.validator == "enum" and isinstance(error.instance, str):
        options = {str(option).lower(): str(option) for option in error.validator_value}
        close = difflib.get_close_matches(error.instance.lower(), list(options), n=1, cutoff=0.8)
        hint = f" (did you mean {options[close[0]]!r}?)" if close else ""
        return f"{error.instance!r} is not one of {', '.join(options.values())}{hint}"
    choices = _alternative_keys(error)
    if choices:
        given = [key for key in choices if key in error.instance]
        return f"give exactly one of {', '.join(choices)}; this has " + (" and ".join(given) if given else "none")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in known]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return "; ".join(hints) + f"; valid keys: {', '.join(known)}"
    return error.message


def _unit(schema: object) -> str | None:
    """The syntax a schema stands for: its x-unit, or a plain duration pattern (filters' schemas)."""
    if not isinstance(schema, dict):
        return None
    return schema.get("x-unit") or ("duration" if schema.get("pattern") == DURATION else None)


def _alternative_keys(error) -> list[str]:
    """The keys of a oneOf whose alternatives each require one key (exact | prefix | ...)."""
    if error.validator != "oneOf" or not isinstance(error.instance, dict):
        return []
    alternatives = error.validator_value
    if all(isinstance(a, dict) and list(a) == ["required"] and len(a["required"]) == 1 for a in alternatives):
        return [a["required"][0] for a in alternatives]
    return []
