"""A user's own ASGI middleware, for ``vllm serve --middleware
user_middleware.RefuseMarked`` in the serving tests (the server finds it with
tests/ on PYTHONPATH): it answers 403 to a request with an ``x-user-refuse``
header and reads nothing of it."""

from __future__ import annotations

REFUSED = b'{"error":"refused by the user middleware"}'


class RefuseMarked:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and any(name == b"x-user-refuse" for name, _ in scope["headers"]):
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REFUSED)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": REFUSED})
            return
        await self.app(scope, receive, send)
