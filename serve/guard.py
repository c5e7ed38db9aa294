"""Who may talk to the service: the Host a request names and, for browsers, the site that sent it.

A service on loopback or a private network is reachable from any web page open in a browser on that network, and
two browser attacks need no credential:

- DNS rebinding: a page on ``evil.example`` points its own name at 127.0.0.1 and then reads the service's answers as
  same-origin. Its requests still carry ``Host: evil.example``, so refusing Host names the operator did not list
  stops it (Starlette's `TrustedHostMiddleware`; 400).
- Cross-site "simple" requests: a page may POST a multipart form to any address without a CORS preflight. It cannot
  read the answer, but the service does the work (and scores what the page chose). Browsers say where such a
  request comes from (``Sec-Fetch-Site``, ``Origin``), so a POST under ``/v1`` from another site is refused (403)
  unless its origin is listed. Clients that are not browsers (curl, httpx, other services) send neither header and
  are not affected; the bundled viewer is same-origin.

The policy is per application (its ``args``), but Serve copies the FastAPI app, middleware included, when the
module is imported, before any args are known. So the middleware reads the policy that the replica installs at
start-up (`install`), once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Host names that reach this machine only from itself (the default: a service bound to loopback).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: Paths whose POSTs a browser must send from the service's own origin (or a listed one).
GUARDED_PREFIX = "/v1/"
#: ``Sec-Fetch-Site`` values that are not cross-site: the service's own pages, or the user typing a URL.
_OWN_SITE = frozenset({"same-origin", "none"})


@dataclass(frozen=True)
class GuardPolicy:
    """``allowed_hosts``: Host header names accepted (``*`` accepts any; ``*.example.org`` a domain);
    ``allowed_origins``: browser origins (``https://viewer.example.org``) allowed to POST from another site."""

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    allowed_origins: tuple[str, ...] = ()


def cross_site(headers: Headers, allowed_origins: tuple[str, ...]) -> bool:
    """Whether a browser sent this request from a site other than the service's own and not in
    ``allowed_origins``. ``Sec-Fetch-Site`` decides where the browser sends it; otherwise ``Origin`` is compared
    with the ``Host`` the request was sent to (``Origin: null``, from sandboxed frames and files, is cross-site)."""
    origin = headers.get("origin")
    if origin is not None and origin in allowed_origins:
        return False
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.lower() not in _OWN_SITE
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


class RequestGuard:
    """ASGI middleware: untrusted ``Host`` -> 400, a cross-site browser POST under ``/v1`` -> 403."""

    #: The policy of this process, set by `install` (a replica's args) before the first request.
    policy = GuardPolicy()

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._active: GuardPolicy | None = None
        self._checked: ASGIApp = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = RequestGuard.policy
        if policy is not self._active:
            self._active = policy
            self._checked = TrustedHostMiddleware(self._same_site, allowed_hosts=list(policy.allowed_hosts),
                                                  www_redirect=False)
        await self._checked(scope, receive, send)

    async def _same_site(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(GUARDED_PREFIX)
                and cross_site(Headers(scope=scope), self._active.allowed_origins)):
            response = JSONResponse({"detail": "cross-site request refused: list the page's origin in the "
                                               "service's allowed_origins to call it from a browser"},
                                    status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install(policy: GuardPolicy) -> None:
    """Make ``policy`` the one `RequestGuard` applies in this process (a replica calls it when it starts)."""
    RequestGuard.policy = policy
