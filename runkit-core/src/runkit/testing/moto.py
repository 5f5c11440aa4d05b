"""A throwaway moto server for testing AWS-backed drivers (DynamoDB, S3).

Needs ``moto[dynamodb,s3]`` and ``flask`` installed. Requests are serialized
(see ``_moto_server``) so conditional writes race as they do on AWS. The server
runs in its own process and is stopped with SIGKILL: moto can spend minutes in
garbage collection on SIGTERM after heavy use.

    with MotoServer() as moto:
        boto3.client("s3", endpoint_url=moto.endpoint, **moto.client_kwargs())
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from types import TracebackType
from typing import Self

__all__ = ["MotoServer"]

#: Dummy credentials; moto accepts any.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """Start a serialized moto server on an ephemeral loopback port.

    ``host``/``port``/``endpoint`` are set once started. ``environ()`` gives the
    variables boto3 needs (fake credentials, region) for a subprocess or
    ``monkeypatch``.
    """

    def __init__(self, *, start_timeout: float = 30.0) -> None:
        if not start_timeout > 0:
            raise ValueError(f"start_timeout must be positive, not {start_timeout!r}")
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The server's HTTP endpoint URL."""
        return f"http://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        """``host:port``, for ``dynamodb://host:port/...`` and ``s3://host:port/...`` URLs."""
        return f"{self.host}:{self.port}"

    @staticmethod
    def environ() -> dict[str, str]:
        """Environment variables with fake credentials and a default region."""
        return dict(CREDENTIALS)

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client(...)`` against this server."""
        return {
            "endpoint_url": self.endpoint,
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "aws_session_token": CREDENTIALS["AWS_SESSION_TOKEN"],
        }

    def start(self) -> None:
        """Start the server and wait until it listens, at most ``start_timeout`` seconds.

        Raises ``RuntimeError`` (having killed the server) if it exits first or
        has not announced its port by then.
        """
        if self._process is not None:
            raise RuntimeError("moto server already started")
        env = {**os.environ, **CREDENTIALS}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "runkit.testing._moto_server"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        stdout = self._process.stdout
        assert stdout is not None
        # The child prints its port once bound; werkzeug is listening by then.
        # Read it in a thread, so that a child that hangs cannot block us for ever:
        # killing the child (``stop``) ends the read.
        lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(
            target=lambda: lines.put(stdout.readline()), name="moto-start", daemon=True
        ).start()
        try:
            line = lines.get(timeout=self._start_timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(
                f"moto server did not start within {self._start_timeout:g} s"
            ) from None
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(
                "moto server failed to start; is moto[dynamodb,s3] with flask installed?"
            )
        self.port = int(line)

    def stop(self) -> None:
        """Kill the server (SIGKILL) and reap it. Idempotent."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
