"""Send the library commands from another program, and read its loans.

    python -m library borrow BOOK MEMBER
    python -m library return BOOK MEMBER
    python -m library loans

``borrow`` and ``return`` need ``DOGMA_PERSISTENCE_URL``: the store of the
nodes that ``runkit run library.app:app`` started (start one first). ``loans``
reads the read model at ``LIBRARY_DB``.
"""

from __future__ import annotations

# --8<-- [start:send]
import sys

import anyio

import dogma
import runkit

from .app import app
from .catalogue import loans
from .messages import BorrowBook, ReturnBook


async def send(command: dogma.Command) -> None:
    """Execute one command on the running cluster, as a client: never a node."""
    async with runkit.Client(runkit.with_application(app), runkit.from_environment()) as client:
        await client.executor_for(app).execute_command(command)  # durable when it returns


def main(argv: list[str]) -> int:
    match argv:
        case ["borrow", book_id, member]:
            anyio.run(send, BorrowBook(book_id=book_id, member=member))
        case ["return", book_id, member]:
            anyio.run(send, ReturnBook(book_id=book_id, member=member))
        case ["loans"]:
            for row in loans(app.db):
                print(f"{row.book_id:<12} loan {row.loan}  {row.member:<8} {row.status}")
        case _:
            print(
                "usage: python -m library borrow BOOK MEMBER | return BOOK MEMBER | loans",
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
# --8<-- [end:send]
