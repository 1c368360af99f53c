"""The OpenAPI spec and BentoML's client schema, corrected to say what the service does, and the Swagger
page that shows the spec (`RequestEdge` answers GET /docs.json, /schema.json and / with them)."""

from __future__ import annotations

import copy
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel

from forde_serve.app._wire import ERROR_STATUSES, JSON, MULTIPART, ErrorBody, Route

__all__ = ["SWAGGER_PAGE", "truthful_schema", "truthful_spec"]

# The Swagger page at /: BentoML's own, less its third-party tag manager; every file it loads is served
# by this server (BentoML's static_content), so the page works offline and tells nobody it was opened.
SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"> </script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"> </script>
    <script src="./static_content/swagger-initializer.js" charset="UTF-8"> </script>
  </body>
</html>
"""
_REF = "#/components/schemas/{model}"


# API name -> (its input model, its output model): what BentoML generated its spec and schema from.
Apis = dict[str, tuple[type[BaseModel], type[BaseModel]]]


def truthful_spec(
    spec: dict[str, Any],
    routes: dict[str, Route],
    info: dict[str, str] | None = None,
    readable: tuple[str, ...] = (),
    apis: Apis | None = None,
) -> dict[str, Any]:
    """BentoML's generated OpenAPI 3.0 spec, corrected to say what the service does: the errors each API
    route answers, all as ErrorBody; null where a field can be null (`nullable`, as 3.0 says it; in a
    request body written in place, such as /predict_image's form, from the route's model in `apis`);
    `Prediction` for /predict_image's answer rather than a copy of it; the service's own `info` (title,
    version, description) rather than BentoML's placeholders."""
    spec = copy.deepcopy(spec)
    if info is not None:
        spec["info"] = dict(info)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorBody.model_json_schema(ref_template=_REF)
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorBody"] = error_schema
    # BentoML's own, which no route of this service answers (it has no task endpoints)
    for name in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        schemas.pop(name, None)
    for path, route in routes.items():
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        responses = {"200": operation["responses"]["200"]}
        for status in route.statuses:
            responses[str(status)] = {
                "description": f"{HTTPStatus(status).phrase}. {ERROR_STATUSES[status]}",
                "content": {JSON: {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
            }
        operation["responses"] = responses
        if path in readable:  # answered as the POST of an empty body
            spec["paths"][path]["get"] = {
                **{k: v for k, v in operation.items() if k not in ("requestBody", "operationId")},
                "operationId": f"get_{route.name}",
                "responses": {k: v for k, v in responses.items() if k not in ("413", "415", "401")},
            }
        for media in operation.get("requestBody", {}).get("content", {}).values():
            if route.media_type == MULTIPART:  # the edge refuses any other part
                media.get("schema", {})["additionalProperties"] = False
            if route.name in (apis or {}) and isinstance(media.get("schema"), dict):
                full = apis[route.name][0].model_json_schema()
                media["schema"] = _restore(media["schema"], full, full.get("$defs", {}), _NULLABLE, top=True)
    _use_originals(spec, schemas)
    _nullable(schemas)
    return spec


def _use_originals(spec: dict, schemas: dict) -> None:
    """BentoML copies a model an endpoint returns whole into `<Name>IODescriptor` (inlined in the answer,
    its nullable fields lost): answer with `$ref <Name>` instead, keeping the copy under that name where
    the model is not there otherwise."""
    copies = {name.removesuffix("IODescriptor") for name in schemas if name.endswith("IODescriptor")}
    for name in copies:
        original = schemas.pop(f"{name}IODescriptor")
        schemas.setdefault(name, original | {"title": name})

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict) and value.get("title", "").removesuffix("IODescriptor") in copies:
                    if value["title"].endswith("IODescriptor"):
                        node[key] = {"$ref": _REF.format(model=value["title"].removesuffix("IODescriptor"))}
                        continue
                if isinstance(value, dict) and value.get("$ref", "").endswith("IODescriptor"):
                    node[key] = {"$ref": value["$ref"].removesuffix("IODescriptor")}
                    continue
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec["paths"])


def _nullable(node) -> None:
    """pydantic writes `X | None` as anyOf [X, {type: null}], which OpenAPI 3.0 does not know: write it as
    X with `nullable: true`."""
    if isinstance(node, list):
        for value in node:
            _nullable(value)
        return
    if not isinstance(node, dict):
        return
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    for value in node.values():
        _nullable(value)


def truthful_schema(schema: dict[str, Any], apis: Apis) -> dict[str, Any]:
    """BentoML's `/schema.json` (what its own clients read), with null where the service sends or takes null.

    BentoML flattens `X | None` to the first of its options, at every depth, so a client decoding an
    answer by that schema iterates a null `member_probs` (or a monitor's null `fired_at`) as a list or a
    number and fails. Each route's input and output are walked beside the pydantic models they were
    flattened from (`apis`: API name -> (input model, output model)), and every property or item that
    can be null gets it back as `anyOf [X, null]`, which the client passes through as sent (a model's
    own `nullable: true`, as ExplainRow's target writes it, comes back in that form too).

    The client also walks a request by its schema: nested lists of numbers of the wrong shape (an
    input row of the wrong size) make it fail with a TypeError before anything is sent. Such
    properties are written `anyOf [X]` (the same constraint), which the client sends as given, so the
    server's 400 says what is wrong.
    """
    schema = copy.deepcopy(schema)
    for route in schema.get("routes", []):
        models = apis.get(route.get("name"))
        if models is None:
            continue
        for key, model in zip(("input", "output"), models, strict=True):
            if isinstance(route.get(key), dict):
                full = model.model_json_schema()  # what BentoML flattened (`_flatten_model_schema`)
                route[key] = _restore(route[key], full, full.get("$defs", {}), _ANY_OF, top=True)
    return schema


def _resolved(node: dict, defs: dict) -> tuple[dict, bool]:
    """A pydantic schema node as BentoML flattens it (allOf and anyOf to their first option, `$ref` to
    its definition), and whether it allows null."""
    node = dict(node)
    nullable = node.pop("nullable", None) is True
    if "allOf" in node:
        node.update(node.pop("allOf")[0])
    if "anyOf" in node:
        options = node.pop("anyOf")
        nullable = nullable or {"type": "null"} in options
        node.update(options[0])
    if "$ref" in node:
        inner, inner_nullable = _resolved(defs.get(node.pop("$ref").rsplit("/", 1)[-1], {}), defs)
        node.update(inner)
        nullable = nullable or inner_nullable
    return node, nullable


_ANY_OF, _NULLABLE = "anyOf", "nullable"  # how null is said: JSON Schema (the client's) or OpenAPI 3.0


def _restore(flat: dict, full: dict, defs: dict, form: str, top: bool = False) -> dict:
    """`flat`, BentoML's flattening of the pydantic schema node `full`, with null back wherever `full`
    (at any depth) allows it, said in `form`; for the client (`_ANY_OF`), nested lists of numbers as
    `anyOf [X]` too."""
    full, nullable = _resolved(full, defs)
    if "anyOf" in flat:  # left unflattened: it already says what it allows
        return flat
    if isinstance(flat.get("properties"), dict) and isinstance(full.get("properties"), dict):
        for name, prop in flat["properties"].items():
            if isinstance(prop, dict) and isinstance(full["properties"].get(name), dict):
                prop = _restore(prop, full["properties"][name], defs, form)
                nested = prop.get("type") == "array" and prop.get("items", {}).get("type") == "array"
                if form == _ANY_OF and nested and "anyOf" not in prop:
                    kept = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
                    prop = {"anyOf": [prop], **kept}
                flat["properties"][name] = prop
    if isinstance(flat.get("items"), dict) and isinstance(full.get("items"), dict):
        flat["items"] = _restore(flat["items"], full["items"], defs, form)
    if form == _NULLABLE:
        if nullable and not top:
            flat["nullable"] = True
        return flat
    flat.pop("nullable", None)  # OpenAPI 3.0's word (ExplainRow's target writes it), which the client does not read
    if nullable and not top:
        kept = {k: flat.pop(k) for k in ("title", "description", "default") if k in flat}
        return {"anyOf": [flat, {"type": "null"}], **kept}
    return flat
