"""The loan process: one instance per loan, which notices when a loan runs late."""

from __future__ import annotations

# --8<-- [start:root]
import json
from datetime import datetime

import attrs

import dogma

from .messages import BookBorrowed, BookReturned, LoanDue, MarkOverdue


@attrs.define
class Loan:
    """What the process remembers between messages; the engine stores it."""

    member: str = ""
    due_at: datetime | None = None

    def process_instance_description(self, ended: bool) -> str:
        return f"loan to {self.member or '?'}" + (" (ended)" if ended else "")

    def marshal_binary(self) -> bytes:
        due_at = None if self.due_at is None else self.due_at.isoformat()
        return json.dumps({"member": self.member, "due_at": due_at}).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        fields = json.loads(data)
        self.member = fields["member"]
        self.due_at = None if fields["due_at"] is None else datetime.fromisoformat(fields["due_at"])


# --8<-- [end:root]


# --8<-- [start:handler]
class LoanProcess:
    """Schedules a check for each loan's due date; marks the loan overdue if still out."""

    def configure(self, c: dogma.ProcessConfigurer) -> None:
        c.identity("loan", "0dd5f503-b686-4e21-9800-2f2d5fc3623f")
        c.routes(
            dogma.handles_event(BookBorrowed),
            dogma.handles_event(BookReturned),
            dogma.executes_command(MarkOverdue),
            dogma.schedules_deadline(LoanDue),
        )

    def new(self) -> Loan:
        return Loan()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        match event:
            case (
                BookBorrowed(book_id=book_id, loan=loan) | BookReturned(book_id=book_id, loan=loan)
            ):
                return f"{book_id}/{loan}"  # one instance per loan
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_event(
        self, root: Loan, scope: dogma.ProcessEventScope[Loan], event: dogma.Event
    ) -> None:
        match event:
            case BookBorrowed(book_id=book_id, member=member, loan=loan, due_at=due_at):

                def remember(loan_state: Loan) -> None:
                    loan_state.member, loan_state.due_at = member, due_at

                scope.mutate(remember)
                scope.schedule_deadline(LoanDue(book_id=book_id, loan=loan), due_at)
            case BookReturned():
                scope.end()  # the book is back: the pending deadline is cancelled
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_deadline(
        self, root: Loan, scope: dogma.ProcessDeadlineScope[Loan], deadline: dogma.Deadline
    ) -> None:
        match deadline:
            case LoanDue(book_id=book_id, loan=loan):
                scope.log("loan %s of %s to %s is due", loan, book_id, root.member)
                scope.execute_command(MarkOverdue(book_id=book_id, loan=loan, member=root.member))
                scope.end()
            case _:
                raise dogma.UnexpectedMessage(deadline)


# --8<-- [end:handler]
