"""Who may use the admin page: sessions, the password, CSRF tokens, security headers.

- A session is a small JSON object in an encrypted, authenticated cookie (Fernet) under a key
  made at start: a restart logs everyone out, nothing is stored on the server, and a session
  ends 12 hours after it was last written (at the latest, its login).
- With a password, every page and action needs a logged-in session (HTML pages redirect to the
  login form; anything else gets 401). ``/metrics`` also takes the password as a Bearer token or
  as HTTP Basic (any user name), which is what Prometheus can send.
- Every way in checks the password through :func:`check_password`, so they share one throttle:
  wrong passwords are checked one at a time, each costs ``LOGIN_FAILURE_DELAY``, and an address
  past its allowance (``AdminConfig.password_failures``) gets 429 without a check.
- Without a password the page binds loopback only (``AdminConfig`` refuses anything else), and a
  request must name a loopback ``Host``: a web page that rebinds its own DNS name to 127.0.0.1
  cannot read ours.
- Every POST carries the session's CSRF token (form field ``csrf``), and a cross-site
  ``Origin`` is refused, so another site cannot make a logged-in browser act.
- ``/healthz``, ``/readyz`` and ``/static/`` are open: load balancers probe them, and they tell
  nothing about the registry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken
from yarl import URL

from rendezvous import logs
from rendezvous.admin.state import STATE
from rendezvous.config import is_loopback_host
from rendezvous.server.ratelimit import TokenBuckets

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE_NAME = "rendezvous_admin"
# A forgotten logged-in browser stops being a way in after a working day.
SESSION_MAX_AGE = 12 * 3600
# Each wrong password costs this long, one at a time (see AdminState.login_lock): about 3,600
# guesses an hour at most, hopeless against any password worth the name.
LOGIN_FAILURE_DELAY = 1.0

AUTH_KEY = "auth"
CSRF_KEY = "csrf"
FLASH_KEY = "flash"
CSRF_FIELD = "csrf"

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# HTML pages: without a session they redirect to the login form rather than answer 401.
PAGES = frozenset({"/", "/entry", "/confirm"})
LOGIN_PATH = "/login"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# Cookies beyond this size are not ours (ours hold a token, a flag and a message or two).
MAX_COOKIE = 4096


class Session(dict[str, Any]):
    """One browser's session: a small JSON-able dict, written back only when it changed."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self.changed = False

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.changed = True

    def pop(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.changed = True
        return super().pop(key, default)

    def clear(self) -> None:
        super().clear()
        self.changed = True


SESSION: web.RequestKey[Session] = web.RequestKey("rendezvous_admin_session", Session)
# Wrong passwords by client address, whichever way they came in.
FAILURES: web.AppKey[TokenBuckets] = web.AppKey("rendezvous_admin_failures", TokenBuckets)


class TooManyGuesses(Exception):
    """An address spent its allowance of wrong admin passwords: retry after ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many wrong passwords: retry in {retry_after} s")
        self.retry_after = retry_after


def setup(app: web.Application) -> None:
    """Install sessions, the access guard and the security headers on ``app``."""
    fernet = Fernet(Fernet.generate_key())
    config = app[STATE].config
    app[FAILURES] = TokenBuckets(config.password_failures, config.password_failure_interval)

    @web.middleware
    async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
        session = request[SESSION] = _load_session(fernet, request.cookies.get(COOKIE_NAME))
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # A redirect or an error is a response too: it carries the session's changes.
            _save_session(fernet, session, exc)
            raise
        _save_session(fernet, session, response)
        return response

    app.middlewares.append(sessions)
    app.middlewares.append(guard)
    app.on_response_prepare.append(_security_headers)


def _load_session(fernet: Fernet, cookie: str | None) -> Session:
    if not cookie or len(cookie) > MAX_COOKIE:
        return Session()
    try:
        data = json.loads(fernet.decrypt(cookie, ttl=SESSION_MAX_AGE))
    except (InvalidToken, ValueError):
        return Session()  # expired, or made by an earlier run of the page: start afresh
    return Session(data) if isinstance(data, dict) else Session()


def _save_session(fernet: Fernet, session: Session, response: web.StreamResponse) -> None:
    if not session.changed or response.prepared:
        return
    if not session:
        response.del_cookie(COOKIE_NAME, path="/")
        return
    token = fernet.encrypt(json.dumps(session, separators=(",", ":")).encode()).decode()
    response.set_cookie(COOKIE_NAME, token, max_age=SESSION_MAX_AGE, path="/", httponly=True,
                        samesite="Strict")


def get_session(request: web.Request) -> Session:
    """The request's session (the ``sessions`` middleware loaded it)."""
    return request[SESSION]


def csrf_token(session: Session) -> str:
    """The session's CSRF token, made on first use."""
    token = session.get(CSRF_KEY)
    if not isinstance(token, str):
        token = session[CSRF_KEY] = secrets.token_urlsafe(32)
    return token


def is_authenticated(session: Session) -> bool:
    return session.get(AUTH_KEY) is True


def password_matches(given: str, password: str) -> bool:
    """Constant-time comparison, so the answer's timing tells nothing about the password."""
    return hmac.compare_digest(given.encode("utf-8"), password.encode("utf-8"))


async def check_password(request: web.Request, given: str, via: str) -> bool:
    """Whether ``given`` is the admin password: the one check behind every way in (``via``
    says which, for the log). Raises TooManyGuesses, without checking, for an address past its
    allowance; a wrong password costs LOGIN_FAILURE_DELAY, one check at a time in all."""
    state = request.app[STATE]
    password = state.config.password
    assert password is not None
    failures = request.app[FAILURES]
    address = request.remote or "-"
    _refuse_if_spent(failures, address)
    async with state.login_lock:
        _refuse_if_spent(failures, address)  # guesses queued behind the lock spent it meanwhile
        if password_matches(given, password):
            return True
        failures.spend(address, time.monotonic())
        logs.event("admin password refused", via=via, peer=address)
        await asyncio.sleep(LOGIN_FAILURE_DELAY)
        return False


def _refuse_if_spent(failures: TokenBuckets, address: str) -> None:
    wait = failures.retry_after(address, time.monotonic())
    if wait > 0:
        raise TooManyGuesses(math.ceil(wait))


def log_in(request: web.Request) -> Session:
    """Make the session a fresh logged-in one, with a new CSRF token."""
    session = get_session(request)
    session.clear()
    session[AUTH_KEY] = True
    csrf_token(session)
    return session


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (never ``//host`` or a full URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse whatever the request may not do (see the module's docstring)."""
    path = request.path
    if path in OPEN_PATHS or path.startswith("/static/"):
        return await handler(request)
    state = request.app[STATE]
    if not state.auth_required and not _loopback_host(request):
        raise web.HTTPForbidden(text="this page answers only to a loopback host name\n")
    session = get_session(request)
    password = state.config.password
    if password is not None and not is_authenticated(session) and path != LOGIN_PATH:
        if path == "/metrics" and await _scraper_credentials_ok(request):
            return await handler(request)
        if request.method in ("GET", "HEAD") and path in PAGES:
            raise web.HTTPSeeOther(URL.build(path=LOGIN_PATH, query={"next": request.path_qs}))
        headers = {"WWW-Authenticate": 'Basic realm="rendezvous"'} if path == "/metrics" else None
        raise web.HTTPUnauthorized(text="log in first\n", headers=headers)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        await _check_csrf(request, session)
    return await handler(request)


async def _check_csrf(request: web.Request, session: Session) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text="cross-site request refused\n")
    expected = session.get(CSRF_KEY)
    form = await request.post()
    given = form.get(CSRF_FIELD)
    if (
        not isinstance(expected, str)
        or not isinstance(given, str)
        or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
    ):
        raise web.HTTPForbidden(text="missing or stale form token: reload the page and retry\n")


def _loopback_host(request: web.Request) -> bool:
    host = request.host
    name = host.rpartition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
    return is_loopback_host(name)


async def _scraper_credentials_ok(request: web.Request) -> bool:
    """``Authorization: Bearer PASSWORD`` or ``Basic base64(any:PASSWORD)``, checked through
    the shared throttle (429 past it)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    given: str | None = None
    if scheme.lower() == "bearer":
        given = value
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    if given is None:
        return False  # no credentials: nothing guessed, nothing spent
    try:
        return await check_password(request, given, via="metrics")
    except TooManyGuesses as exc:
        raise web.HTTPTooManyRequests(
            text=f"{exc}\n", headers={"Retry-After": str(exc.retry_after)}) from None


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on our own
    # form posts, which the CSRF check must then refuse.
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        # Pages and downloads carry secrets: keep them out of every cache.
        headers.setdefault("Cache-Control", "no-store")
