"""The Dogma application API for Python.

Applications define messages (:class:`Command`, :class:`Event`,
:class:`Deadline`), register them with a UUID, and implement handlers
(aggregates, processes, integrations, projections) that an engine such as
runkit runs. This package holds no engine code and does no I/O.
"""

from ._aggregate import AggregateCommandScope as AggregateCommandScope
from ._aggregate import AggregateConfigurer as AggregateConfigurer
from ._aggregate import AggregateMessageHandler as AggregateMessageHandler
from ._aggregate import AggregateRoot as AggregateRoot
from ._aggregate import NoSnapshotBehavior as NoSnapshotBehavior
from ._application import Application as Application
from ._application import ApplicationConfigurer as ApplicationConfigurer
from ._errors import EventObserverNotSatisfied as EventObserverNotSatisfied
from ._errors import NotSupported as NotSupported
from ._errors import UnexpectedMessage as UnexpectedMessage
from ._errors import ValidationError as ValidationError
from ._executor import CommandExecutor as CommandExecutor
from ._executor import EventObserver as EventObserver
from ._executor import observe as observe
from ._handler import ConcurrencyPreference as ConcurrencyPreference
from ._handler import HandlerConfigurer as HandlerConfigurer
from ._handler import HandlerScope as HandlerScope
from ._identity import validate_identity_key as validate_identity_key
from ._identity import validate_identity_name as validate_identity_name
from ._integration import IntegrationCommandScope as IntegrationCommandScope
from ._integration import IntegrationConfigurer as IntegrationConfigurer
from ._integration import IntegrationMessageHandler as IntegrationMessageHandler
from ._messages import Command as Command
from ._messages import CommandValidationScope as CommandValidationScope
from ._messages import Deadline as Deadline
from ._messages import DeadlineValidationScope as DeadlineValidationScope
from ._messages import Event as Event
from ._messages import EventValidationScope as EventValidationScope
from ._messages import Message as Message
from ._messages import MessageKind as MessageKind
from ._messages import ValidationScope as ValidationScope
from ._process import NoDeadlineMessagesBehavior as NoDeadlineMessagesBehavior
from ._process import ProcessConfigurer as ProcessConfigurer
from ._process import ProcessDeadlineScope as ProcessDeadlineScope
from ._process import ProcessEventScope as ProcessEventScope
from ._process import ProcessMessageHandler as ProcessMessageHandler
from ._process import ProcessRoot as ProcessRoot
from ._process import ProcessScope as ProcessScope
from ._process import StatelessProcessBehavior as StatelessProcessBehavior
from ._process import StatelessProcessRoot as StatelessProcessRoot
from ._projection import NoCompactBehavior as NoCompactBehavior
from ._projection import NoResetBehavior as NoResetBehavior
from ._projection import ProjectionCompactScope as ProjectionCompactScope
from ._projection import ProjectionConfigurer as ProjectionConfigurer
from ._projection import ProjectionEventScope as ProjectionEventScope
from ._projection import ProjectionMessageHandler as ProjectionMessageHandler
from ._projection import ProjectionResetScope as ProjectionResetScope
from ._registry import MessageType as MessageType
from ._registry import MessageTypeRegistry as MessageTypeRegistry
from ._registry import register_command as register_command
from ._registry import register_deadline as register_deadline
from ._registry import register_event as register_event
from ._registry import registry as registry
from ._routes import AggregateHandlerRoute as AggregateHandlerRoute
from ._routes import AggregateRoute as AggregateRoute
from ._routes import ExecutesCommandRoute as ExecutesCommandRoute
from ._routes import HandlerRoute as HandlerRoute
from ._routes import HandlesCommandRoute as HandlesCommandRoute
from ._routes import HandlesEventRoute as HandlesEventRoute
from ._routes import IntegrationHandlerRoute as IntegrationHandlerRoute
from ._routes import IntegrationRoute as IntegrationRoute
from ._routes import MessageRoute as MessageRoute
from ._routes import ProcessHandlerRoute as ProcessHandlerRoute
from ._routes import ProcessRoute as ProcessRoute
from ._routes import ProjectionHandlerRoute as ProjectionHandlerRoute
from ._routes import ProjectionRoute as ProjectionRoute
from ._routes import RecordsEventRoute as RecordsEventRoute
from ._routes import SchedulesDeadlineRoute as SchedulesDeadlineRoute
from ._routes import executes_command as executes_command
from ._routes import handles_command as handles_command
from ._routes import handles_event as handles_event
from ._routes import records_event as records_event
from ._routes import schedules_deadline as schedules_deadline
from ._routes import via_aggregate as via_aggregate
from ._routes import via_integration as via_integration
from ._routes import via_process as via_process
from ._routes import via_projection as via_projection

__all__ = (
    "AggregateCommandScope",
    "AggregateConfigurer",
    "AggregateHandlerRoute",
    "AggregateMessageHandler",
    "AggregateRoot",
    "AggregateRoute",
    "Application",
    "ApplicationConfigurer",
    "Command",
    "CommandExecutor",
    "CommandValidationScope",
    "ConcurrencyPreference",
    "Deadline",
    "DeadlineValidationScope",
    "Event",
    "EventObserver",
    "EventObserverNotSatisfied",
    "EventValidationScope",
    "ExecutesCommandRoute",
    "HandlerConfigurer",
    "HandlerRoute",
    "HandlerScope",
    "HandlesCommandRoute",
    "HandlesEventRoute",
    "IntegrationCommandScope",
    "IntegrationConfigurer",
    "IntegrationHandlerRoute",
    "IntegrationMessageHandler",
    "IntegrationRoute",
    "Message",
    "MessageKind",
    "MessageRoute",
    "MessageType",
    "MessageTypeRegistry",
    "NoCompactBehavior",
    "NoDeadlineMessagesBehavior",
    "NoResetBehavior",
    "NoSnapshotBehavior",
    "NotSupported",
    "ProcessConfigurer",
    "ProcessDeadlineScope",
    "ProcessEventScope",
    "ProcessHandlerRoute",
    "ProcessMessageHandler",
    "ProcessRoot",
    "ProcessRoute",
    "ProcessScope",
    "ProjectionCompactScope",
    "ProjectionConfigurer",
    "ProjectionEventScope",
    "ProjectionHandlerRoute",
    "ProjectionMessageHandler",
    "ProjectionResetScope",
    "ProjectionRoute",
    "RecordsEventRoute",
    "SchedulesDeadlineRoute",
    "StatelessProcessBehavior",
    "StatelessProcessRoot",
    "UnexpectedMessage",
    "ValidationError",
    "ValidationScope",
    "executes_command",
    "handles_command",
    "handles_event",
    "observe",
    "records_event",
    "register_command",
    "register_deadline",
    "register_event",
    "registry",
    "schedules_deadline",
    "validate_identity_key",
    "validate_identity_name",
    "via_aggregate",
    "via_integration",
    "via_process",
    "via_projection",
)


def _rewrite_module_names() -> None:
    # Users (and tracebacks, reprs and docs) should see dogma.Command, not
    # dogma._messages.Command. Type aliases and the registry instance have no
    # __module__ of their own to rewrite.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) or callable(obj):
            module = getattr(obj, "__module__", "")
            if isinstance(module, str) and module.startswith(__name__ + "._"):
                obj.__module__ = __name__


_rewrite_module_names()
del _rewrite_module_names
