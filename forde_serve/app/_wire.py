"""What travels on the wire: the media types, the one shape of every error answer, and the service's routes
as the edge checks and the spec declares them (`_edge.py`, `_spec.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

__all__ = ["ERROR_STATUSES", "JSON", "MULTIPART", "ErrorBody", "Problem", "Route", "api_routes"]

JSON = "application/json"
MULTIPART = "multipart/form-data"


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


@dataclass(frozen=True)
class Route:
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


# Every route: bad body, body too large, wrong media type, over BentoML's concurrency limit, a bug, a timeout;
# 401 only where the route is guarded, 503 only where it batches.
ERROR_STATUSES = {
    400: "The request is not what the endpoint takes; `error` says which field, what was expected and what came.",
    401: "This endpoint changes what every caller is served: send `Authorization: Bearer <FORDE_ADMIN_TOKEN>`.",
    413: "The body is over the size limit (FORDE_MAX_BODY_BYTES), or an uploaded picture has too many pixels.",
    415: "The body's content-type is not the one the endpoint takes.",
    429: "More requests at once than the server takes (BentoML's traffic.max_concurrency); retry later.",
    500: "A bug in the server; its log has the traceback.",
    503: "Adaptive batching could not answer within its latency limit; retry later.",
    504: "The request took longer than the server's timeout.",
}


def api_routes(service, guarded: frozenset[str] = frozenset()) -> dict[str, Route]:
    routes = {}
    for name, api in service.apis.items():
        spec = api.input_spec
        statuses = tuple(s for s in ERROR_STATUSES if (s != 503 or api.batchable) and (s != 401 or name in guarded))
        fields = {f: info.is_required() for f, info in spec.model_fields.items()}
        path = "/" + "/".join(p for p in ((service.path_prefix or "").strip("/"), api.route.strip("/")) if p)
        routes[path] = Route(name, spec.mime_type(), fields, frozenset(spec.multipart_fields), statuses)
    return routes
