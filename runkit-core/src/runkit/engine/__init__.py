"""The runkit engine: runs Dogma applications on partitions of journals, keyspaces and sets.

Read it top-down:

- ``engine`` (``Engine``: the public entry point, runs everything until
  cancelled), ``runtime`` (``AppRuntime``: one application on this node),
  ``owned_partition`` (starting and stopping one owned partition),
  ``settings``, ``startup`` (waiting for the store), ``executor``
  (``CommandExecutor``).
- ``commands``: the partition batch processor (ADR 0007): accepting commands
  (``acceptance``), the inbox, handling a batch against cached aggregate roots
  (``batches``, ``aggregates``, ``integrations``) and the loop's helpers
  (``backlog``, ``local_callers``, ``inbox_progress``, ``parking``,
  ``retries``, ``integration_tasks``, ``markers``, ``pending``), the
  materialiser that writes instance journals behind the stream, and the
  poison store.
- ``streams``: the partition stream (the commit point), its readers and the
  in-process ``EventBus``; shared by both sides. One module per job:
  ``records`` (the record and its codec), ``reading``, ``bus``, ``tail`` (the
  takeover read) and ``writer``.
- ``events``: consumers of the streams: processes (``processes`` and its
  ``process_*`` helpers, e.g. ``process_outbox`` and ``process_retries``),
  deadlines, projections, and observers of ``execute_command``.
- ``cluster``: heartbeat records and membership, ownership by rendezvous,
  routing to owners over ``runkit.transport``, and status.
- Shared values: ``envelope`` (the stored message envelope), ``partitions``,
  ``meta`` (the partition count in ``<app>/meta``), ``ids``, ``logs``, ``backoff``.

``commands`` and ``events`` import neither each other nor ``cluster``; ``cluster``
reads both (routing carries inbox entries, status reads every store); the shared
modules import none of the three, and nothing below the top modules imports
them (``test_layering.py`` checks it).
See ``docs/internals/engine-seams.md`` and ``docs/architecture.md``.
"""
