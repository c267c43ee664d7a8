"""`edgepeft serve`: an OpenAI-compatible HTTP server over one Engine, where each request's
`model` picks its adapter (vLLM's multi-LoRA conventions). Needs `pip install 'edgepeft[serve]'`.

    from edgepeft.server import create_app, serve
"""

from __future__ import annotations

import socket
import sys

from edgepeft.errors import EdgepeftError, InvalidArgument, require


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one line saying why not."""
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} must be in 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InvalidArgument(f"host {host!r} cannot be resolved ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise EdgepeftError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Run `app` on the listening socket `sock` until interrupted (uvicorn)."""
    uvicorn = require("uvicorn", "serve")
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3,
                            lifespan="off")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"edgepeft serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


def create_app(*args, **kwargs):
    require("starlette", "serve")
    from .app import create_app as make

    return make(*args, **kwargs)


__all__ = ["create_app", "listen", "serve"]
