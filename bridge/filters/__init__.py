"""Built-in filters, registered by name, and the building of a listener's filter chain.

A listener's ``filters`` list names each filter: a built-in by ``name`` alone, or any filter
class by ``ref`` (``file.py:Class``, ``package.module:Class`` or an entry point in the
``metabridge.filters`` group), with its ``config`` mapping. The router always runs last.
"""

from __future__ import annotations

import inspect

from metabridge.registry import CodecLoadError, load_filter_class
from metabridge.sdk.filter import Filter

# name -> "module:Class" of the filters that ship with metabridge (imported when used).
BUILTIN: dict[str, str] = {
    "local_ratelimit": "metabridge.filters.local_ratelimit:LocalRateLimitFilter",
    "fault": "metabridge.filters.fault:FaultFilter",
    "ratelimit": "metabridge.filters.ratelimit:RateLimitFilter",
    "access_log": "metabridge.filters.access_log:AccessLogFilter",
    "tracing": "metabridge.filters.tracing:TracingFilter",
}


def build_filters(listener, config) -> list[Filter]:
    """One instance of each filter the listener lists, in order; errors name the config entry."""
    built = []
    for i, spec in enumerate(listener.filters):
        where = f"{config.source}: listeners[{listener.name}].filters[{i}]"
        index = next((k for k, entry in enumerate(config.listeners) if entry.name == listener.name), None)
        line = config.at(f"listeners[{index}].filters[{i}]") if index is not None else ""
        ref = spec.ref or BUILTIN.get(spec.name)
        if ref is None:
            known = ", ".join(sorted(BUILTIN)) or "none"
            raise CodecLoadError(f"{where}: unknown filter {spec.name!r} (built-in filters: {known}); give a 'ref' to load one from a file or package{line}")
        try:
            cls = load_filter_class(ref, config.base_dir)
        except CodecLoadError as exc:
            raise CodecLoadError(f"{where}.ref: {exc}{line}") from exc
        # Filters that hold a budget for the whole bridge (a local rate limit) take the number
        # of worker processes sharing it; others need not accept it.
        extra = {"workers": config.workers} if "workers" in inspect.signature(cls).parameters else {}
        try:
            instance = cls(spec.config, listener=listener.name, **extra)
        except Exception as exc:
            raise CodecLoadError(f"{where}: {spec.name!r} rejects its config: {type(exc).__name__}: {exc}{line}") from exc
        if not instance.name:
            instance.name = spec.name
        built.append(instance)
    return built
