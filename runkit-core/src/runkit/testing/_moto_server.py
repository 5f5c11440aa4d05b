"""A moto server whose requests are serialized: ``python -m runkit.testing._moto_server``.

moto's stock threaded server checks and then acts without a lock, so two
racing conditional writes can both win; real DynamoDB and S3 are atomic. One
lock around the WSGI app restores "exactly one winner". The server binds an
ephemeral port on 127.0.0.1 and prints it on the first line of stdout.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from typing import Any


def main() -> None:
    """Serve moto on 127.0.0.1 (port from argv, default ephemeral) until killed."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with lock:
            # Drain the response inside the lock: moto may do work lazily.
            return list(app(environ, start_response))

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = make_server(
        "127.0.0.1", port, serialized, threaded=True, request_handler=MotoRequestHandler
    )
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
