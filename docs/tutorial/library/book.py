"""The book aggregate: one instance per book, enforcing "one loan at a time"."""

from __future__ import annotations

# --8<-- [start:root]
from datetime import timedelta

import attrs

import dogma

from .messages import BookBorrowed, BookReturned, BorrowBook, LoanOverdue, MarkOverdue, ReturnBook


@attrs.define
class Book(dogma.NoSnapshotBehavior):
    """A book's state, rebuilt from its events: who has it, and how many loans so far."""

    borrower: str | None = None
    loans: int = 0
    overdue: bool = False

    def apply_event(self, event: dogma.Event) -> None:
        match event:
            case BookBorrowed(member=member, loan=loan):
                self.borrower, self.loans, self.overdue = member, loan, False
            case BookReturned():
                self.borrower = None
            case LoanOverdue():
                self.overdue = True
            case _:
                pass


# --8<-- [end:root]


# --8<-- [start:handler]
class BookHandler:
    """Lends and takes back books; the only place that decides who has a book."""

    def __init__(self, loan_period: timedelta) -> None:
        self.loan_period = loan_period

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        c.identity("book", "a26cd6c4-709a-4108-a1ec-85f13cf97d52")
        c.routes(
            dogma.handles_command(BorrowBook),
            dogma.handles_command(ReturnBook),
            dogma.handles_command(MarkOverdue),
            dogma.records_event(BookBorrowed),
            dogma.records_event(BookReturned),
            dogma.records_event(LoanOverdue),
        )

    def new(self) -> Book:
        return Book()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        match command:
            case BorrowBook(book_id=book_id) | ReturnBook(book_id=book_id):
                return book_id
            case MarkOverdue(book_id=book_id):
                return book_id
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self, root: Book, scope: dogma.AggregateCommandScope[Book], command: dogma.Command
    ) -> None:
        match command:
            case BorrowBook(book_id=book_id, member=member):
                if root.borrower is not None:
                    scope.log("book %s is on loan to %s already", book_id, root.borrower)
                    return  # no event: nothing happened
                scope.record_event(
                    BookBorrowed(
                        book_id=book_id,
                        member=member,
                        loan=root.loans + 1,
                        due_at=scope.now() + self.loan_period,
                    )
                )
            case ReturnBook(book_id=book_id, member=member):
                if root.borrower == member:
                    scope.record_event(
                        BookReturned(book_id=book_id, member=member, loan=root.loans)
                    )
            case MarkOverdue(book_id=book_id, loan=loan, member=member):
                # The book may have come back since the process decided.
                if root.borrower == member and root.loans == loan and not root.overdue:
                    scope.record_event(LoanOverdue(book_id=book_id, member=member, loan=loan))
            case _:
                raise dogma.UnexpectedMessage(command)


# --8<-- [end:handler]
