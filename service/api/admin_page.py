"""GET /admin: the turn inspector page, one self-contained HTML file (inline CSS and script, no
build step, nothing fetched but the admin API on this origin).

The page is public; what it shows comes from the admin API, with the admin key the operator types
in. Its Content-Security-Policy allows exactly the page's own inline script and style (by hash),
requests to this origin only, and nothing else: no images, frames, forms or other origins, so that
a turn holding markup cannot run or fetch anything even if it were ever put on the page as HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.gate.decisions import Decision

router = APIRouter()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def page() -> tuple[str, dict[str, str]]:
    """The page and its headers, built once."""
    source = resources.files("service.api").joinpath("inspector.html").read_text(encoding="utf-8")
    options = "".join(f'<option value="{html.escape(d.value)}">{html.escape(d.value)}</option>' for d in Decision)
    source = source.replace("<!-- decisions -->", options)
    (script,) = re.findall(r"<script>(.*?)</script>", source, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", source, re.S)
    csp = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {"content-security-policy": csp, "cache-control": "no-store", "x-content-type-options": "nosniff",
               "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
    return source, headers


@router.get("/admin", include_in_schema=False)
async def inspector_page() -> HTMLResponse:
    body, headers = page()
    return HTMLResponse(body, headers=headers)
