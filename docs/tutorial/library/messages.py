"""The library's messages: what can be asked, what happened, and when to look again."""

from __future__ import annotations

# --8<-- [start:commands]
from datetime import datetime

import attrs

import dogma


@dogma.register_command("29407f7c-5fec-47d9-b4b1-09d1624bc6a4")
@attrs.frozen(kw_only=True)
class BorrowBook(dogma.Command):
    """A member asks to borrow a book."""

    book_id: str
    member: str

    def message_description(self) -> str:
        return f"lending book {self.book_id} to {self.member}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        if not self.book_id or not self.member:
            raise dogma.ValidationError("borrow: book ID and member must not be empty")


@dogma.register_command("2a9a5ed8-63b4-45f3-bb80-71a117df8e62")
@attrs.frozen(kw_only=True)
class ReturnBook(dogma.Command):
    """A member brings a book back."""

    book_id: str
    member: str

    def message_description(self) -> str:
        return f"taking book {self.book_id} back from {self.member}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        if not self.book_id or not self.member:
            raise dogma.ValidationError("return: book ID and member must not be empty")


@dogma.register_command("8207b411-d1fc-4901-9579-9080533921bb")
@attrs.frozen(kw_only=True)
class MarkOverdue(dogma.Command):
    """The loan process says a loan's due date has passed."""

    book_id: str
    loan: int  # which loan of the book: 1, 2, ...
    member: str

    def message_description(self) -> str:
        return f"marking loan {self.loan} of book {self.book_id} overdue"


# --8<-- [end:commands]


# --8<-- [start:events]
@dogma.register_event("9effd005-8ee9-4f25-819f-d5f7a33dd5be")
@attrs.frozen(kw_only=True)
class BookBorrowed(dogma.Event):
    """A book was lent: the book's ``loan``-th loan, due back at ``due_at``."""

    book_id: str
    member: str
    loan: int
    due_at: datetime

    def message_description(self) -> str:
        return f"lent book {self.book_id} to {self.member} (loan {self.loan})"


@dogma.register_event("34de59cf-f7d3-439b-a96f-918209798c00")
@attrs.frozen(kw_only=True)
class BookReturned(dogma.Event):
    """A book came back."""

    book_id: str
    member: str
    loan: int

    def message_description(self) -> str:
        return f"took book {self.book_id} back from {self.member} (loan {self.loan})"


@dogma.register_event("ee7c49a1-b5f2-4211-82ae-f241713fce3b")
@attrs.frozen(kw_only=True)
class LoanOverdue(dogma.Event):
    """A loan passed its due date with the book still out."""

    book_id: str
    member: str
    loan: int

    def message_description(self) -> str:
        return f"loan {self.loan} of book {self.book_id} to {self.member} became overdue"


# --8<-- [end:events]


# --8<-- [start:deadline]
@dogma.register_deadline("5df3eaf7-166d-473e-ac0e-067f243082aa")
@attrs.frozen(kw_only=True)
class LoanDue(dogma.Deadline):
    """Time to check whether a loan's book is back."""

    book_id: str
    loan: int

    def message_description(self) -> str:
        return f"loan {self.loan} of book {self.book_id} is due"


# --8<-- [end:deadline]
