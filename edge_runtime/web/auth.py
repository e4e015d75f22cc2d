"""Dashboard login: scrypt password hashes, signed session cookies, a failed-login limit.

Off unless ``http.password_hash`` is set (a LAN dashboard is open by default). When on, every
route but ``/login``, ``/logout``, ``/health`` and the static assets needs the session cookie:
``/api/*``, ``/metrics`` and ``/schema`` answer 401, pages redirect to ``/login``.

The hash format, made by ``gridlet hash-password``::

    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>

Sessions are HMAC-signed with a secret drawn at process start, so a restart logs everyone out
and nothing secret is stored on disk; logout revokes the session's id for its lifetime.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.enums import RequestEncodingType, ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.params import Body
from litestar.response import Redirect
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = (
    "SESSION_COOKIE",
    "Auth",
    "AuthMiddleware",
    "LoginForm",
    "RateLimiter",
    "auth_routes",
    "deny_websocket",
    "hash_password",
    "parse_password_hash",
    "verify_password",
)

log = logging.getLogger(__name__)

SESSION_COOKIE = "gridlet_session"
_SESSION_TTL_S = 7 * 86400

# scrypt cost: n=2**15, r=8 takes 32 MiB and roughly 0.1 s on a Raspberry Pi 4; the upper
# bounds keep a hand-edited hash from asking for gigabytes.
_N, _R, _P = 2**15, 8, 1
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


# ---------------------------------------------------------------------- password hashes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, *, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=128 * r * (n + p + 2) + 2**20,  # what these parameters need, plus slack
        dklen=dklen,
    )


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """A new ``scrypt$n$r$p$salt$hash`` string for ``http.password_hash``."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_password_hash(encoded: str) -> _Hash:
    """Check a stored hash; ValueError says what is wrong with it."""
    parts = encoded.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("password_hash is not of the form scrypt$n$r$p$salt$hash")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"password_hash is malformed: {exc}") from exc
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"password_hash has unsupported scrypt parameters n={n} r={r} p={p}")
    if not salt or len(digest) < 16:
        raise ValueError("password_hash has an empty salt or a short hash")
    return _Hash(n, r, p, salt, digest)


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches the hash (constant-time comparison)."""
    h = parse_password_hash(encoded)
    candidate = _scrypt(password, h.salt, n=h.n, r=h.r, p=h.p, dklen=len(h.digest))
    return hmac.compare_digest(candidate, h.digest)


# ---------------------------------------------------------------------- sessions, limits


@dataclass
class RateLimiter:
    """At most ``attempts`` per ``window_s`` per key (client address)."""

    attempts: int = 5
    window_s: float = 60.0
    max_keys: int = 10_000
    _hits: dict[str, deque[float]] = field(default_factory=dict)

    def hit(self, key: str) -> float:
        """Count an attempt; 0 when allowed, else the seconds until one is allowed again."""
        now = time.monotonic()
        q = self._hits.get(key)
        if q is None:
            if len(self._hits) >= self.max_keys:
                self._prune(now)
            q = self._hits[key] = deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if len(q) >= self.attempts:
            return q[0] + self.window_s - now
        q.append(now)
        return 0.0

    def reset(self, key: str) -> None:
        self._hits.pop(key, None)

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._hits.items() if not q or q[-1] <= now - self.window_s]:
            del self._hits[k]
        while len(self._hits) >= self.max_keys:  # a flood of addresses: forget the oldest
            del self._hits[next(iter(self._hits))]


class Auth:
    """The password check, session signing and the failed-login limiter of one process."""

    def __init__(self, password_hash: str, *, limiter: RateLimiter | None = None) -> None:
        parse_password_hash(password_hash)  # fail at startup, not at the first login
        self.password_hash = password_hash
        self.limiter = limiter or RateLimiter()
        self._secret = secrets.token_bytes(32)
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")

    def new_session(self) -> str:
        payload = f"{int(time.time()) + _SESSION_TTL_S}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def _parts(self, token: str) -> tuple[int, str] | None:
        payload, _, sig = token.rpartition(".")
        expires, _, sid = payload.partition(".")
        if not (sig and sid and expires.isdigit()):
            return None
        if not hmac.compare_digest(sig, self._sign(payload)):
            return None
        return int(expires), sid

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        parts = self._parts(token)
        if parts is None:
            return False
        expires, sid = parts
        return expires > time.time() and sid not in self._revoked

    def revoke(self, token: str | None) -> None:
        parts = self._parts(token) if token else None
        if parts is None:
            return
        now = time.time()
        self._revoked = {s: e for s, e in self._revoked.items() if e > now}
        self._revoked[parts[1]] = parts[0]

    async def check_password(self, password: str) -> bool:
        # scrypt is deliberately slow: keep it off the event loop.
        return await asyncio.to_thread(verify_password, password, self.password_hash)


def _cookie_value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
    return None


# ---------------------------------------------------------------------- middleware

_OPEN_PATHS = frozenset({"/login", "/logout", "/health"})
_OPEN_PREFIXES = ("/static/",)  # scripts and styles hold no data; the login page may use them
_API_PREFIXES = ("/api/", "/schema")
_API_PATHS = frozenset({"/api", "/metrics"})


class AuthMiddleware:
    """Guards every route but the open ones (plain ASGI, so WebSockets are covered too)."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in (ScopeType.HTTP, ScopeType.WEBSOCKET):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if (
            path in _OPEN_PATHS
            or path.startswith(_OPEN_PREFIXES)
            or self.auth.valid(_cookie_value(list(scope["headers"]), SESSION_COOKIE))
        ):
            await self.app(scope, receive, send)
            return
        api = path in _API_PATHS or path.startswith(_API_PREFIXES)
        if scope["type"] == ScopeType.WEBSOCKET:
            await deny_websocket(scope, send, 401, "login required")
        elif api or scope.get("method") not in ("GET", "HEAD"):
            body = msgspec.json.encode({"status_code": 401, "detail": "login required"})
            await _respond(send, 401, body, b"application/json")
        else:
            await _respond(send, 303, b"", b"text/plain", [(b"location", b"/login")])


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    await send(start)
    done: Message = {"type": "http.response.body", "body": body, "more_body": False}
    await send(done)


async def deny_websocket(scope: Scope, send: Send, status: int, detail: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status when the server can (ASGI's
    websocket.http.response extension, which uvicorn has), else close it."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = msgspec.json.encode({"status_code": status, "detail": detail})
        start: Message = {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        done: Message = {"type": "websocket.http.response.body", "body": body, "more_body": False}
        await send(done)
    else:
        close: Message = {"type": "websocket.close", "code": 1008, "reason": detail}
        await send(close)


# ---------------------------------------------------------------------- routes

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gridlet: log in</title>
<style>
body {{ font-family: system-ui, sans-serif; display: grid; place-items: center;
       min-height: 90vh; margin: 0; background: #f4f5f7; color: #1d2330; }}
form {{ background: #fff; padding: 2rem; border-radius: 8px; min-width: 16rem;
       box-shadow: 0 1px 4px rgba(0,0,0,.12); display: grid; gap: .8rem; }}
input, button {{ font: inherit; padding: .5rem; }}
.error {{ color: #b00020; margin: 0; }}
</style></head>
<body><form method="post" action="/login">
<h1>gridlet</h1>
{message}
<label>Password <input type="password" name="password" autocomplete="current-password"
  autofocus required></label>
<button type="submit">Log in</button>
</form></body></html>
"""


def _login_page(message: str = "", status: int = 200, retry_after: float = 0) -> Response[str]:
    text = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return Response(
        _LOGIN_PAGE.format(message=text),
        status_code=status,
        media_type="text/html",
        headers=headers,
    )


class LoginForm(msgspec.Struct):
    password: str = ""


def auth_routes(auth: Auth) -> list[HTTPRouteHandler]:
    """``GET``/``POST /login`` and ``POST /logout``."""

    @get("/login", include_in_schema=False, sync_to_thread=False)
    def login_page(request: Request[Any, Any, Any]) -> Response[Any]:
        if auth.valid(request.cookies.get(SESSION_COOKIE)):
            return Redirect("/", status_code=303)
        return _login_page()

    @post("/login", include_in_schema=False)
    async def login(
        request: Request[Any, Any, Any],
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[Any]:
        client = request.client.host if request.client else "unknown"
        # Count the attempt before checking it: parallel guesses cannot slip past the limit.
        wait = auth.limiter.hit(client)
        if wait:
            log.warning("login: too many failed attempts from %s", client)
            return _login_page(
                f"Too many failed attempts: try again in {max(1, round(wait))} s.", 429, wait
            )
        if not data.password or not await auth.check_password(data.password):
            log.warning("login: wrong password from %s", client)
            return _login_page("Wrong password.", 401)
        auth.limiter.reset(client)
        log.info("login from %s", client)
        return Redirect(
            "/",
            status_code=303,
            cookies=[
                Cookie(
                    key=SESSION_COOKIE,
                    value=auth.new_session(),
                    max_age=_SESSION_TTL_S,
                    path="/",
                    httponly=True,
                    samesite="strict",
                )
            ],
        )

    @post("/logout", include_in_schema=False, sync_to_thread=False, status_code=303)
    def logout(request: Request[Any, Any, Any]) -> Redirect:
        auth.revoke(request.cookies.get(SESSION_COOKIE))
        return Redirect(
            "/login",
            status_code=303,
            cookies=[
                Cookie(
                    key=SESSION_COOKIE,
                    value="",
                    max_age=0,
                    path="/",
                    httponly=True,
                    samesite="strict",
                )
            ],
        )

    return [login_page, login, logout]
