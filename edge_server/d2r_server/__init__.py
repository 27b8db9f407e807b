"""d2r edge server: publish signed bundle versions of collections, serve them (full and delta)
to registered devices, and show what every device has.

    from d2r_server import create_app
    app = create_app({"DATA_DIR": "/srv/d2r", "ADMIN_TOKEN": "..."})

Run it with ``d2r serve`` (waitress). The protocol is in docs/sync-protocol.md.
"""

from .app import create_app

__all__ = ["create_app"]
