"""The cluster: how nodes find each other, who owns what, and what they ask each other.

- ``nodes``: the heartbeat records in ``cluster/nodes`` (encoding, ``list_nodes``).
- ``membership``: this node's heartbeat loop and its view of the live set; an
  ``Ownership`` by rendezvous hashing over it.
- ``ownership``: the ``Ownership`` protocol and a static one for tests and tools.
- ``routing``: offers of commands to partition owners, inbox wake-ups, remote
  observation, and the methods a node serves (over ``runkit.transport``).
- ``status``: ``read_status``, what ``runkit status`` and ``Engine.status()`` show.

Failure detection is storage-based (no leader, no consensus); the transport only
makes things faster (a broken connection is a hint, never a verdict).
"""
