"""The open-account-for-new-customer process: opens a new customer's first account."""

from __future__ import annotations

import dogma

from ..messages import CustomerAcquired, OpenAccount

__all__ = ["OpenAccountForNewCustomerProcessHandler"]


class OpenAccountForNewCustomerProcessHandler(
    dogma.StatelessProcessBehavior, dogma.NoDeadlineMessagesBehavior
):
    """Opens the first account of each acquired customer; one instance per customer ID."""

    def configure(self, c: dogma.ProcessConfigurer) -> None:
        """Declare the process's identity and routes."""
        c.identity("open-account-for-new-customer", "89b39176-a57f-4071-afad-e0db62137fd3")
        c.routes(
            dogma.handles_event(CustomerAcquired),
            dogma.executes_command(OpenAccount),
        )

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        """Route by customer ID."""
        match event:
            case CustomerAcquired():
                return event.customer_id
            case _:
                raise dogma.UnexpectedMessage(event)

    async def handle_event(
        self,
        root: dogma.StatelessProcessRoot,
        scope: dogma.ProcessEventScope[dogma.StatelessProcessRoot],
        event: dogma.Event,
    ) -> None:
        """Open the account, then end: there is nothing more to coordinate."""
        match event:
            case CustomerAcquired():
                # Executing before ending is allowed; the reverse order is not.
                scope.execute_command(
                    OpenAccount(
                        customer_id=event.customer_id,
                        account_id=event.account_id,
                        account_name=event.account_name,
                    )
                )
                scope.end()
            case _:
                raise dogma.UnexpectedMessage(event)
