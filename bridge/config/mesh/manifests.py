"""Reading a folder of Kubernetes manifests: every *.yaml / *.yml file under it (sorted), each
file one or more YAML documents, a document one resource or a ``kind: List`` of them. Each
resource keeps where it came from, so a problem can name its file, line, kind/namespace/name
and field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metabridge.config.model import ConfigError, line_finder

DEFAULT_NAMESPACE = "default"  # kubectl's, for a manifest without metadata.namespace


@dataclass
class Resource:
    api_version: str
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]
    file: Path
    # The line (1-based, in the file) of a field of the resource, from its path of keys and indices.
    line_of: Callable[[list], int | None] = field(repr=False, default=lambda path: None)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.body.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def metadata(self) -> dict[str, Any]:
        meta = self.body.get("metadata")
        return meta if isinstance(meta, dict) else {}

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.get("labels") or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.metadata.get("annotations") or {})


def _finder(text: str, node: yaml.Node, prefix: list) -> Callable[[list], int | None]:
    """model.line_finder over this document's slice of the file, shifted to the file's lines."""
    find = line_finder(text[node.start_mark.index : node.end_mark.index])
    offset = node.start_mark.line

    def line_of(path: list) -> int | None:
        line = find(prefix + list(path))
        return None if line is None else line + offset

    return line_of


def _documents(path: Path) -> list[tuple[Any, Callable[[list], int | None]]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read manifest: {exc.strerror}") from exc
    loader = yaml.SafeLoader(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            documents.append((loader.construct_document(node), node))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return [(data, node) for data, node in documents if data is not None]


def read_folder(folder: Path) -> list[Resource]:
    """Every resource in the manifests under ``folder`` (a single file is accepted too)."""
    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    else:
        raise ConfigError(f"{folder}: no such manifest folder")
    resources: list[Resource] = []
    problems: list[str] = []
    for path in files:
        text = path.read_text()
        for index, (data, node) in enumerate(_documents(path)):
            if isinstance(data, dict) and data.get("kind") == "List":
                items = data.get("items") or []
                if not isinstance(items, list):
                    problems.append(f"{path}: document {index + 1}: List: items: expected a list of resources (line {_finder(text, node, [])(['items'])})")
                    continue
                entries = [(item, ["items", i]) for i, item in enumerate(items)]
            else:
                entries = [(data, [])]
            for item, prefix in entries:
                line_of = _finder(text, node, prefix)
                where = f"{path}: document {index + 1}" + (f" {prefix[0]}[{prefix[1]}]" if prefix else "")
                if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
                    problems.append(f"{where}: not a Kubernetes resource (no 'kind'); remove it or give it apiVersion, kind and metadata (line {line_of([])})")
                    continue
                meta = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
                if not isinstance(meta.get("name"), str) or not meta["name"]:
                    problems.append(f"{where}: {item['kind']} without metadata.name; every resource needs a name (line {line_of(['metadata'])})")
                    continue
                resources.append(
                    Resource(
                        api_version=str(item.get("apiVersion", "")),
                        kind=item["kind"],
                        namespace=str(meta.get("namespace") or DEFAULT_NAMESPACE),
                        name=meta["name"],
                        body=item,
                        file=path,
                        line_of=line_of,
                    )
                )
    if problems:
        raise ConfigError("invalid manifests:\n  " + "\n  ".join(problems))
    return resources
