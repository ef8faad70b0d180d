"""The API server's check of per-request KV settings on the raw JSON.

vLLM's OpenAI protocol declares ``vllm_xargs`` as ``dict[str, str | int |
float | list]``, so pydantic turns ``{"kv_budget": true}`` into ``1`` before any
hook sees it: a boolean budget would be served as a budget of 1. This ASGI
middleware reads the request body first and answers HTTP 400 (in vLLM's error
format, naming the field and its allowed values) when the ``vllm_xargs`` of a
JSON request hold a ``kv_*`` value `tova_vllm.config.request_settings`
refuses; everything else goes on untouched. The engine-side check
(`tova_vllm.patch.request_params`) still runs for every request, offline
ones included.

Where it runs: innermost, after every other middleware of the server and
right in front of vLLM's routes (the seam
`tova_vllm.patch.entrypoints_middleware` puts it there). So vLLM's API-key
check (``--api-key`` / ``VLLM_API_KEY``) and any ``--middleware`` of the user
answer first: a request they refuse is never read here, whatever its body.
vLLM's own ``--middleware`` list cannot express that: vLLM adds those last, so
they run before its authentication.

What it reads: only a body vLLM's route would read as JSON itself, i.e. a
POST to a path the app has a route for, with the media type vLLM's
``validate_json_request`` accepts (``application/json``). A body that is not
a JSON object, or whose ``vllm_xargs`` is not an object, goes on untouched,
so vLLM gives it its own answer.
"""

from __future__ import annotations

import json
from typing import Any

MIDDLEWARE = "tova_vllm.request_check.KVSettingsCheck"


class KVSettingsCheck:
    """ASGI middleware (see the module docstring); ``engine`` is the server's
    `tova_vllm.config.KVSettings`."""

    def __init__(self, app: Any, engine: Any) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not _route_reads_json(scope):
            return await self.app(scope, receive, send)
        body, more, messages = b"", True, []
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        error = self._check(body) if b"vllm_xargs" in body else None
        if error is not None:
            return await _bad_request(send, *error)
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    def _check(self, body: bytes) -> tuple[str, str] | None:
        try:
            xargs = json.loads(body).get("vllm_xargs")
        except (ValueError, AttributeError):
            return None  # not a JSON object: vLLM answers that itself
        if not isinstance(xargs, dict) or not any(isinstance(k, str) and k.startswith("kv_") for k in xargs):
            return None
        from tova_vllm.config import PolicyConfigError, request_settings

        try:
            request_settings(self.engine, xargs)
        except PolicyConfigError as e:
            return str(e), str(e).split(" ", 1)[0]
        return None


def _route_reads_json(scope: dict) -> bool:
    """Whether vLLM's own route would read this request's body as JSON."""
    if scope["type"] != "http" or scope.get("method") != "POST":
        return False
    from starlette.datastructures import Headers
    from starlette.routing import Match

    # vLLM's validate_json_request, verbatim: anything else gets its 400.
    content_type = Headers(scope=scope).get("content-type", "").lower()
    if content_type.split(";", maxsplit=1)[0] != "application/json":
        return False
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", None)
    if routes is None:
        return True  # not a Starlette app: everything around it has let the request through

    # No route (a 404): vLLM reads nothing, neither does the check.
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


async def _bad_request(send: Any, message: str, param: str) -> None:
    payload = json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
