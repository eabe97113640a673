"""`turngate routes list|apply FILE`: a running gateway's routes, through its admin API (so every
replica serves the change, and it is audited). The admin key comes from TURNGATE_ADMIN_KEY."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
import yaml

app = typer.Typer(help="List and change a running gateway's routes (admin API).", no_args_is_help=True)

URL_OPTION = typer.Option("http://127.0.0.1:8000", "--url", help="The gateway (any replica).")


class AdminAPIProblem(Exception):
    """The admin API refused or could not be reached; the message says what to do."""


def _call(url: str, method: str, path: str, body: Any = None) -> Any:
    import httpx

    key = os.environ.get("TURNGATE_ADMIN_KEY")
    if not key:
        raise AdminAPIProblem("set TURNGATE_ADMIN_KEY to the gateway's admin key")
    try:
        reply = httpx.request(method, url.rstrip("/") + "/v1/admin" + path, json=body, timeout=30,
                              headers={"authorization": f"Bearer {key}"})
    except httpx.HTTPError as e:
        raise AdminAPIProblem(f"cannot reach the gateway at {url} ({type(e).__name__}): start it, or fix --url") \
            from None
    if reply.status_code == 401:
        raise AdminAPIProblem(f"the gateway at {url} refused the admin key: set TURNGATE_ADMIN_KEY to its key")
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:200]
        raise AdminAPIProblem(f"{method} {path}: {reply.status_code} {message}")
    return reply.json()


def describe(route: dict[str, Any]) -> str:
    """One line per route: what an operator checks at a glance."""
    policy = route.get("policy") or {}
    parts = [route["alias"], route["mode"], f"N={route['candidates'] if route['mode'] != 'passthrough' else 1}",
             f"-> {route['upstream_base_url']}", f"model={route.get('upstream_model') or route['alias']}",
             f"key={route.get('upstream_api_key') or 'client'}"]
    if route["mode"] != "passthrough":
        parts.append(f"intervene_threshold={policy.get('intervene_threshold')}")
        parts.append(f"max_interventions={policy.get('max_interventions')}")
    if "source" in route:
        parts.append(f"({route['source']})")
    return " ".join(map(str, parts))


def read_routes(path: Path) -> list[dict[str, Any]]:
    """The `routes:` list of a YAML file shaped like the config file, each route validated here, so
    a typo changes nothing on the gateway."""
    from pydantic import ValidationError

    from service.settings import RouteSettings

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise AdminAPIProblem(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise AdminAPIProblem(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    routes = data.get("routes") if isinstance(data, dict) else None
    if not isinstance(routes, list) or not routes:
        raise AdminAPIProblem(f"{path}: expected a `routes:` list, as in the config file")
    for i, route in enumerate(routes):
        try:
            RouteSettings.model_validate(route)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'route'}: {err['msg']}" for err in e.errors())
            raise AdminAPIProblem(f"{path}: routes[{i}]: {problems}; nothing was applied") from None
    ignored = sorted(k for k in data if k != "routes")
    if ignored:
        typer.echo(f"turngate: note: {path}: only routes are applied; ignored {', '.join(ignored)}", err=True)
    return routes


@app.command("list")
def list_routes(url: str = URL_OPTION) -> None:
    """Every route the gateway serves, one line each (upstream keys masked)."""
    for route in _call(url, "GET", "/routes")["data"]:
        typer.echo(describe(route))


@app.command()
def apply(file: Path = typer.Argument(..., help="YAML with a `routes:` list, as in the config file."),
          url: str = URL_OPTION) -> None:
    """Put each route of FILE (whole: fields left out take their defaults); other routes stay."""
    for i, route in enumerate(read_routes(file)):
        body = {k: v for k, v in route.items() if k != "alias"}
        try:
            put = _call(url, "PUT", "/routes/" + quote(str(route["alias"]), safe=""), body)
        except AdminAPIProblem as e:
            raise AdminAPIProblem(f"{e}{'; the routes above were applied' if i else ''}") from None
        typer.echo("put " + describe(put))
