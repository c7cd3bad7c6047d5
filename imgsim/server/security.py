"""Who may talk to the server.

- Without a token (the default, only allowed when bound to a loopback address), only requests from
  this machine are answered, and only with a loopback `Host` header, so that a web page elsewhere
  cannot reach the server by pointing a DNS name at 127.0.0.1 (DNS rebinding).
- With a token (`--token` or `$IMGSIM_TOKEN`, required for any other address), every request must
  carry it: `Authorization: Bearer TOKEN`, or the cookie the web page gets by opening `/?token=TOKEN`
  once (as Jupyter does), so that its `<img>` tags are authorised too.
- `/health` answers everyone: it says nothing but "ok".
Every response also gets headers that keep browsers from guessing content types or framing the page.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

TOKEN_ENV = "IMGSIM_TOKEN"
COOKIE = "imgsim_token"
OPEN_PATHS = frozenset({"/health"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AccessControl:
    """ASGI middleware enforcing the rules above."""

    def __init__(self, app, token: str | None, cross_origin: bool = False):
        self.app = app
        self.token = token or None
        # Unless --cors names other origins, pages elsewhere may not even embed the thumbnails.
        policy = b"cross-origin" if cross_origin else b"same-origin"
        self.headers = [*SECURITY_HEADERS, (b"cross-origin-resource-policy", policy)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refusal = None if path in OPEN_PATHS else self._refusal(scope, headers)
        if refusal is not None:
            status, message, extra = refusal
            return await _send_json(send, status, {"error": message}, extra)
        if self.token and path == "/" and self._matches(self._query_token(scope)):
            # `/?token=...`: keep the token in a cookie and drop it from the address bar.
            cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            return await _send(send, 303, b"", [(b"location", b"/"), (b"set-cookie", cookie.encode("latin-1"))])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in self.headers if h[0] not in present]
            await send(message)

        return await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, list] | None:
        if self.token:
            offered = [self._bearer(headers), self._cookie(headers)]
            if scope.get("path") == "/":
                offered.append(self._query_token(scope))
            if any(self._matches(t) for t in offered):
                return None
            return 401, "this server needs its token: send `Authorization: Bearer TOKEN`, or open /?token=TOKEN " \
                        "in a browser", [(b"www-authenticate", b"Bearer")]
        client = scope.get("client")
        if not is_loopback(client[0] if client else None):
            return 403, "this server answers only requests from its own machine: restart it with --token " \
                        "(or $IMGSIM_TOKEN) to allow others", []
        if not is_loopback(host_name(headers.get("host", ""))):
            return 403, "unexpected Host header: open the page as http://127.0.0.1:PORT/ or http://localhost:PORT/", []
        return None

    def _matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    @staticmethod
    def _bearer(headers: dict[str, str]) -> str | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    @staticmethod
    def _cookie(headers: dict[str, str]) -> str | None:
        if "cookie" not in headers:
            return None
        jar = SimpleCookie()
        try:
            jar.load(headers["cookie"])
        except Exception:
            return None
        return jar[COOKIE].value if COOKIE in jar else None

    @staticmethod
    def _query_token(scope) -> str | None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[0] if values else None


async def _send_json(send, status: int, data: dict, extra: list) -> None:
    # compact, as the app's own JSON errors are
    await _send(send, status, json.dumps(data, separators=(",", ":")).encode(),
                [(b"content-type", b"application/json"), *extra])


async def _send(send, status: int, body: bytes, headers: list) -> None:
    headers = [*headers, *SECURITY_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
