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

Installed through vLLM's own ``--middleware`` extension point: the
``engine_args`` seam adds it to ``vllm serve``'s arguments when a policy is
set (`MIDDLEWARE`).
"""

from __future__ import annotations

import json
from typing import Any

MIDDLEWARE = "tova_vllm.request_check.KVSettingsCheck"


class KVSettingsCheck:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._engine = None
        self._engine_known = False

    def _engine_settings(self, scope: dict):
        if not self._engine_known:
            from tova_vllm.metrics import settings_from_cli_args

            app = scope.get("app")
            self._engine = settings_from_cli_args(getattr(getattr(app, "state", None), "args", None))
            self._engine_known = True
        return self._engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body, more, messages = b"", True, []
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        error = self._check(scope, body) if b"vllm_xargs" in body else None
        if error is not None:
            return await _bad_request(send, *error)
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    def _check(self, scope: dict, body: bytes) -> tuple[str, str] | None:
        try:
            xargs = json.loads(body).get("vllm_xargs")
        except (ValueError, AttributeError):
            return None  # not JSON: vLLM answers that itself
        if not isinstance(xargs, dict) or not any(isinstance(k, str) and k.startswith("kv_") for k in xargs):
            return None
        from tova_vllm.config import PolicyConfigError, request_settings

        try:
            request_settings(self._engine_settings(scope), xargs)
        except PolicyConfigError as e:
            return str(e), str(e).split(" ", 1)[0]
        return None


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
