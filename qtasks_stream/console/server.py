"""The console as an ASGI app (Starlette): the JSON API under ``/api``, the pages, the
checks every request passes, and :func:`run_console`, which serves it with uvicorn.

Who may do what:

- ``/api`` reads: ``Authorization: Bearer TOKEN`` or the console's session cookie, or
  nothing when the operator chose ``public_reads``.
- ``/api`` writes: the bearer header only. A browser sends cookies with any site's request;
  it never sends this header on its own, so no other site can make it write.
- Page reads: the session cookie (set by ``/login``), or nothing with ``public_reads``.
- Page actions (forms): the session cookie, the form's CSRF field, and, when the browser
  says where the request came from (``Origin``), this console. The cookie is
  ``SameSite=Strict`` and ``HttpOnly`` besides.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qtasks_stream.app import QueueTasks
from qtasks_stream.console import operations as ops
from qtasks_stream.console import pages
from qtasks_stream.console.openapi import openapi_document
from qtasks_stream.console.settings import ConsoleSettings
from qtasks_stream.errors import ConfigurationError, QTasksStreamError

__all__ = ["SESSION_COOKIE", "console_app", "run_console", "serve_console"]

SESSION_COOKIE = "qtasks_console"
_JSON = "application/json"
_SECURITY_HEADERS = [
    # No inline script or style attribute can run: an escaping mistake stays inert.
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

Handler = Callable[[Request], Awaitable[Response]]


class _SecurityHeaders:
    """Adds :data:`_SECURITY_HEADERS` to every response."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        await self.inner(scope, receive, with_headers)


def _json(value: Any, status: int = 200) -> Response:
    return Response(ops.dumps(value), status_code=status, media_type=_JSON)


def _error(status: int, message: str) -> Response:
    response = _json({"error": message, "status": status}, status)
    if status == 401:
        response.headers["www-authenticate"] = 'Bearer realm="qtasks-console"'
    return response


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before more is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ops.ConsoleError(413, f"the body is {declared} bytes; at most {limit} are read")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ops.ConsoleError(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Console:
    """The routes, bound to one app and its settings."""

    def __init__(self, app: QueueTasks, settings: ConsoleSettings) -> None:
        self.app = app
        self.settings = settings
        self.session = hmac.new(
            settings.token.encode(), b"qtasks-console-session", hashlib.sha256
        ).hexdigest()

    # -- who is asking ----------------------------------------------------------------------

    def _bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.settings.token_matches(given.strip())

    def _signed_in(self, request: Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode())

    def _may_read(self, request: Request) -> bool:
        return self.settings.public_reads or self._bearer(request) or self._signed_in(request)

    def _same_origin(self, request: Request) -> bool:
        # What a browser says of where the request came from; other clients say nothing.
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None  # "null": a sandboxed or privacy-stripped origin, refused
        return urlsplit(origin).netloc == request.headers.get("host", "")

    # -- wrappers -----------------------------------------------------------------------------

    def api(self, handler: Handler, *, write: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            allowed = self._bearer(request) if write else self._may_read(request)
            if not allowed:
                what = "a write needs" if write else "reading needs"
                return _error(401, f"{what} the console's bearer token (Authorization: Bearer)")
            try:
                return await handler(request)
            except ops.ConsoleError as exc:
                return _error(exc.status, exc.message)
            except QTasksStreamError as exc:
                return _error(500, f"{type(exc).__name__}: {exc}")

        return endpoint

    def page(self, handler: Handler, *, write: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                if write:
                    form = await self._form(request)
                    if not self._signed_in(request):
                        raise ops.ConsoleError(401, "sign in first: actions need the token")
                    if not self._same_origin(request) or not hmac.compare_digest(
                        form.get("csrf", "").encode(), self.settings.csrf_token.encode()
                    ):
                        raise ops.ConsoleError(403, "the form did not come from this console")
                    request.state.form = form
                elif not self._may_read(request):
                    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)
                return await handler(request)
            except ops.ConsoleError as exc:
                return self._error_page(exc.status, exc.message)
            except QTasksStreamError as exc:
                return self._error_page(500, f"{type(exc).__name__}: {exc}")

        return endpoint

    async def _form(self, request: Request) -> dict[str, Any]:
        """An urlencoded form; a field given more than once (``letters``) becomes a list."""
        body = await _body(request, self.settings.max_body)
        form: dict[str, Any] = {}
        for key, value in parse_qsl(body.decode(errors="replace"), keep_blank_values=True):
            if key == "letters":
                form.setdefault(key, []).append(value)
            else:
                form[key] = value
        return form

    def _error_page(self, status: int, message: str) -> Response:
        return HTMLResponse(
            pages.error_page(status, message, self.settings, self.app.name), status_code=status
        )

    # -- API ----------------------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_document(sorted(self.app.definitions)))

    async def submit(self, request: Request) -> Response:
        body = await _body(request, self.settings.max_body)
        task = await ops.submit(
            self.app,
            request.path_params["name"],
            body,
            request.headers.get("idempotency-key"),
        )
        return _json(ops.task_json(task), 202)

    async def get_task(self, request: Request) -> Response:
        task = await ops.get(self.app, request.path_params["id"], request.query_params.get("as_of"))
        return _json(ops.task_json(task))

    async def history(self, request: Request) -> Response:
        detail = await ops.detail(
            self.app, request.path_params["id"], request.query_params.get("as_of")
        )
        return _json(detail.history)

    async def cancel(self, request: Request) -> Response:
        body = await _body(request, self.settings.max_body)
        task = await ops.cancel(self.app, request.path_params["id"], ops.reason_of(body))
        return _json({"id": task.uuid, "cancel_requested": True}, 202)

    async def resubmit(self, request: Request) -> Response:
        body = await _body(request, self.settings.max_body)
        attempt = await ops.resubmit(self.app, request.path_params["id"], ops.reason_of(body))
        return _json({"id": request.path_params["id"], "attempt": attempt}, 202)

    async def list_tasks(self, request: Request) -> Response:
        page = await ops.list_tasks(self.app, request.query_params)
        return _json(
            {"tasks": [ops.task_json(t) for t in page.tasks], "next_cursor": page.next_cursor}
        )

    async def counts(self, request: Request) -> Response:
        return _json(await ops.counts(self.app))

    async def letters(self, request: Request) -> Response:
        rows = await ops.dead_letters(self.app, request.query_params)
        topic = self.app.topology.deadletter
        return _json({"topic": topic, "letters": [r.to_json(topic) for r in rows]})

    async def replay(self, request: Request) -> Response:
        positions, reason = ops.replay_request(await _body(request, self.settings.max_body))
        outcomes = await ops.replay_letters(self.app, positions, reason)
        return _json(
            {
                "outcomes": [
                    {
                        "id": f"{o.letter.partition}:{o.letter.offset}",
                        "task_id": o.letter.task_id,
                        "result": o.result,
                    }
                    for o in outcomes
                ]
            }
        )

    async def live(self, request: Request) -> Response:
        """Server-sent events: ``changed`` whenever the view applied something."""
        view = self.app.view
        await ops.counts(self.app)  # starts the view, or answers why there is none
        interval = self.settings.live_interval

        async def events() -> AsyncIterator[bytes]:
            last = await view.positions()
            yield b"retry: 2000\nevent: hello\ndata: {}\n\n"
            while not await request.is_disconnected():
                await asyncio.sleep(interval)
                now = await view.positions()
                if now != last:
                    last = now
                    yield b"event: changed\ndata: {}\n\n"
                else:
                    yield b": idle\n\n"  # a comment: finds a closed connection

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- pages --------------------------------------------------------------------------------

    async def tasks_page(self, request: Request) -> Response:
        params = {k: v for k, v in request.query_params.items() if v}
        page, counts = await asyncio.gather(ops.list_tasks(self.app, params), ops.counts(self.app))
        return HTMLResponse(
            pages.tasks_page(
                page,
                counts,
                params,
                self.app.definitions,
                self.app.topology.queues,
                self.settings,
                self.app.name,
                self._signed_in(request),
            )
        )

    async def task_page(self, request: Request) -> Response:
        detail = await ops.detail(
            self.app, request.path_params["id"], request.query_params.get("as_of")
        )
        return HTMLResponse(
            pages.task_page(
                detail,
                self.settings,
                self.app.name,
                self._signed_in(request),
                request.query_params.get("done"),
            )
        )

    async def letters_page(self, request: Request) -> Response:
        rows = await ops.dead_letters(self.app, request.query_params)
        return HTMLResponse(
            pages.dead_letters_page(rows, self.settings, self.app.name, self._signed_in(request))
        )

    async def cancel_form(self, request: Request) -> Response:
        task_id = request.path_params["id"]
        reason = str(request.state.form.get("reason", ""))
        await ops.cancel(self.app, task_id, reason)
        return RedirectResponse(f"/tasks/{task_id}?done=cancel", status_code=303)

    async def resubmit_form(self, request: Request) -> Response:
        task_id = request.path_params["id"]
        reason = str(request.state.form.get("reason", ""))
        await ops.resubmit(self.app, task_id, reason)
        return RedirectResponse(f"/tasks/{task_id}?done=resubmit", status_code=303)

    async def replay_form(self, request: Request) -> Response:
        form = request.state.form
        positions = ops.parse_positions(form.get("letters", []))
        outcomes = await ops.replay_letters(self.app, positions, str(form.get("reason", "")))
        return HTMLResponse(
            pages.replay_page(
                [
                    (f"{o.letter.partition}:{o.letter.offset}", o.letter.task_id, o.result)
                    for o in outcomes
                ],
                self.settings,
                self.app.name,
            )
        )

    async def login_form(self, request: Request) -> Response:
        next_path = _local(request.query_params.get("next", "/"))
        return HTMLResponse(pages.login_page(next_path, False, self.settings, self.app.name))

    async def login(self, request: Request) -> Response:
        try:
            form = await self._form(request)
        except ops.ConsoleError as exc:
            return self._error_page(exc.status, exc.message)
        next_path = _local(str(form.get("next", "/")))
        if not self.settings.token_matches(str(form.get("token", ""))):
            return HTMLResponse(
                pages.login_page(next_path, True, self.settings, self.app.name), status_code=401
            )
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE, self.session, httponly=True, samesite="strict", path="/"
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        types = {"console.js": "text/javascript", "console.css": "text/css"}
        if name not in types:
            raise ops.ConsoleError(404, f"no static file {name!r}")
        text = resources.files("qtasks_stream.console").joinpath("static", name).read_text()
        return Response(text, media_type=types[name])

    def routes(self) -> list[Route]:
        api, page = self.api, self.page
        return [
            Route("/api/openapi.json", api(self.openapi)),
            Route("/api/tasks", api(self.list_tasks)),
            Route("/api/tasks/{name}", api(self.submit, write=True), methods=["POST"]),
            Route("/api/tasks/{id}", api(self.get_task)),
            Route("/api/tasks/{id}/history", api(self.history)),
            Route("/api/tasks/{id}/cancel", api(self.cancel, write=True), methods=["POST"]),
            Route("/api/tasks/{id}/resubmit", api(self.resubmit, write=True), methods=["POST"]),
            Route("/api/counts", api(self.counts)),
            Route("/api/dead-letters", api(self.letters)),
            Route("/api/dead-letters/replay", api(self.replay, write=True), methods=["POST"]),
            Route("/api/live", api(self.live)),
            Route("/", page(self.tasks_page)),
            Route("/tasks/{id}", page(self.task_page)),
            Route("/tasks/{id}/cancel", page(self.cancel_form, write=True), methods=["POST"]),
            Route("/tasks/{id}/resubmit", page(self.resubmit_form, write=True), methods=["POST"]),
            Route("/dead-letters", page(self.letters_page)),
            Route("/dead-letters/replay", page(self.replay_form, write=True), methods=["POST"]),
            Route("/login", self.login_form),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", page(self.logout, write=True), methods=["POST"]),
            Route("/static/{name}", self._static_endpoint),
        ]

    async def _static_endpoint(self, request: Request) -> Response:
        try:
            return await self.static(request)
        except ops.ConsoleError as exc:
            return _error(exc.status, exc.message)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if request.url.path.startswith("/api/"):
            return _error(status, f"{message}: {request.method} {request.url.path}")
        return self._error_page(status, f"{message}: {request.url.path}")


def _local(path: str) -> str:
    """``path`` if it stays on this console (no open redirect), else ``/``."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def console_app(app: QueueTasks, settings: ConsoleSettings) -> ASGIApp:
    """The console of ``app`` as an ASGI application."""
    console = Console(app, settings)
    middleware = []
    if settings.allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts))
    return _SecurityHeaders(
        Starlette(
            routes=console.routes(),
            middleware=middleware,
            exception_handlers={HTTPException: console.not_found},
        )
    )


async def serve_console(
    app: QueueTasks,
    settings: ConsoleSettings,
    host: str,
    port: int,
    *,
    stages: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the console until the server stops (SIGINT/SIGTERM), running ``stages`` of the
    app beside it; ``announce`` gets the console's address once it listens. Closes the app.

    Raises:
        ConfigurationError: the address cannot be bound (in use, not this machine's).
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if announce is not None and self.servers:
                bound = self.servers[0].sockets[0].getsockname()[1]
                announce(f"http://{host}:{bound}/")

    server = Server(
        uvicorn.Config(
            console_app(app, settings),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            # Live-update streams never end by themselves: do not wait for them for long.
            timeout_graceful_shutdown=1,
        )
    )
    try:
        if stages:
            await app.start(stages)
        else:
            await app.connect()
        # uvicorn raises the signal that stopped it again once it stopped: with asyncio.run's
        # own handler that interrupted the app's close (KeyboardInterrupt); this one is quiet.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, setattr, server, "should_exit", True)
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a socket it could not bind
            raise ConfigurationError(
                f"the console cannot listen on {host}:{port} (uvicorn's error is above)"
            ) from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().remove_signal_handler(sig)
        await app.close()


def run_console(
    app: QueueTasks,
    host: str = "127.0.0.1",
    port: int = 8088,
    token: str | None = None,
    *,
    public_reads: bool = False,
    trace_url: str | None = None,
    stages: Sequence[str] = (),
) -> int:
    """The ``console`` command: serve the console of ``app``. Without a token one is made up
    and printed, so the console is never open to whoever reaches the port."""
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"console token (set QTASKS_CONSOLE_TOKEN to choose one): {token}", file=sys.stderr)
    loopback = ("127.0.0.1", "localhost")
    settings = ConsoleSettings(
        token,
        public_reads=public_reads,
        trace_url=trace_url,
        allowed_hosts=loopback if host in loopback else None,
    )
    if host not in loopback:
        print(f"warning: the console listens on {host}, beyond this machine", file=sys.stderr)

    def announce(url: str) -> None:
        print(
            f"console of app {app.name!r} on {url}"
            + (f" (running {', '.join(stages)})" if stages else ""),
            file=sys.stderr,
            flush=True,
        )

    asyncio.run(serve_console(app, settings, host, port, stages=stages, announce=announce))
    return 0
