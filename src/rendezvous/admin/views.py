"""The admin page's pages and actions: thin views over the registry and the relay's hub.

    GET  /                    hidden servers, live relay status, the form to add one
    GET  /entry?id=ID         one hidden server: its provisioning file and QR code
    GET  /provisioning.json?id=ID, /qr.svg?id=ID, /visitor-qr.svg?id=ID (its visitor URL)
    GET  /confirm?action=rotate|remove&id=ID    then POST /rotate or /remove
    POST /create              label, name, step, digits, visitor_password, proxy_protocol
    GET  /api/status          live numbers (JSON), polled by the page every 2 s
    GET|POST /login, POST /logout
    GET  /metrics, /healthz, /readyz

Actions answer 303 to a page (post/redirect/get), with a one-time message in the session.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import uuid4

import segno
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from yarl import URL

from rendezvous import logs, registrar
from rendezvous.admin import security
from rendezvous.admin.security import Session, get_session
from rendezvous.admin.state import STATE, AdminState
from rendezvous.admin.status import IdNumbers
from rendezvous.config import DEFAULT_PORT
from rendezvous.errors import (
    ConfigError,
    DuplicateEntry,
    DuplicateName,
    RegistryError,
    UnknownEntry,
)
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.provisioning import MAX_DIGITS, MIN_DIGITS, provisioning_document
from rendezvous.registry import Entry, new_secret
from rendezvous.registry.base import DEFAULT_STEP, PROXY_VERSIONS, normal_name

# What the add form accepts (the same bounds as `rendezvous users add`).
MAX_STEP = 3600
MAX_LABEL = 200
# /readyz gives the registry this long to answer its ping.
READY_TIMEOUT = 2.0
# IDs that are safe as a download's file name (an old node-rendezvous ID may not be).
_FILE_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
DIGIT_CHOICES = tuple(range(MIN_DIGITS, MAX_DIGITS + 1))
# The add form offers 8 digits, as the README recommends (a guess is 100 times less likely
# than with 6); `users add` keeps node-rendezvous's 6.
FORM_DIGITS = 8
# A visitor password is typed by people; anything longer than this is not one.
MAX_VISITOR_PASSWORD = 200

T = TypeVar("T")

routes = web.RouteTableDef()


# ---------------------------------------------------------------------------- helpers


def _state(request: web.Request) -> AdminState:
    return request.app[STATE]


def _flash(session: Session, kind: str, text: str) -> None:
    messages = list(session.get(security.FLASH_KEY) or [])
    messages.append([kind, text])
    session[security.FLASH_KEY] = messages


async def render(
    request: web.Request, template: str, status: int = 200, **context: Any
) -> web.Response:
    """The HTML page ``template`` with the context every page uses."""
    state = _state(request)
    session = get_session(request)
    flashes = session.pop(security.FLASH_KEY, None) or []
    page = state.templates.get_template(template).render(
        csrf=security.csrf_token(session),
        auth_required=state.auth_required,
        logged_in=security.is_authenticated(session),
        live=state.hub is not None,
        flashes=flashes,
        **context,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


async def _registry_call(request: web.Request, call: Callable[[], Awaitable[T]]) -> T:
    """Run a registry call; count and report a backend failure as a 503 page."""
    try:
        return await call()
    except (UnknownEntry, DuplicateEntry, DuplicateName):
        raise
    except RegistryError as exc:
        state = _state(request)
        state.registry_errors += 1
        logs.event("admin registry error", error=str(exc))
        raise web.HTTPServiceUnavailable(text=f"registry unavailable: {exc}\n") from exc


async def _entry(request: web.Request, uuid: str) -> Entry:
    registry = _state(request).registry
    entry = await _registry_call(request, lambda: registry.get(uuid))
    if entry is None:
        raise web.HTTPNotFound(text=f"no hidden server with ID {uuid!r}\n")
    return entry


def _id_param(request: web.Request) -> str:
    uuid = request.query.get("id", "")
    if not uuid:
        raise web.HTTPBadRequest(text="missing id\n")
    return uuid


async def _form_id(request: web.Request) -> str:
    form = await request.post()
    uuid = form.get("id")
    if not isinstance(uuid, str) or not uuid:
        raise web.HTTPBadRequest(text="missing id\n")
    return uuid


def _document(state: AdminState, entry: Entry) -> dict[str, Any]:
    relay = state.relay()
    return provisioning_document(entry, relay.host, relay.port or DEFAULT_PORT, relay.ca_pem)


def _peer(request: web.Request) -> str:
    return request.remote or "-"


# ---------------------------------------------------------------------------- pages


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    state = _state(request)
    registry = state.registry
    entries = await _registry_call(request, registry.list)
    snapshot = state.status.snapshot() if state.status is not None else None
    numbers: dict[str, Any] = snapshot["ids"] if snapshot else {}
    rows = [{"entry": e, "live": IdNumbers(**numbers.get(e.uuid, {})),
             "url": state.visitor_url(e.name)} for e in entries]
    return await render(
        request,
        "index.html",
        rows=rows,
        relay=snapshot["relay"] if snapshot else None,
        now=time.time(),
        default_step=DEFAULT_STEP,
        default_digits=FORM_DIGITS,
        digit_choices=DIGIT_CHOICES,
        max_step=MAX_STEP,
        max_label=MAX_LABEL,
        proxy_choices=PROXY_VERSIONS,
        domain=state.config.domain,
    )


@routes.get("/entry")
async def entry_page(request: web.Request) -> web.Response:
    state = _state(request)
    entry = await _entry(request, _id_param(request))
    document = _document(state, entry)
    qr_fits = await asyncio.to_thread(_qr_svg, document) is not None
    return await render(
        request,
        "entry.html",
        entry=entry,
        visitor_url=state.visitor_url(entry.name),
        document=json.dumps(document, indent=2),
        qr_fits=qr_fits,
        just_made=request.query.get("new") == "1",
    )


@routes.get("/provisioning.json")
async def provisioning_file(request: web.Request) -> web.Response:
    state = _state(request)
    entry = await _entry(request, _id_param(request))
    name = f"{entry.uuid}.json" if _FILE_SAFE_ID.fullmatch(entry.uuid) else "provisioning.json"
    return web.Response(
        text=json.dumps(_document(state, entry), indent=2) + "\n",
        content_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@routes.get("/qr.svg")
async def qr_code(request: web.Request) -> web.Response:
    state = _state(request)
    entry = await _entry(request, _id_param(request))
    svg = await asyncio.to_thread(_qr_svg, _document(state, entry))
    if svg is None:
        return web.Response(status=413, text="the provisioning file is too large for a QR code\n")
    return web.Response(body=svg, content_type="image/svg+xml")


@routes.get("/visitor-qr.svg")
async def visitor_qr_code(request: web.Request) -> web.Response:
    """The entry's visitor URL as a QR code: a phone scans it and opens the hidden server."""
    state = _state(request)
    entry = await _entry(request, _id_param(request))
    url = state.visitor_url(entry.name)
    if url is None:
        raise web.HTTPNotFound(text="this hidden server has no visitor URL (no name, or the "
                                    "relay runs without --domain)\n")
    svg = await asyncio.to_thread(_svg, url, "visitor URL")
    assert svg is not None  # a host name (at most 253 characters) always fits
    return web.Response(body=svg, content_type="image/svg+xml")


def _svg(data: str, title: str, error: str = "m") -> bytes | None:
    """``data`` as a QR code in SVG (error correction M by default: a URL is short, and a phone's
    camera meets smudges); None if it cannot fit."""
    try:
        code = segno.make_qr(data, error=error)
    except segno.DataOverflowError:
        return None
    out = io.BytesIO()
    code.save(out, kind="svg", border=4, xmldecl=False, omitsize=True,
              title=title, dark="#000", light="#fff")
    return out.getvalue()


def _qr_svg(document: dict[str, Any]) -> bytes | None:
    """The provisioning document (compact JSON) as a QR code in SVG; None if it cannot fit.

    Run in a thread: a large code takes segno tens of milliseconds, which the relay sharing
    this event loop should not wait for.
    """
    # Error correction L: the document is long (it carries the certificate); L fits the most.
    return _svg(json.dumps(document, separators=(",", ":")), "provisioning file", error="l")


@routes.get("/confirm")
async def confirm(request: web.Request) -> web.Response:
    action = request.query.get("action")
    if action not in ("rotate", "remove"):
        raise web.HTTPBadRequest(text="action must be rotate or remove\n")
    entry = await _entry(request, _id_param(request))
    return await render(request, "confirm.html", action=action, entry=entry)


# ---------------------------------------------------------------------------- actions


@routes.post("/create")
async def create(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    form = await request.post()
    label = " ".join(str(form.get("label") or "").split())
    step = _form_int(form.get("step"), DEFAULT_STEP, 1, MAX_STEP, "step")
    digits = _form_int(form.get("digits"), FORM_DIGITS, MIN_DIGITS, MAX_DIGITS, "digits")
    if len(label) > MAX_LABEL:
        raise web.HTTPBadRequest(text=f"label longer than {MAX_LABEL} characters\n")
    try:
        name = normal_name(str(form.get("name") or ""))
    except ConfigError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    password = str(form.get("visitor_password") or "")
    if len(password) > MAX_VISITOR_PASSWORD or any(c in password for c in "\r\n"):
        raise web.HTTPBadRequest(
            text=f"visitor password: one line of at most {MAX_VISITOR_PASSWORD} characters\n")
    proxy = _form_int(form.get("proxy_protocol"), 0, min(PROXY_VERSIONS), max(PROXY_VERSIONS),
                      "proxy_protocol")
    uuid = str(uuid4())
    entry = Entry(uuid=uuid, base32=new_secret(), step=step, digits=digits, label=label,
                  visitor=VisitorSecret.from_password(uuid, password) if password else None,
                  name=name, proxy_protocol=proxy)
    registry = state.registry
    try:
        await _registry_call(
            request, lambda: registrar.provision(registry, registrar.adding(entry), state.relay()))
    except DuplicateName as exc:
        raise web.HTTPConflict(text=f"{exc}: choose another name\n") from None
    logs.event("admin created", id=entry.uuid, label=label, name=name or "-",
               visitors=bool(password), proxy=proxy or "none", by=_peer(request))
    session = get_session(request)
    _flash(session, "ok", f"Added {label or entry.uuid}. Give the hidden server its "
                          "provisioning file: it holds the secret.")
    raise web.HTTPSeeOther(str(URL.build(path="/entry", query={"id": entry.uuid, "new": "1"})))


def _form_int(value: Any, default: int, low: int, high: int, name: str) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(str(value))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number\n") from None
    if not low <= number <= high:
        raise web.HTTPBadRequest(text=f"{name} must be from {low} to {high}\n")
    return number


@routes.post("/rotate")
async def rotate(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    uuid = await _form_id(request)
    registry = state.registry
    try:
        await _registry_call(
            request, lambda: registrar.provision(registry, registrar.rotating(uuid), state.relay()))
    except UnknownEntry:
        raise web.HTTPNotFound(text=f"no hidden server with ID {uuid!r}\n") from None
    logs.event("admin rotated", id=uuid, by=_peer(request))
    session = get_session(request)
    _flash(session, "ok", "New secret made: the old one no longer parks, and connections "
                          "parked with it are closed. Give the hidden server this new "
                          "provisioning file.")
    raise web.HTTPSeeOther(str(URL.build(path="/entry", query={"id": uuid, "new": "1"})))


@routes.post("/remove")
async def remove(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    uuid = await _form_id(request)
    registry = state.registry
    try:
        await _registry_call(request, lambda: registry.remove(uuid))
    except UnknownEntry:
        raise web.HTTPNotFound(text=f"no hidden server with ID {uuid!r}\n") from None
    logs.event("admin removed", id=uuid, by=_peer(request))
    session = get_session(request)
    _flash(session, "ok", f"Removed {uuid}: it can no longer park, and its parked "
                          "connections are closed.")
    raise web.HTTPSeeOther("/")


# ---------------------------------------------------------------------------- login


@routes.get("/login")
async def login_page(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    session = get_session(request)
    target = security.safe_next(request.query.get("next"))
    if not state.auth_required or security.is_authenticated(session):
        raise web.HTTPSeeOther(target)
    return await render(request, "login.html", next=target)


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    password = state.config.password
    form = await request.post()
    target = security.safe_next(str(form.get("next") or "/"))
    if password is None:
        raise web.HTTPSeeOther(target)
    given = str(form.get("password") or "")
    try:
        matches = await security.check_password(request, given, via="login form")
    except security.TooManyGuesses as exc:
        _flash(get_session(request), "error",
               f"Too many wrong passwords: try again in {exc.retry_after} s.")
        page = await render(request, "login.html", status=429, next=target)
        page.headers["Retry-After"] = str(exc.retry_after)
        return page
    if not matches:
        _flash(get_session(request), "error", "Wrong password.")
        return await render(request, "login.html", status=401, next=target)
    security.log_in(request)
    logs.event("admin login", peer=_peer(request))
    raise web.HTTPSeeOther(target)


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    session = get_session(request)
    session.clear()
    raise web.HTTPSeeOther("/login" if _state(request).auth_required else "/")


# ---------------------------------------------------------------------------- machines


@routes.get("/api/status")
async def status(request: web.Request) -> web.Response:
    state = _state(request)
    if state.status is None:
        return web.json_response({"now": time.time(), "relay": None, "ids": {}})
    return web.json_response(state.status.snapshot())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    # Scraped on the event loop on purpose: the collector reads the hub without locks.
    # The format follows the scraper's Accept header (Prometheus text, or OpenMetrics).
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = web.Response(body=encode(_state(request).metrics))
    response.headers["Content-Type"] = content_type
    return response


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = _state(request)
    problems = []
    if state.relay_up is not None and not state.relay_up():
        problems.append("relay listener down")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await state.registry.ping()
    except Exception as exc:  # any failure of the backend means "not ready", never a 500
        state.registry_errors += 1
        logs.event("readiness: registry unreachable", error=str(exc) or type(exc).__name__)
        problems.append("registry unreachable")
    if problems:
        return web.Response(status=503, text=f"not ready: {', '.join(problems)}\n")
    return web.Response(text="ready\n")


# ---------------------------------------------------------------------------- template helpers


def format_time(timestamp: float) -> str:
    """A wall-clock time in the server's zone, to the minute; a dash for never."""
    if not timestamp:
        return "—"
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M")


def format_bytes(count: int | float) -> str:
    """``1.5 MiB``: binary units, three significant figures."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_number(value: float) -> str:
    """``0``, ``0.5``, ``12.25``: as JavaScript's String() shows it, so refreshes don't flicker."""
    return f"{value:g}"


def format_ago(timestamp: float, now: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, else the date; ``never`` for 0."""
    if not timestamp:
        return "never"
    seconds = max(0, int(now - timestamp))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return format_time(timestamp)
