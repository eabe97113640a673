"""`turngate keys create|list|revoke`: client keys, through a running gateway's admin API.

The commands call the HTTP API (not the database) so that the change is validated, audited and
announced to every replica exactly as an API call would be. The admin key comes from
TURNGATE_ADMIN_KEY; --url names the gateway (any replica).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import typer

from service.cli_errors import CommandFailed

app = typer.Typer(help="Issue, list and revoke client keys (through a running gateway's admin API).",
                  no_args_is_help=True)

_URL = typer.Option("http://127.0.0.1:8000", "--url", help="The gateway (any replica).")


def call(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call; its JSON reply, or CommandFailed with the gateway's own message."""
    import httpx

    admin_key = os.environ.get("TURNGATE_ADMIN_KEY", "").strip()
    if not admin_key:
        raise CommandFailed("set TURNGATE_ADMIN_KEY to the gateway's admin key")
    where = url.rstrip("/") + path
    try:
        resp = httpx.request(method, where, json=body, headers={"authorization": f"Bearer {admin_key}"},
                             timeout=30)
    except httpx.HTTPError as e:
        raise CommandFailed(f"cannot reach turngate at {url} ({type(e).__name__}: {e}); start it "
                            "(turngate serve) or fix --url") from None
    try:
        reply = resp.json()
    except ValueError:
        reply = None
    if resp.status_code >= 400:
        error = reply.get("error") if isinstance(reply, dict) else None
        message = error.get("message") if isinstance(error, dict) else resp.text[:200]
        raise CommandFailed(f"{method} {path}: {resp.status_code}: {message}")
    if reply is None:
        raise CommandFailed(f"{method} {path}: {url} answered {resp.status_code} without JSON; is --url a turngate?")
    return reply


def describe(key: dict[str, Any], shown: str | None = None) -> str:
    """One line: id, the secret (at creation) or its prefix, state, name, limits."""
    expires = key.get("expires_at")
    state = "revoked" if key.get("revoked") else "expired" if expires and _past(expires) else "live"
    parts = [key["id"], shown or f"{key['prefix']}...", state, repr(key["name"])]
    if key.get("routes") is not None:
        parts.append("routes=" + ",".join(key["routes"]))
    for field in ("rpm", "tpm"):
        if key.get(field) is not None:
            parts.append(f"{field}={key[field]}")
    if key.get("budget_tokens") is not None:
        parts.append(f"budget={key['budget_tokens']}/{key['budget_period']}")
    if expires:
        parts.append(f"expires={expires}")
    return "  ".join(parts)


def _past(iso: str) -> bool:
    try:
        return datetime.fromisoformat(iso) <= datetime.now(UTC)
    except ValueError:
        return False


def _expiry(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO date/time, got {text!r}", param_hint="--expires-at") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()  # UTC unless it says otherwise


@app.command()
def create(name: str = typer.Argument(..., help="What the key is for (shown in lists and audit records)."),
           routes: str | None = typer.Option(None, help="Comma-separated route aliases the key may use; "
                                                        "default: every route."),
           rpm: int | None = typer.Option(None, help="Requests per minute."),
           tpm: int | None = typer.Option(None, help="Tokens per minute."),
           budget_tokens: int | None = typer.Option(None, help="Tokens per --budget-period."),
           budget_period: str | None = typer.Option(None, help="day | month."),
           expires_at: str | None = typer.Option(None, help="ISO date/time (UTC unless it names a zone)."),
           url: str = _URL) -> None:
    """Issue a key; prints it once (id, secret, name): store the secret now."""
    body: dict[str, Any] = {"name": name, "rpm": rpm, "tpm": tpm, "budget_tokens": budget_tokens,
                            "budget_period": budget_period, "expires_at": _expiry(expires_at)}
    if routes is not None:
        body["routes"] = [r.strip() for r in routes.split(",") if r.strip()]
    key = call(url, "POST", "/v1/admin/keys", {k: v for k, v in body.items() if v is not None})
    typer.echo(describe(key, shown=key["key"]))
    typer.echo("the secret is shown only this once: give it to the client now", err=True)


@app.command("list")
def list_keys(url: str = _URL) -> None:
    """Every issued key, newest first: id, prefix, state, name, limits."""
    cursor = None
    while True:
        page = call(url, "GET", "/v1/admin/keys?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        for key in page["data"]:
            typer.echo(describe(key))
        cursor = page.get("next_cursor")
        if not cursor:
            return


@app.command()
def revoke(key_id: str = typer.Argument(..., metavar="ID", help="The key's id (key_...)."), url: str = _URL) -> None:
    """Revoke a key: it gets 401 on every replica within seconds."""
    typer.echo(describe(call(url, "DELETE", f"/v1/admin/keys/{key_id}")))
