"""The shape of the resource fields metabridge reads (JSON Schema, checked per resource before
translation): types only, so that a wrong one is named with its field instead of failing later.
Fields not listed are not checked here (translate.py warns about the unsupported ones)."""

from __future__ import annotations

from typing import Any

_str: dict[str, Any] = {"type": "string"}
_int: dict[str, Any] = {"type": "integer"}
_labels = {"type": "object", "additionalProperties": _str}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


_ref = _object(kind=_str, name=_str, namespace=_str)
_match = _object(attributes={"type": "object", "additionalProperties": {"type": ["object", "null"], "properties": {k: _str for k in ("exact", "prefix", "regex")}}})
_bucket = _object(maxTokens=_int, tokensPerFill={"type": ["integer", "null"]}, fillInterval=_str)
_destination = _object(host=_str, subset=_str, port=_object(number=_int))
_mutation = _array({"type": "object", "required": ["key"], "properties": {"key": _str, "value": _str}})
_policy = _object(
    loadBalancer=_object(simple=_str, consistentHash=_object(httpHeaderName=_str)),
    connectionPool=_object(tcp=_object(maxConnections=_int, connectTimeout=_str), http=_object(http1MaxPendingRequests=_int)),
)

SPECS: dict[str, dict[str, Any]] = {
    "Service": _object(spec=_object(selector=_labels, ports=_array({"type": "object", "required": ["port"], "properties": {"name": _str, "port": _int, "targetPort": {"type": ["integer", "string"]}}}))),
    "Pod": _object(
        spec=_object(containers=_array(_object(ports=_array(_object(name=_str, containerPort=_int))))),
        status=_object(phase=_str, podIP=_str),
    ),
    "Endpoints": _object(subsets=_array(_object(addresses=_array(_object(ip=_str, targetRef=_ref)), ports=_array(_object(name=_str, port=_int))))),
    "EndpointSlice": _object(
        ports=_array(_object(name=_str, port=_int)),
        endpoints=_array(_object(addresses=_array(_str), conditions=_object(ready={"type": ["boolean", "null"]}), targetRef=_ref)),
    ),
    "ServiceEntry": _object(
        spec=_object(
            hosts=_array(_str),
            ports=_array({"type": "object", "required": ["number"], "properties": {"number": _int, "name": _str, "targetPort": _int}}),
            endpoints=_array(_object(address=_str, ports={"type": "object", "additionalProperties": _int}, labels=_labels)),
            workloadSelector=_object(labels=_labels),
            resolution=_str,
        )
    ),
    "DestinationRule": _object(spec=_object(host=_str, trafficPolicy=_policy, subsets=_array(_object(name=_str, labels=_labels, trafficPolicy=_policy)))),
    "ApplicationProtocol": _object(spec=_object(protocol=_str, codec=_str)),
    "MetaRouter": _object(
        spec=_object(
            hosts=_array(_str),
            routes=_array(
                _object(
                    name=_str,
                    match=_match,
                    route=_array(_object(destination=_destination, weight=_int)),
                    mirror=_destination,
                    mirrorPercentage=_object(value={"type": "number"}),
                    requestMutation=_mutation,
                    responseMutation=_mutation,
                )
            ),
            localRateLimit=_object(tokenBucket=_bucket, conditions=_array(_object(match=_match, tokenBucket=_bucket))),
            globalRateLimit=_object(
                domain=_str,
                match=_match,
                descriptors=_array(_object(property=_str, descriptorKey=_str)),
                rateLimitService=_str,
                requestTimeout=_str,
                denyOnFail={"type": "boolean"},
            ),
        )
    ),
}
# Every kind: metadata's labels and annotations are string maps; spec a mapping.
for _schema in SPECS.values():
    _schema["properties"]["metadata"] = _object(labels=_labels, annotations=_labels)
    _schema["properties"].setdefault("spec", {"type": "object"})
