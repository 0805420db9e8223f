"""Check request bodies against Discord's own OpenAPI description of its HTTP API.

The fake Discord calls :func:`validate_request` on every JSON body it receives, so a payload that real
Discord would reject with 400 "Invalid Form Body" shows up in tests instead of in production.

The spec is looked up in ``$FLUXBOT_DISCORD_OPENAPI`` first, then in ``../shared/discord-api-spec/openapi.json``
beside the repository. Without it every check passes silently: the spec is a convenience of this
workspace, not a dependency of the project.

Loading the 1.2 MB document costs ~20 ms once per process; each operation's validator is compiled on
first use and cached, and a typical message body validates in well under a millisecond.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ENV_VAR = "FLUXBOT_DISCORD_OPENAPI"
_SPEC_URI = "urn:fluxbot:discord-openapi"
_MAX_ERRORS = 5
_MAX_MESSAGE = 300
_METHODS = ("get", "put", "post", "patch", "delete")

# discord.py (like every client) sends attachment ids as integers ({"id": 0} for files[0]) and Discord
# accepts them, while the spec types every snowflake as a decimal string. Without this every upload
# would be "invalid".
_LENIENT_SNOWFLAKE: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"},
        {"type": "integer", "minimum": 0},
    ]
}


def _one_of_as_any_of(validator: Any, one_of: Any, instance: Any, schema: Any) -> Iterator[Any]:
    # The spec marks unions "oneOf" whose branches overlap (e.g. a null-able field whose object branch
    # has no required keys); Discord itself accepts a value that matches any branch.
    yield from jsonschema.Draft202012Validator.VALIDATORS["anyOf"](validator, one_of, instance, schema)


_Validator: Any = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"oneOf": _one_of_as_any_of})


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def _leaves(error: Any) -> Iterator[Any]:
    if not error.context:
        yield error
        return
    for child in error.context:
        yield from _leaves(child)


def _is_branch_mismatch(leaf: Any) -> bool:
    # "2 is not one of [10]" on a "type" key only says the instance is some other union member.
    path = leaf.absolute_path
    return leaf.validator in ("enum", "const") and bool(path) and path[-1] == "type"


def _describe(error: Any) -> str:
    text = f"at {error.json_path}: {_shorten(str(error.message))}"
    if error.context:
        # A failed union only says "not valid under any of the given schemas"; the branch error that
        # got deepest into the instance is almost always the one that explains the mistake.
        leaves = list(_leaves(error))
        meaningful = [leaf for leaf in leaves if not _is_branch_mismatch(leaf)] or leaves
        closest = max(meaningful, key=lambda leaf: len(leaf.absolute_path))
        text += f" (closest: at {closest.json_path}: {_shorten(str(closest.message))})"
    return text


def default_spec_path() -> Path:
    """``<repo>/../shared/discord-api-spec/openapi.json``, computed from this file's location."""
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "discord-api-spec" / "openapi.json"


def spec_path() -> Path | None:
    """Where the spec is, or None when it is absent (then validation is skipped)."""
    candidates: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidates.append(Path(env))
    candidates.append(default_spec_path())
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@dataclass(frozen=True)
class Operation:
    """One (method, path template) of the spec that takes a JSON request body."""

    method: str
    template: str
    operation_id: str
    pattern: re.Pattern[str]
    literal_segments: int
    body_pointer: str | None


@dataclass
class OpenAPISpec:
    """A loaded spec with lazily compiled, cached validators."""

    document: dict[str, Any]
    source: str
    operations: list[Operation] = field(default_factory=list)
    _registry: Any = None
    _validators: dict[str, Any] = field(default_factory=dict)
    _discriminators: dict[str, dict[Any, str] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copy only the path down to the one replaced schema; the rest is shared and never mutated.
        components = dict(self.document.get("components", {}))
        schemas = dict(components.get("schemas", {}))
        if "SnowflakeType" in schemas:
            schemas["SnowflakeType"] = _LENIENT_SNOWFLAKE
        components["schemas"] = schemas
        document = {**self.document, "components": components}
        self.document = document
        self._registry = Registry().with_resource(_SPEC_URI, DRAFT202012.create_resource(document))
        for template, item in document.get("paths", {}).items():
            for method in _METHODS:
                op = item.get(method)
                if op is None:
                    continue
                self.operations.append(self._operation(method, template, op))
        # Prefer "/users/@me" over "/users/{user_id}" and "@original" over "{message_id}".
        self.operations.sort(key=lambda o: -o.literal_segments)

    @staticmethod
    def _operation(method: str, template: str, op: dict[str, Any]) -> Operation:
        segments = template.strip("/").split("/")
        regex = "/".join("[^/]+" if s.startswith("{") else re.escape(s) for s in segments)
        literal = sum(1 for s in segments if not s.startswith("{"))
        content = op.get("requestBody", {}).get("content", {})
        pointer = None
        if "application/json" in content:
            pointer = f"/paths/{_escape(template)}/{method}/requestBody/content/{_escape('application/json')}/schema"
        return Operation(
            method=method.upper(),
            template=template,
            operation_id=str(op.get("operationId", f"{method} {template}")),
            pattern=re.compile(f"/{regex}"),
            literal_segments=literal,
            body_pointer=pointer,
        )

    def find_operation(self, method: str, path: str) -> Operation | None:
        """The spec operation for ``path`` (relative to ``/api/v10``, without query)."""
        method = method.upper()
        for op in self.operations:
            if op.method == method and op.pattern.fullmatch(path):
                return op
        return None

    def _resolve(self, pointer: str) -> dict[str, Any]:
        node: Any = self.document
        for raw in pointer.strip("/").split("/"):
            token = raw.replace("~1", "/").replace("~0", "~")
            node = node[int(token)] if isinstance(node, list) else node[token]
        # Follow a chain of plain references so unions are seen through "$ref" wrappers.
        while isinstance(node, dict) and set(node) <= {"$ref", "description"} and "$ref" in node:
            node = self._resolve(str(node["$ref"]).removeprefix("#"))
        if not isinstance(node, dict):
            raise KeyError(pointer)
        return node

    def _validator(self, pointer: str) -> Any:
        validator = self._validators.get(pointer)
        if validator is None:
            validator = _Validator({"$ref": f"{_SPEC_URI}#{pointer}"}, registry=self._registry)
            self._validators[pointer] = validator
        return validator

    def _discriminator(self, pointer: str) -> dict[Any, str] | None:
        """For a union whose branches each pin ``type`` (the interaction callback body), map each
        ``type`` value to its branch, so a bad body is reported against the branch it meant rather
        than as "not valid under any of the given schemas"."""
        if pointer in self._discriminators:
            return self._discriminators[pointer]
        result: dict[Any, str] | None = None
        schema = self._resolve(pointer)
        for keyword in ("anyOf", "oneOf"):
            branches = schema.get(keyword)
            if not isinstance(branches, list):
                continue
            mapping: dict[Any, str] = {}
            for index, branch in enumerate(branches):
                branch_pointer = (
                    str(branch["$ref"]).removeprefix("#")
                    if isinstance(branch, dict) and "$ref" in branch
                    else f"{pointer}/{keyword}/{index}"
                )
                type_schema = self._resolve(branch_pointer).get("properties", {}).get("type", {})
                values = type_schema.get("enum") or ([type_schema["const"]] if "const" in type_schema else None)
                if not values:
                    mapping = {}
                    break
                for value in values:
                    mapping.setdefault(value, branch_pointer)
            result = mapping or None
            break
        self._discriminators[pointer] = result
        return result

    def validate_pointer(self, pointer: str, instance: Any, *, label: str) -> list[str]:
        mapping = self._discriminator(pointer)
        if mapping is not None and isinstance(instance, dict) and instance.get("type") in mapping:
            pointer = mapping[instance["type"]]
        validator = self._validator(pointer)
        errors: list[str] = []
        for error in validator.iter_errors(instance):
            errors.append(f"{label}: {_describe(error)}")
            if len(errors) >= _MAX_ERRORS:
                break
        return errors

    def validate_request(self, method: str, path: str, body: Any) -> list[str]:
        op = self.find_operation(method, path)
        if op is None or op.body_pointer is None:
            return []
        return self.validate_pointer(op.body_pointer, body, label=f"{op.method} {path} ({op.operation_id})")

    def validate_component(self, name: str, instance: Any) -> list[str]:
        return self.validate_pointer(f"/components/schemas/{_escape(name)}", instance, label=name)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> OpenAPISpec:
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    return OpenAPISpec(document=document, source=path)


def get_spec() -> OpenAPISpec | None:
    """The cached spec, or None when it is not available here."""
    path = spec_path()
    if path is None:
        return None
    return _load(str(path.resolve()))


def validate_request(method: str, path: str, body: Any) -> list[str]:
    """Errors of ``body`` against the JSON request schema of ``method path`` (``path`` relative to
    ``/api/v10``, e.g. ``/webhooks/1/tok/messages/@original``). Empty when valid, when the route takes
    no JSON body, when the route is not in the spec, or when the spec is absent."""
    spec = get_spec()
    if spec is None:
        return []
    return spec.validate_request(method, path, body)


def validate_component(name: str, instance: Any) -> list[str]:
    """Errors of ``instance`` against ``#/components/schemas/<name>``; empty when the spec is absent."""
    spec = get_spec()
    if spec is None:
        return []
    return spec.validate_component(name, instance)
