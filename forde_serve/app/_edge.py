"""The edge of the HTTP service: what a request must look like before BentoML parses it, what an error
looks like after BentoML answers, and an OpenAPI spec that says both.

BentoML 1.4 answers some caller mistakes with a 500 (a multipart body with a bad boundary, a file part
sent to a JSON endpoint, a text part where a file is expected, which it even tries to fetch as a URL)
and its 4xx bodies come in two shapes, neither the one its spec declares. `RequestEdge`, one ASGI
middleware, fixes all of it in one place for the service's own API routes:

- a body over the size limit is a 413 before it is read (every route);
- a body of the wrong media type is a 415 that says what the endpoint takes;
- a multipart body must parse, and hold exactly the endpoint's fields, files as file parts and the
  rest as text parts, before BentoML sees it (so it never fetches a URL given by a client);
- every error answer from those routes is rewritten into one shape, `ErrorBody`;
- GET /docs.json is answered with `truthful_spec` of BentoML's spec.

Other paths (BentoML's /readyz, /metrics, the Swagger page, any mounted app) pass untouched but for
the size limit. `quiet_caller_errors` makes BentoML log a refused request on one line, not a traceback.
"""

from __future__ import annotations

import copy
import html
import json
import logging
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, Field

from forde_serve.images import ImageTooLarge
from forde_serve.runtime import InvalidInput

__all__ = ["ErrorBody", "Problem", "RequestEdge", "quiet_caller_errors", "refusal", "truthful_spec"]

log = logging.getLogger(__name__)

JSON = "application/json"
MULTIPART = "multipart/form-data"
_HTML = "text/html; charset=utf-8"
# The Swagger page at /: BentoML's own, less its third-party tag manager; every file it loads is served
# by this server (BentoML's static_content), so the page works offline and tells nobody it was opened.
_SWAGGER_PAGE = """<!DOCTYPE html>
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


class Problem(BaseModel):
    field: str = Field(
        description="where: a path into the JSON body (inputs[0].input), a form field (image), a header "
        "(content-type), or body / request / server for the whole"
    )
    message: str = Field(description="what was expected and what came")


class ErrorBody(BaseModel):
    """The body of every error answer of the service's endpoints."""

    error: str = Field(description="one sentence: the field, what was expected and what came")
    detail: list[Problem] = Field(
        default_factory=list,
        description="every problem found, one per field (absent only from BentoML's own 429 and 504 answers, "
        "which its traffic limits send before this service sees the request)",
    )


def refusal(err: InvalidInput) -> BentoMLException:
    """A caller's bad input as the exception BentoML answers with its status: 413 for a picture too
    large, else 400. The message (field: expected, got) is the error's own."""
    message = str(err)
    if isinstance(err, ImageTooLarge):
        return BentoMLException(message, error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return InvalidArgument(message)


@dataclass(frozen=True)
class _Route:
    name: str
    media_type: str  # what the endpoint takes
    fields: dict[str, bool]  # form fields -> required (multipart endpoints)
    files: frozenset[str]  # form fields that are files
    statuses: tuple[int, ...]  # error statuses the route can answer

    def takes(self) -> str:
        if self.media_type != MULTIPART:
            return f"/{self.name} takes a JSON body (content-type: {JSON})"
        fields = ", ".join(f"{f} ({'a file' if f in self.files else 'text'})" for f in self.fields)
        return f"/{self.name} takes a {MULTIPART} body with the fields {fields}"


# Every route: bad body, body too large, wrong media type, over BentoML's concurrency limit, a bug, a timeout.
_ERRORS = {
    400: "The request is not what the endpoint takes; `error` says which field, what was expected and what came.",
    413: "The body is over the size limit (FORDE_MAX_BODY_BYTES), or an uploaded picture has too many pixels.",
    415: "The body's content-type is not the one the endpoint takes.",
    429: "More requests at once than the server takes (BentoML's traffic.max_concurrency); retry later.",
    500: "A bug in the server; its log has the traceback.",
    503: "Adaptive batching could not answer within its latency limit; retry later.",
    504: "The request took longer than the server's timeout.",
}


def _routes(service) -> dict[str, _Route]:
    routes = {}
    for name, api in service.apis.items():
        spec = api.input_spec
        statuses = tuple(s for s in _ERRORS if s != 503 or api.batchable)
        fields = {f: info.is_required() for f, info in spec.model_fields.items()}
        path = "/" + "/".join(p for p in ((service.path_prefix or "").strip("/"), api.route.strip("/")) if p)
        routes[path] = _Route(name, spec.mime_type(), fields, frozenset(spec.multipart_fields), statuses)
    return routes


class _Refuse(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class RequestEdge:
    """ASGI middleware around the service (BentoML's `add_asgi_middleware`): see the module docstring."""

    def __init__(self, app, service, max_body_bytes: int, info: dict[str, str] | None = None):
        self.app, self.service, self.max_body_bytes, self.info = app, service, max_body_bytes, info
        self._routes: dict[str, _Route] | None = None

    @property
    def routes(self) -> dict[str, _Route]:
        if self._routes is None:  # the service's APIs are all registered once requests arrive
            self._routes = _routes(self.service)
        return self._routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/docs.json":
            return await self.app(scope, receive, _Rewrite(send, self._spec, statuses=(200,)))
        if scope["method"] == "GET" and scope["path"] == "/":
            return await _send(send, 200, _SWAGGER_PAGE.format(title=html.escape(self.title)).encode(), _HTML)
        route = self.routes.get(scope["path"])
        post = route is not None and scope["method"] == "POST"
        try:
            receive = await self._within_limit(scope, receive, buffer=post and bool(route.files))
            if post:
                await self._check(route, scope, receive)
        except _Refuse as refused:
            log.warning("Refused %s [%s]: %s: %s", scope["path"], scope["method"], refused.field, refused.message)
            return await _answer(send, refused.status, refused.field, refused.message)
        if route is None:
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, _Rewrite(send, _error_body, statuses=range(400, 600)))

    @property
    def title(self) -> str:
        return (self.info or {}).get("title", "API")

    def _spec(self, status: int, body: bytes) -> bytes:
        return json.dumps(truthful_spec(json.loads(body), self.routes, self.info)).encode()

    async def _within_limit(self, scope, receive, buffer: bool):
        """`receive` for the app: refuses a body over the limit, by its content-length before reading it,
        or while reading a body that has none; reads the whole body first when `buffer` (to check a form)."""
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _Refuse(413, "body", f"expected at most {self.max_body_bytes} bytes, got {int(length)}")
        if length is not None and length.isdigit() and not buffer:
            return receive
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise _Refuse(413, "body", f"expected at most {self.max_body_bytes} bytes, got more")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        replay.body = b"".join(m.get("body", b"") for m in messages)
        return replay

    async def _check(self, route: _Route, scope, receive) -> None:
        """Refuse a body of the wrong media type, and a form BentoML would choke on, before BentoML parses it."""
        header = dict(scope.get("headers") or {}).get(b"content-type", b"").decode("latin-1")
        media_type, _, parameters = header.partition(";")
        media_type = media_type.strip().lower()
        if route.media_type != MULTIPART:
            # No content-type at all is read as JSON, as BentoML does; anything else is a mistake.
            if media_type not in ("", JSON):
                raise _Refuse(415, "content-type", f"{route.takes()}, got {media_type}")
            return
        if media_type != MULTIPART:
            raise _Refuse(415, "content-type", f"{route.takes()}, got {media_type or 'no content-type'}")
        boundary = re.search(r"boundary=\"?([^\";]*)", parameters)
        if boundary is None or not boundary.group(1).strip():
            raise _Refuse(400, "content-type", f"expected {MULTIPART} with a boundary=..., got {header!r}")
        await _check_form(route, scope, receive.body)


async def _check_form(route: _Route, scope, body: bytes) -> None:
    """Parse the form as BentoML will and refuse what it would answer with a 500 (or a URL fetch)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    sent = False

    async def once():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, once)
    try:
        form = await request.form(max_files=len(route.files) + 1, max_fields=len(route.fields) + 1)
    except (MultiPartException, HTTPException) as err:
        message = getattr(err, "message", None) or getattr(err, "detail", "")
        raise _Refuse(
            400, "body", f"expected a {MULTIPART} body that parses, got one that does not ({message})"
        ) from None
    try:
        names = list(form.keys())
        if not names:
            raise _Refuse(
                400, "body", f"{route.takes()}, got no parts (does the boundary in content-type match the body?)"
            )
        for name in names:
            if name not in route.fields:
                raise _Refuse(400, name, f"{route.takes()}, got an unknown field {name!r}")
            values = form.getlist(name)
            if len(values) > 1:
                raise _Refuse(400, name, f"expected one {name} part, got {len(values)}")
            is_file = isinstance(values[0], UploadFile)
            if name in route.files and not is_file:
                raise _Refuse(400, name, "expected a file part (one with a filename), got a text field")
            if name not in route.files and is_file:
                raise _Refuse(400, name, "expected a text field (a JSON value such as true or 0.9), got a file part")
        missing = [f for f, required in route.fields.items() if required and f not in names]
        if missing:
            raise _Refuse(400, missing[0], f"{route.takes()}, got no {missing[0]} part")
    finally:
        await form.close()


async def _answer(send, status: int, field: str, message: str) -> None:
    body = ErrorBody(error=f"{field}: {message}", detail=[Problem(field=field, message=message)])
    await _send_json(send, status, body.model_dump_json().encode())


async def _send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    await _send(send, status, body, JSON, headers)


async def _send(send, status: int, body: bytes, media_type: str, headers: list | None = None) -> None:
    kept = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-length", b"content-type")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*kept, (b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Rewrite:
    """An ASGI `send` that hands the whole body of a response whose status is in `statuses` to
    `rewrite(status, body) -> body` and sends the result as JSON."""

    def __init__(self, send, rewrite, statuses):
        self.send, self.rewrite, self.statuses = send, rewrite, statuses
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            if message["status"] not in self.statuses:
                self.start = None
                return await self.send(message)
            self.start = message
            return None
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        status = self.start["status"]
        await _send_json(self.send, status, self.rewrite(status, b"".join(self.chunks)), self.start.get("headers"))


def _error_body(status: int, body: bytes) -> bytes:
    """Any error answer of BentoML's (pydantic's errors, `[{"error": ...}]`, `{"error": ...}`, plain text) as
    an ErrorBody."""
    try:
        data = json.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace").strip()
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML's shape for an exception with a 4xx status
    problems: list[Problem] = []
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        for item in data["detail"]:
            if isinstance(item, dict) and "msg" in item:  # a pydantic error
                message = str(item["msg"]).removeprefix("Value error, ")
                if item.get("type") == "extra_forbidden" or message == "Extra inputs are not permitted":
                    message = "unknown field: the endpoint takes only the fields its schema in /docs.json lists"
                problems.append(Problem(field=_path(item.get("loc") or ()), message=message))
            elif isinstance(item, dict) and {"field", "message"} <= set(item):  # ours already
                problems.append(Problem(field=str(item["field"]), message=str(item["message"])))
    if not problems:
        text = str(data.get("error", "")) if isinstance(data, dict) else str(data)
        text = text or HTTPStatus(status).phrase
        match = re.fullmatch(r"([A-Za-z_][\w.\[\]-]*): (.+)", text, flags=re.S)
        default = "server" if status >= 500 else "request"
        field, message = match.groups() if match else (default, text)
        problems.append(Problem(field=field, message=message))
    first = problems[0]
    error = f"{first.field}: {first.message}"
    if len(problems) > 1:
        error += f" (and {len(problems) - 1} more problems, listed in detail)"
    return ErrorBody(error=error, detail=problems).model_dump_json().encode()


def _path(loc) -> str:
    """A pydantic error location as a path into the body: ("inputs", 0, "input") -> inputs[0].input."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def truthful_spec(
    spec: dict[str, Any], routes: dict[str, _Route], info: dict[str, str] | None = None
) -> dict[str, Any]:
    """BentoML's generated OpenAPI 3.0 spec, corrected to say what the service does: the errors each API
    route answers, all as ErrorBody; null where a field can be null (`nullable`, as 3.0 says it);
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
                "description": f"{HTTPStatus(status).phrase}. {_ERRORS[status]}",
                "content": {JSON: {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
            }
        operation["responses"] = responses
        if route.media_type == MULTIPART:  # the edge refuses any other part
            for media in operation.get("requestBody", {}).get("content", {}).values():
                media.get("schema", {})["additionalProperties"] = False
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


class _CallerMistakesOnOneLine(logging.Filter):
    """BentoML logs every request it refuses with a full traceback ("Exception on /predict [POST]"). For a
    caller's mistake (a pydantic validation error, or a BentoMLException with a 4xx status) write one
    line instead; anything else, a real server error, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            errors = error.errors(include_url=False, include_context=False, include_input=False)
            summary = json.loads(_error_body(400, json.dumps({"detail": errors}, default=str).encode()))
        elif isinstance(error, BentoMLException) and 400 <= error.error_code < 500:
            summary = json.loads(_error_body(error.error_code, json.dumps({"error": str(error)}).encode()))
        else:
            return True
        path, method = (record.args + ("?", "?"))[:2] if isinstance(record.args, tuple) else ("?", "?")
        record.msg, record.args = "Refused %s [%s]: %s", (path, method, summary["error"])
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


_FILTER = _CallerMistakesOnOneLine()


def quiet_caller_errors() -> None:
    """Install the one-line logging of refused requests (idempotent)."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
