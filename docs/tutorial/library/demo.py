"""Try the library in one program: the engine embedded, on the memory driver.

Run it with ``python -m library.demo``, with ``LIBRARY_DB`` set to the read
model's ``postgresql://`` URL.
"""

from __future__ import annotations

# --8<-- [start:main]
import os
from datetime import timedelta

import anyio
import anyio.to_thread

import dogma
import runkit

from .app import Library
from .catalogue import LoanRow, forget, loans
from .messages import BorrowBook, LoanOverdue, ReturnBook


async def main() -> list[LoanRow]:
    library = Library(
        database=os.environ.get("LIBRARY_DB", "postgresql://localhost/library"),
        loan_period=timedelta(seconds=1),
    )
    # A memory store forgets everything when the program ends: start the read
    # model it feeds afresh too.
    await library.db.run(forget)
    engine = runkit.Engine(
        runkit.with_application(library),
        runkit.with_persistence("memory:///library"),
    )
    executor = engine.executor_for(library)

    async def overdue(event: LoanOverdue) -> bool:
        print(f"observed: {event.message_description()}")
        return True

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await executor.execute_command(BorrowBook(book_id="dune", member="ada"))
        await executor.execute_command(ReturnBook(book_id="dune", member="ada"))
        with anyio.fail_after(10):
            # Returns once the engine owns the command AND an observer is
            # satisfied: here, when the loan process has marked the loan overdue.
            await executor.execute_command(
                BorrowBook(book_id="emma", member="grace"),
                observers=[dogma.observe(LoanOverdue, overdue)],
            )
            # The projection runs on its own: wait until it has caught up.
            # (The books' partitions handle their commands independently, so
            # which loan is older is not known in advance: compare by book.)
            while True:
                rows = await anyio.to_thread.run_sync(loans, library.db)
                if {row.book_id: row.status for row in rows} == {
                    "dune": "returned",
                    "emma": "overdue",
                }:
                    break
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()  # stops the engine gracefully

    return sorted(rows, key=lambda row: row.book_id)


if __name__ == "__main__":
    for row in anyio.run(main):
        print(f"{row.book_id:<12} loan {row.loan}  {row.member:<8} {row.status}")
# --8<-- [end:main]
