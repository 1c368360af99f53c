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
- GET /docs.json is answered with `truthful_spec` of BentoML's spec, GET /schema.json (what BentoML's
  clients read) with `truthful_schema`, and GET / with a Swagger page that loads nothing from elsewhere.

Other paths (BentoML's /readyz, /metrics, the Swagger page, any mounted app) pass untouched but for
the size limit. `quiet_caller_errors` makes BentoML log a refused request on one line, not a traceback.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus

from bentoml.exceptions import BentoMLException, InvalidArgument

from forde_serve.app._spec import SWAGGER_PAGE, truthful_schema, truthful_spec
from forde_serve.app._wire import JSON, MULTIPART, ErrorBody, Problem, Route, api_routes
from forde_serve.images import ImageTooLarge
from forde_serve.runtime import InvalidInput

__all__ = ["RequestEdge", "quiet_caller_errors", "refusal"]

log = logging.getLogger(__name__)

_HTML = "text/html; charset=utf-8"
READABLE = ("/monitor",)  # API routes that also answer GET (as a POST of {})


def refusal(err: InvalidInput) -> BentoMLException:
    """A caller's bad input as the exception BentoML answers with its status: 413 for a picture too
    large, else 400. The message (field: expected, got) is the error's own."""
    message = str(err)
    if isinstance(err, ImageTooLarge):
        return BentoMLException(message, error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return InvalidArgument(message)


class _Refuse(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class RequestEdge:
    """ASGI middleware around the service (BentoML's `add_asgi_middleware`): see the module docstring."""

    def __init__(
        self,
        app,
        service,
        max_body_bytes: int,
        info: dict[str, str] | None = None,
        guarded: dict[str, Callable[[bytes], bool]] | None = None,
        token: str | None = None,
    ):
        """`info`: the spec's title, version, description; `guarded`: API name -> whether a request body
        (bytes) is a write that needs the admin `token` (401 in the spec; no token: nothing is guarded)."""
        self.app, self.service, self.max_body_bytes, self.info = app, service, max_body_bytes, info
        self.guarded, self.token = guarded or {}, token
        self._routes: dict[str, Route] | None = None

    @property
    def routes(self) -> dict[str, Route]:
        if self._routes is None:  # the service's APIs are all registered once requests arrive
            self._routes = api_routes(self.service, frozenset(self.guarded))
        return self._routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/docs.json":
            return await self.app(scope, receive, _Rewrite(send, self._spec, statuses=(200,)))
        if scope["method"] == "GET" and scope["path"] == "/schema.json":
            return await self.app(scope, receive, _Rewrite(send, self._schema, statuses=(200,)))
        if scope["method"] == "GET" and scope["path"] in READABLE:
            # a read with GET, as monitoring tools expect: the API's POST of an empty JSON body
            scope, receive = _as_empty_post(scope)
        if scope["method"] == "GET" and scope["path"] == "/":
            return await _send(send, 200, SWAGGER_PAGE.format(title=html.escape(self.title)).encode(), _HTML)
        route = self.routes.get(scope["path"])
        post = route is not None and scope["method"] == "POST"
        guard = self.guarded.get(route.name) if post and self.token is not None else None
        try:
            receive = await self._within_limit(scope, receive, buffer=post and (bool(route.files) or guard is not None))
            if post:
                await self._check(route, scope, receive)
            if guard is not None and guard(receive.body):
                self._authorize(route, scope)
        except _Refuse as refused:
            log.warning("Refused %s [%s]: %s: %s", scope["path"], scope["method"], refused.field, refused.message)
            return await _answer(send, refused.status, refused.field, refused.message)
        if route is None:
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, _Rewrite(send, _error_body, statuses=range(400, 600)))

    @property
    def title(self) -> str:
        return (self.info or {}).get("title", "API")

    @property
    def apis(self) -> dict[str, tuple[type, type]]:
        """API name -> (input model, output model), which the spec and schema are corrected by."""
        return {name: (api.input_spec, api.output_spec) for name, api in self.service.apis.items()}

    def _schema(self, status: int, body: bytes) -> bytes:
        return json.dumps(truthful_schema(json.loads(body), self.apis)).encode()

    def _spec(self, status: int, body: bytes) -> bytes:
        return json.dumps(truthful_spec(json.loads(body), self.routes, self.info, READABLE, self.apis)).encode()

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

    def _authorize(self, route: Route, scope) -> None:
        """Refuse (401) a write without `Authorization: Bearer <token>`. Here, not in the API: BentoML
        answers a 401 raised there with a bare "Authorization error". Compared in constant time, so the
        answer's timing does not say how much of a guess was right."""
        header = dict(scope.get("headers") or {}).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            what = "re-arming the shift alarm" if route.name == "monitor" else f"/{route.name}"
            raise _Refuse(
                401,
                "authorization",
                f"{what} changes what every caller is served, so it needs the header `Authorization: Bearer "
                "<FORDE_ADMIN_TOKEN>`; got none or another token",
            )

    async def _check(self, route: Route, scope, receive) -> None:
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


def _as_empty_post(scope):
    headers = [(k, v) for k, v in scope.get("headers") or [] if k not in (b"content-type", b"content-length")]
    scope = dict(scope, method="POST", headers=[*headers, (b"content-type", JSON.encode()), (b"content-length", b"2")])
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": b"{}", "more_body": False}

    return scope, receive


async def _check_form(route: Route, scope, body: bytes) -> None:
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
