"""Validate custom resources against the CRD schemas vendored in crds/ (their sources are in crds/README.md)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jsonschema
import yaml

CRD_DIR = Path(__file__).with_name("crds")


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """Map (apiVersion, kind) to the strict JSON Schema of every vendored CRD version."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def is_custom(resource: dict) -> bool:
    return (resource["apiVersion"], resource["kind"]) in crd_schemas()


def validation_errors(resource: dict) -> list[str]:
    """Return one line per schema violation of a custom resource, with the path of the offending field."""
    schema = crd_schemas()[(resource["apiVersion"], resource["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(resource), key=lambda error: list(error.absolute_path))
    ]


def strict_schema(node: dict) -> dict:
    """Turn an openAPIV3Schema node into JSON Schema that rejects unknown fields.

    The API server rejects unknown fields of a custom resource when the client asks for strict field
    validation, as `kubectl apply` does by default (--validate=strict in kubectl 1.37, the version of
    the test extra). It keeps any field under x-kubernetes-preserve-unknown-fields, so those objects
    stay open here too.
    """
    node = dict(node)
    if "pattern" in node:
        node["pattern"] = _python_pattern(node["pattern"])
    if "properties" in node:
        node["properties"] = {name: strict_schema(child) for name, child in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    if "items" in node:
        node["items"] = strict_schema(node["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in node:
            node[keyword] = [strict_schema(child) for child in node[keyword]]
    return node


def _python_pattern(pattern: str) -> str:
    # Go's RE2 accepts inline flags after `^`, but Python requires them at the very start.
    match = re.match(r"^\^(\(\?[a-z]+\))", pattern)
    return f"{match.group(1)}^{pattern[match.end():]}" if match else pattern
