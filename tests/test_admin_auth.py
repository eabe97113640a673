"""Every operation of the admin API, read from the served OpenAPI document, refuses a caller
without the admin key (no key, a wrong key, a client key) with 401 in OpenAI's envelope, before
it looks at anything else; with no admin key configured the whole API is off (403)."""

from __future__ import annotations

import re

import httpx

ADMIN = "adm-auth-test-" + "5d2e" * 8
CLIENT = "sk-client-auth-test"


def admin_operations(base: str) -> list[tuple[str, str]]:
    doc = httpx.get(base + "/openapi.json", timeout=10).json()
    ops = [(method.upper(), re.sub(r"\{[^}]+\}", "x", path)) for path, item in doc["paths"].items()
           if path.startswith("/v1/admin") for method in item]
    assert len(ops) >= 12  # keys (5), routes (3), critic (2), turns (2), stats
    return ops


def call(base: str, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body: dict | None = {} if method in ("POST", "PUT", "PATCH") else None
    return httpx.request(method, base + path, headers=headers, json=body, timeout=10)


def test_every_admin_operation_needs_the_admin_key(gateway):
    with gateway(settings={"admin_key": ADMIN, "api_keys": [CLIENT]}) as (url, _):
        base = url.removesuffix("/v1")
        ops = admin_operations(base)
        for method, path in ops:
            for key in (None, "adm-wrong", CLIENT):
                reply = call(base, method, path, key)
                assert reply.status_code == 401, (method, path, key, reply.text)
                assert reply.json()["error"]["code"] == "invalid_api_key"


def test_without_an_admin_key_configured_the_admin_api_is_off(gateway):
    with gateway() as (url, _):
        base = url.removesuffix("/v1")
        for method, path in admin_operations(base):
            for key in (None, "anything"):
                reply = call(base, method, path, key)
                assert reply.status_code == 403, (method, path, reply.text)
                assert reply.json()["error"]["type"] == "permission_error"


def test_the_inspector_page_holds_no_data_and_needs_no_key_to_load(gateway):
    with gateway(settings={"admin_key": ADMIN}) as (url, _):
        page = httpx.get(url.removesuffix("/v1") + "/admin", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert ADMIN not in page.text
