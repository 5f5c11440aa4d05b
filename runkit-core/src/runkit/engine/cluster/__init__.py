"""The cluster: how nodes find each other, who owns what, and what they ask each other.

- ``nodes``: the heartbeat records in ``cluster/nodes`` (encoding, ``list_nodes``).
- ``membership``: the membership protocol (join, beat, watch, leave); an
  ``Ownership`` by rendezvous hashing over the live set. Its parts, one job
  each: ``heartbeat`` (writing this node's own record), ``node_set`` (reading
  the others'), ``live_view`` (the live set and the partitions this node wins)
  and ``store_calls`` (time bounds and once-per-outage logging of store calls).
- ``ownership``: the ``Ownership`` protocol and a static one for tests and tools.
- ``routing``: offers of commands to partition owners, inbox wake-ups, remote
  observation, and the methods a node serves (over ``runkit.transport``).
- ``following``: a chain's events read from a partition's stream journal, for
  the nodes that cannot be reached (no listen address).
- ``lone``: a lone node's bus-only observations, routed to the peers when
  some join during the call.
- ``status``: ``read_status``, what ``runkit status`` and ``Engine.status()`` show.

Failure detection is storage-based (no leader, no consensus); the transport only
makes things faster (a broken connection is a hint, never a verdict).
"""
