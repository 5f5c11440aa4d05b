"""runkit: a horizontally scalable engine for Dogma applications.

The front door: ``Engine`` and its options, the environment registry, the
configuration error, and the plugin markers for driver authors. Subsystems
live in ``runkit.persistence``, ``runkit.config``, ``runkit.rendezvous`` and
``runkit.testing``.
"""

import contextlib as _contextlib

from ._environment import ENVIRONMENT as ENVIRONMENT
from ._errors import ConfigurationError as ConfigurationError
from ._hookspec import hookimpl as hookimpl
from ._hookspec import hookspec as hookspec
from ._options import Option as Option
from ._options import from_environment as from_environment
from ._options import with_advertise_address as with_advertise_address
from ._options import with_application as with_application
from ._options import with_backlog_limit as with_backlog_limit
from ._options import with_heartbeat_interval as with_heartbeat_interval
from ._options import with_listen_address as with_listen_address
from ._options import with_node_id as with_node_id
from ._options import with_partition_count as with_partition_count
from ._options import with_persistence as with_persistence
from ._options import with_persistence_provider as with_persistence_provider
from ._options import with_retry_policy as with_retry_policy
from ._options import with_site as with_site
from ._options import with_start_timeout as with_start_timeout
from ._options import with_tls as with_tls
from .client import Client as Client
from .engine.cluster.status import ApplicationStatus as ApplicationStatus
from .engine.cluster.status import ClusterStatus as ClusterStatus
from .engine.cluster.status import ConsumerStatus as ConsumerStatus
from .engine.cluster.status import NodeStatus as NodeStatus
from .engine.cluster.status import PartitionStatus as PartitionStatus
from .engine.commands.acceptance import Backlogged as Backlogged
from .engine.commands.inbox import EngineStopped as EngineStopped
from .engine.engine import Engine as Engine

__all__ = [
    "ENVIRONMENT",
    "ApplicationStatus",
    "Backlogged",
    "Client",
    "ClusterStatus",
    "ConfigurationError",
    "ConsumerStatus",
    "Engine",
    "EngineStopped",
    "NodeStatus",
    "Option",
    "PartitionStatus",
    "from_environment",
    "hookimpl",
    "hookspec",
    "with_advertise_address",
    "with_application",
    "with_backlog_limit",
    "with_heartbeat_interval",
    "with_listen_address",
    "with_node_id",
    "with_partition_count",
    "with_persistence",
    "with_persistence_provider",
    "with_retry_policy",
    "with_site",
    "with_start_timeout",
    "with_tls",
]

# Public objects report the front door as their module.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and _obj.__module__.startswith("runkit."):
        with _contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
