"""The local dashboard served by the edge runtime: JSON API, live WebSocket, pages, metrics.

``Dashboard(runtime, cfg)`` wires everything to a runtime; add its ``services()`` to
``runtime.services``. ``create_app`` builds the Litestar application alone, ``serve`` runs it
under uvicorn in the current event loop, and ``LiveHub`` is the live fan-out.
"""

from .app import Dashboard, create_app
from .auth import hash_password, verify_password
from .live import LiveClient, LiveHub
from .server import ServerReady, serve

__all__ = (
    "Dashboard",
    "LiveClient",
    "LiveHub",
    "ServerReady",
    "create_app",
    "hash_password",
    "serve",
    "verify_password",
)
