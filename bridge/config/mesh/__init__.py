"""Kubernetes manifests (Aeraki's ApplicationProtocol and MetaRouter, Istio's ServiceEntry and
DestinationRule, Services with their Pods, Endpoints or EndpointSlices) as a metabridge config.

``load(folder, base)`` reads the folder (manifests.py), translates the resources into the file
config's raw dict (translate.py) and builds the Config with model.parse, so a config from
manifests is exactly the Config a file with the same content would give. The base config file,
optional, supplies `bridge:` and `envoy:`, codec overrides (`codecs.<protocol>`), and listeners
and clusters of its own.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metabridge.config.mesh.manifests import read_folder
from metabridge.config.mesh.translate import CODEC_ANNOTATION, translate
from metabridge.config.model import Config, ConfigError, parse

__all__ = ["CODEC_ANNOTATION", "Loaded", "build_raw", "load"]


@dataclass(frozen=True)
class Loaded:
    config: Config
    warnings: tuple[str, ...]


def _base(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with bridge, envoy, codecs, listeners, clusters")
    return raw


def build_raw(folder: Path, base: Path | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The raw config dict (what a file config would hold) and the warnings; ConfigError lists
    every problem that makes the manifests unusable."""
    raw, problems = translate(read_folder(Path(folder)), _base(base))
    if problems.errors:
        raise ConfigError("invalid manifests:\n  " + "\n  ".join(problems.errors))
    if not raw["listeners"]:
        raise ConfigError(f"{folder}: no Service or ServiceEntry port named tcp-metaprotocol-<protocol>[-<suffix>]: nothing to listen on")
    return raw, tuple(problems.warnings)


def load(folder: Path, base: Path | None = None) -> Loaded:
    raw, warnings = build_raw(folder, base)
    source = f"{base} + {folder}" if base else str(folder)
    # Codec refs in the base config are relative to it; refs from annotations are made absolute.
    config = parse(raw, source, base.parent if base else Path(folder))
    return Loaded(dataclasses.replace(config, config_file=Path(base).resolve() if base else None, manifests=Path(folder).resolve()), warnings)
