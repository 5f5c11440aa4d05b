"""In-memory persistence for runkit: the reference driver, for tests and single-process use.

``memory:///<silo>`` URLs (through ``runkit.persistence.provider_from_url``) and
``MemoryProvider("<silo>")`` give providers that share data with every other
provider of the same silo in this process. Data is lost when the process exits.
"""

from ._provider import MemoryProvider as MemoryProvider

__all__ = ["MemoryProvider"]

MemoryProvider.__module__ = __name__
