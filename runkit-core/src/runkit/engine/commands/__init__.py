"""The commands side: the partition batch processor (ADR 0007).

``acceptance`` routes and accepts commands (local batch, offer to the owner, or
the inbox) with back-pressure; ``batches`` handles everything pending for a
partition in one pass and commits it with one stream append, helped by
``backlog`` (callers waiting for room), ``local_callers`` (settling local
callers, spilling to the inbox), ``inbox_progress`` (how far the inbox is
processed), ``parking`` (instances loading or awaiting a retry), ``retries``
(backoff and poisoning), ``integration_tasks`` (running integration commands),
``markers`` (idempotency markers) and ``pending`` (a pending command, completed
command IDs); ``aggregates`` keeps cached roots; ``integrations`` runs
integration handlers; ``materialiser`` writes aggregate instance journals and
snapshots behind the stream; ``inbox`` and ``poison`` are the partition's inbox
journal and poison store.
"""
