"""`vllm serve --kv-policy tova --kv-budget 64 --api-key KEY`, plus a user's
own --middleware, queried with httpx, the `openai` client and a raw socket:
vLLM's authentication answers before tova-vllm's raw-JSON check of
``vllm_xargs`` reads anything (issue 26). Without a valid key every request
gets vLLM's own 401 whatever its body, on every route that takes
``vllm_xargs``; one whose body never finishes still gets it (nothing waited
for the body); with the key, bad settings get the 400 naming the field, good
ones are served; malformed bodies get vLLM's own answers; the user's
middleware answers before the check too. One server for the module.

`test_vllm_api_key_and_any_middleware_in_vllms_own_app` builds vLLM's own app
(its ``build_app`` from ``vllm serve``'s parsed arguments) in this process
for what a second server would cost: ``VLLM_API_KEY`` instead of the flag,
the middleware order, no check without a policy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from serve_helpers import running_server

KEY = "tova-test-key"
BUDGET = 64
TESTS = Path(__file__).resolve().parent
USER_MIDDLEWARE = "user_middleware.RefuseMarked"  # tests/user_middleware.py
UNAUTHORIZED = {"error": "Unauthorized"}  # vLLM's AuthenticationMiddleware


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-auth") / "server.log"
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    with running_server(
        model_path,
        log,
        "--kv-policy", "tova", "--kv-budget", str(BUDGET),
        "--api-key", KEY,
        "--middleware", USER_MIDDLEWARE,
        env={"PYTHONPATH": path},
    ) as srv:  # fmt: skip
        yield srv


def _bodies(model: str) -> dict[str, dict]:
    """A minimal valid body for each route that takes ``vllm_xargs``."""
    hello = [{"role": "user", "content": "Hello"}]
    return {
        "/v1/completions": {"model": model, "prompt": "Hello", "max_tokens": 2},
        "/v1/chat/completions": {"model": model, "messages": hello, "max_tokens": 2},
        "/v1/responses": {"model": model, "input": "Hello", "max_output_tokens": 2},
        "/v1/messages": {"model": model, "messages": hello, "max_tokens": 2},
    }


ROUTES = list(_bodies("m"))

# The table: (Authorization header or None, vllm_xargs).
UNAUTHENTICATED = {
    "no-key-valid": (None, {"kv_budget": 32}),
    "no-key-abc": (None, {"kv_budget": "abc"}),
    "no-key-misspelt": (None, {"kv_budgett": 1}),
    "wrong-key-negative": ("Bearer wrong-key", {"kv_budget": -1}),
    "wrong-key-bool": ("Bearer wrong-key", {"kv_budget": True}),
    "key-not-bearer": (f"Basic {KEY}", {"kv_budget": "abc"}),
}


def _post(server, path: str, xargs, authorization: str | None = f"Bearer {KEY}", **extra) -> httpx.Response:
    body = {**_bodies(server.model)[path], **extra}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    headers = {"Authorization": authorization} if authorization else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("authorization, xargs", UNAUTHENTICATED.values(), ids=UNAUTHENTICATED)
def test_without_a_valid_key_every_body_gets_vllms_401(server, path, authorization, xargs):
    r = _post(server, path, xargs, authorization)
    assert r.status_code == 401, r.text
    assert r.json() == UNAUTHORIZED


def _read_to_close(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _raw_exchange(server, head: str, first: bytes, rest: bytes | None, wait_s: float) -> tuple[bytes, bytes]:
    """Sends ``head`` (with ``Connection: close``) and the start of a body,
    waits ``wait_s`` for an answer; with none, sends ``rest`` (if any) and
    reads the answer. Returns (the early answer or b"", the late one or b"")."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(head.encode() + first)
        s.settimeout(wait_s)
        try:
            early = s.recv(65536)
        except TimeoutError:
            early = b""
        s.settimeout(60)
        if early:
            return early + _read_to_close(s), b""
        if rest is None:
            return b"", b""
        s.sendall(rest)
        return b"", _read_to_close(s)


def test_a_body_that_never_finishes_gets_401_without_being_read(server):
    """vLLM's authentication answers from the headers alone; anything that read
    the body first (the plugin's check before issue 26) would wait for ever."""
    body = f'{{"model": "{server.model}", "prompt": "Hello", "vllm_xargs": {{"kv_budget": "abc"}}}}'.encode()
    first, rest = body[:20], body[20:]

    def head(auth: str) -> str:
        url = urlsplit(server.url)
        return (
            f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{auth}Connection: close\r\n\r\n"
        )

    start = time.monotonic()
    early, _ = _raw_exchange(server, head(""), first, None, wait_s=30)
    assert early.startswith(b"HTTP/1.1 401"), early[:300]
    assert early.rstrip().endswith(b'{"error":"Unauthorized"}'), early
    assert time.monotonic() - start < 30
    # With the key the check reads the body: no answer before the rest comes,
    # then the 400 naming the field (so the first assertion can fail).
    early, late = _raw_exchange(server, head(f"Authorization: Bearer {KEY}\r\n"), first, rest, wait_s=3)
    assert early == b"", early[:300]
    assert late.startswith(b"HTTP/1.1 400"), late[:300]
    assert b"vllm_xargs.kv_budget must be an integer in [1, 64]" in late, late


BAD = {
    "abc": ({"kv_budget": "abc"}, "vllm_xargs.kv_budget", f"[1, {BUDGET}]"),
    "negative": ({"kv_budget": -1}, "vllm_xargs.kv_budget", f"[1, {BUDGET}]"),
    # Pydantic would turn true into 1: only the raw JSON shows it.
    "bool": ({"kv_budget": True}, "vllm_xargs.kv_budget", f"[1, {BUDGET}]"),
    "misspelt": ({"kv_budgett": 1}, "vllm_xargs.kv_budgett", "allowed keys: kv_policy, kv_budget"),
}


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("xargs, field, allowed", BAD.values(), ids=BAD)
def test_with_the_key_bad_settings_get_400_naming_the_field(server, path, xargs, field, allowed):
    r = _post(server, path, xargs)
    assert r.status_code == 400, r.text
    error = _error(r)
    assert error["param"] == field and error["code"] == 400, error
    assert error["message"].startswith(field) and allowed in error["message"], error


def test_with_the_key_the_openai_client_gets_400_and_valid_settings_are_served(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=180, max_retries=0)
    hello = [{"role": "user", "content": "Hello"}]
    for xargs in ({"kv_budget": "abc"}, {"kv_budget": BUDGET + 1}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.model, prompt="Hello", max_tokens=2, extra_body={"vllm_xargs": xargs})
        assert err.value.status_code == 400 and f"vllm_xargs.kv_budget must be an integer in [1, {BUDGET}]" in str(
            err.value
        )
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=server.model, messages=hello, max_tokens=2, extra_body={"vllm_xargs": xargs}
            )
        assert err.value.status_code == 400 and "vllm_xargs.kv_budget" in str(err.value)
    good = {"vllm_xargs": {"kv_budget": 32, "kv_policy": "window"}, "ignore_eos": True}
    done = client.completions.create(model=server.model, prompt="Hello", max_tokens=2, extra_body=good)
    assert done.usage.completion_tokens == 2 and done.choices[0].text
    chat = client.chat.completions.create(model=server.model, messages=hello, max_tokens=2, extra_body=good)
    assert chat.usage.completion_tokens == 2 and chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):  # the same client without the key
        client.with_options(api_key="wrong").completions.create(
            model=server.model, prompt="Hello", max_tokens=2, extra_body={"vllm_xargs": {"kv_budget": "abc"}}
        )


def test_a_streamed_request_with_bad_settings_gets_400_before_any_event(server):
    r = _post(server, "/v1/completions", {"kv_budget": 0}, stream=True)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == "vllm_xargs.kv_budget"


def test_the_users_middleware_answers_before_the_check(server):
    body = {**_bodies(server.model)["/v1/completions"], "vllm_xargs": {"kv_budget": "abc"}}
    headers = {"Authorization": f"Bearer {KEY}", "x-user-refuse": "1"}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 403, r.text
    assert r.json() == {"error": "refused by the user middleware"}


def test_malformed_bodies_get_vllms_own_answer(server):
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    truncated = b'{"model": "m", "prompt": "Hello", "vllm_xargs": {"kv_budget": "abc"}'
    r = httpx.post(url, content=truncated, headers={**auth, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "JSON decode error" in _error(r)["message"], r.text
    whole = truncated + b"}"
    r = httpx.post(url, content=whole, headers={**auth, "Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 400 and "Unsupported Media Type" in _error(r)["message"], r.text
    listed = b'[{"vllm_xargs": {"kv_budget": "abc"}}]'  # JSON, but not an object
    r = httpx.post(url, content=listed, headers={**auth, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "must be an integer" not in _error(r)["message"], r.text
    r = httpx.post(f"{server.url}/v1/no-such-route", json={"vllm_xargs": {"kv_budget": "abc"}}, headers=auth, timeout=60)
    assert r.status_code == 404, r.text
    # And none of that stopped the server.
    assert server.get("/health")[0] == 200


# ---------------------------------------------------------------------------
# vLLM's own app, built in this process


def _app(argv: list[str]):
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from tova_vllm import plugin

    plugin.register()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    return build_app(args, ("generate",), None)


async def _ask(app, body: dict, headers: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        return await client.post("/v1/completions", json=body, headers=headers)


def test_vllm_api_key_and_any_middleware_in_vllms_own_app(monkeypatch):
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from tova_vllm.request_check import MIDDLEWARE, KVSettingsCheck

    monkeypatch.setenv("VLLM_API_KEY", KEY)
    policy = ["--kv-policy", "tova", "--kv-budget", str(BUDGET)]
    # The check named as a --middleware too: dropped there, added once, last.
    app = _app([*policy, "--middleware", MIDDLEWARE, "--middleware", USER_MIDDLEWARE])
    order = [m.cls for m in app.user_middleware]
    assert order.count(KVSettingsCheck) == 1 and order[-1] is KVSettingsCheck, order
    assert AuthenticationMiddleware in order, order
    body = {"model": "m", "prompt": "Hello", "vllm_xargs": {"kv_budget": "abc"}}
    r = asyncio.run(_ask(app, body, {}))
    assert r.status_code == 401 and r.json() == UNAUTHORIZED, r.text
    r = asyncio.run(_ask(app, body, {"Authorization": f"Bearer {KEY}"}))
    assert r.status_code == 400 and _error(r)["param"] == "vllm_xargs.kv_budget", r.text
    r = asyncio.run(_ask(app, body, {"Authorization": f"Bearer {KEY}", "x-user-refuse": "1"}))
    assert r.status_code == 403, r.text
    # Without a policy the server's middleware is vLLM's alone.
    stock = _app(["--middleware", USER_MIDDLEWARE])
    assert KVSettingsCheck not in [m.cls for m in stock.user_middleware]
