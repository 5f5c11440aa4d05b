"""The persistence interface: providers of journals, keyspaces and sets.

Drivers (``runkit-memory``, ``runkit-postgres``, ``runkit-dynamodb``,
``runkit-s3``, or third-party) implement these abstract classes and register
through the ``runkit`` pluggy entry-point group; ``provider_from_url`` picks one
by URL scheme and ``check_url`` validates a URL without I/O. ``runkit.testing``
has the conformance suites every driver runs.
"""

from ._errors import Conflict as Conflict
from ._errors import LimitExceeded as LimitExceeded
from ._errors import PersistenceError as PersistenceError
from ._errors import RecordNotFound as RecordNotFound
from ._errors import StoreUnavailable as StoreUnavailable
from ._journals import append_with_conflict_resolution as append_with_conflict_resolution
from ._journals import first_record as first_record
from ._journals import last_record as last_record
from ._journals import search as search
from ._plugins import check_url as check_url
from ._plugins import driver_package as driver_package
from ._plugins import installed_schemes as installed_schemes
from ._plugins import plugin_manager as plugin_manager
from ._plugins import provider_from_url as provider_from_url
from ._plugins import url_problems as url_problems
from ._stores import Handle as Handle
from ._stores import Journal as Journal
from ._stores import JournalStore as JournalStore
from ._stores import Keyspace as Keyspace
from ._stores import KeyspaceStore as KeyspaceStore
from ._stores import Provider as Provider
from ._stores import Set as Set
from ._stores import SetStore as SetStore
from ._stores import Store as Store
from ._types import MAX_POSITION as MAX_POSITION
from ._types import Interval as Interval
from ._types import Limits as Limits
from ._types import check_position as check_position
from ._urls import InvalidURL as InvalidURL
from ._urls import URLProblems as URLProblems
from ._urls import check_endpoint_url as check_endpoint_url
from ._urls import has_unencoded_password as has_unencoded_password
from ._urls import parse_bool as parse_bool
from ._urls import parse_problems as parse_problems
from ._urls import query_params as query_params
from ._urls import redact_url as redact_url

__all__ = [
    "MAX_POSITION",
    "Conflict",
    "Handle",
    "Interval",
    "InvalidURL",
    "Journal",
    "JournalStore",
    "Keyspace",
    "KeyspaceStore",
    "LimitExceeded",
    "Limits",
    "PersistenceError",
    "Provider",
    "RecordNotFound",
    "Set",
    "SetStore",
    "Store",
    "StoreUnavailable",
    "URLProblems",
    "append_with_conflict_resolution",
    "check_endpoint_url",
    "check_position",
    "check_url",
    "driver_package",
    "first_record",
    "has_unencoded_password",
    "installed_schemes",
    "last_record",
    "parse_bool",
    "parse_problems",
    "plugin_manager",
    "provider_from_url",
    "query_params",
    "redact_url",
    "search",
    "url_problems",
]
