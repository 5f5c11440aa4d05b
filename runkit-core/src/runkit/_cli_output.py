"""Text output of the ``runkit`` command line: aligned tables and ``runkit status``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from ._validate import is_unspecified_address

if TYPE_CHECKING:
    from datetime import datetime

    from .engine.cluster.status import ApplicationStatus, ClusterStatus

__all__ = ["heartbeat_age", "node_address", "print_table", "status_text"]


def node_address(advertise: str | None, listen: str | None) -> str:
    """A node's address as ``runkit nodes`` and ``runkit status`` show it.

    The advertise address (what peers dial), and the listen address beside it
    only where it tells more: not when it is the same, nor when it is a
    wildcard on the same port (every interface, the advertised one among them).
    """
    if not advertise:
        return listen or "-"
    if not listen or listen == advertise:
        return advertise
    same_port = listen.rpartition(":")[2] == advertise.rpartition(":")[2]
    if same_port and is_unspecified_address(listen):
        return advertise
    return f"{advertise} (listens on {listen})"


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Write *rows* (the first is the header) as left-aligned, space-separated columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def heartbeat_age(now: datetime, written_at: datetime) -> str:
    """``0.4s ago``: never negative, though a heartbeat written while the status was
    read (after its ``read_at``) is, by a few milliseconds, newer than *now*."""
    return f"{max(0.0, (now - written_at).total_seconds()):.1f}s ago"


def status_text(status: ClusterStatus) -> str:
    """``runkit status``'s human output: a nodes table, then per application its partitions
    and its consumers' lag (largest first; consumers with no lag are only counted)."""
    out = io.StringIO()
    now = status.read_at
    if status.nodes or status.clients:
        rows: list[tuple[str, ...]] = [
            ("node", "state", "role", "version", "address", "last heartbeat")
        ]
        for n in (*status.nodes, *status.clients):
            age = heartbeat_age(now, n.written_at)
            state = "live" if n.live else "expired"
            address = node_address(n.advertise_address, n.listen_address)
            rows.append((n.node_id, state, n.role, n.version or "?", address, age))
        print_table(rows, out)
        live = len(status.live_nodes)
        clients = sum(c.live for c in status.clients)
        out.write(
            f"{live} live node(s), {len(status.nodes) - live} expired"
            + (f"; {clients} live client(s)" if clients else "")
            + "\n"
        )
    else:
        out.write("no nodes have heartbeat records in this store\n")
    for app in status.applications:
        out.write("\n")
        _application_text(app, out)
    return out.getvalue()


def _application_text(app: ApplicationStatus, out: TextIO) -> None:
    title = f"application {app.name}" + ("" if app.name == app.key else f" ({app.key})")
    if app.partition_count is None:
        out.write(f"{title}: has never run on this store\n")
        return
    out.write(f"{title}: {app.partition_count} partition(s)\n")
    rows: list[tuple[str, ...]] = [
        ("partition", "owner", "claimed by", "backlog", "stream end", "deadlines", "poisoned")
    ]
    for p in app.partitions:
        owner = p.owner if p.owner is not None else "(no live node)"
        claimed = "same" if p.claimed_by == p.owner else (p.claimed_by or "-")
        poisoned = str(p.poisoned) + (
            f" (+{p.poisoned_events} events)" if p.poisoned_events else ""
        )
        rows.append(
            (
                str(p.index),
                owner,
                claimed,
                str(p.inbox_backlog),
                str(p.stream_end),
                str(p.pending_deadlines),
                poisoned,
            )
        )
    print_table(rows, out)
    backlog = sum(p.inbox_backlog for p in app.partitions)
    out.write(f"backlog {backlog} command(s), {sum(p.poisoned for p in app.partitions)} poisoned\n")
    if app.name == app.key:
        # Found through heartbeats, which carry keys only: say how to see the rest.
        out.write("for its name and its consumers' lag, name it: runkit status MODULE:ATTR\n")
    if not app.consumers:
        return
    behind = [c for c in app.consumers if c.lag != 0]
    if behind:
        out.write("consumer lag (largest first):\n")
        rows = [("handler", "kind", "partition", "lag", "checkpoint")]
        for c in behind:
            lag = "?" if c.lag is None else str(c.lag)
            checkpoint = "?" if c.checkpoint is None else str(c.checkpoint)
            rows.append((c.handler, c.kind, str(c.partition), lag, checkpoint))
        print_table(rows, out)
    caught_up = len(app.consumers) - len(behind)
    out.write(f"{caught_up} of {len(app.consumers)} consumer(s) caught up\n")
