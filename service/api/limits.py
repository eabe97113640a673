"""A pure-ASGI guard that refuses request bodies over the configured size with 413.

It checks Content-Length up front and counts bytes of chunked bodies as they arrive, so an
oversized upload is never buffered whole.
"""

from __future__ import annotations

from service.api.errors import APIError


class BodySizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()  # rendered by the APIError handler inside the app
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than {self.max_bytes} bytes.", code="request_too_large")
