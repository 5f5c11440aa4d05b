"""The customer aggregate: a customer is acquired only once."""

from __future__ import annotations

import attrs

import dogma

from ..messages import CustomerAcquired, OpenAccountForNewCustomer

__all__ = ["CustomerHandler", "CustomerRoot"]


@attrs.define
class CustomerRoot(dogma.NoSnapshotBehavior):
    """One customer: their name, empty until acquired."""

    name: str = ""

    def apply_event(self, event: dogma.Event) -> None:
        """Apply a customer event; other (historical) types change nothing."""
        match event:
            case CustomerAcquired():
                self.name = event.customer_name

    def aggregate_instance_description(self) -> str:
        """The customer's name."""
        return self.name


class CustomerHandler:
    """Handles commands for customers, identified by customer ID."""

    def configure(self, c: dogma.AggregateConfigurer) -> None:
        """Declare the customer aggregate's identity and routes."""
        c.identity("customer", "f30111d5-f100-4495-90ad-b09746ba8477")
        c.routes(
            dogma.handles_command(OpenAccountForNewCustomer),
            dogma.records_event(CustomerAcquired),
        )

    def new(self) -> CustomerRoot:
        """A customer not yet acquired."""
        return CustomerRoot()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        """Route by customer ID."""
        match command:
            case OpenAccountForNewCustomer():
                return command.customer_id
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self,
        root: CustomerRoot,
        scope: dogma.AggregateCommandScope[CustomerRoot],
        command: dogma.Command,
    ) -> None:
        """Acquire the customer, unless already acquired."""
        match command:
            case OpenAccountForNewCustomer():
                if root.name:
                    scope.log("customer has already been acquired")
                    return
                scope.record_event(
                    CustomerAcquired(
                        customer_id=command.customer_id,
                        customer_name=command.customer_name,
                        account_id=command.account_id,
                        account_name=command.account_name,
                    )
                )
            case _:
                raise dogma.UnexpectedMessage(command)
