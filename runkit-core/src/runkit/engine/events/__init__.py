"""The events side: what consumes the partition streams.

``consumers`` decides what runs per partition; ``processes`` (with
``process_instances``, ``process_scopes``, ``process_steps``, ``process_queues``
and ``process_stores``) runs process handlers with one write per instance per
group (ADR 0006); ``deadlines`` keeps deadline journals and timers;
``projections`` delivers with ADR-26 checkpoints; ``observers`` decides when an
``execute_command`` observer is satisfied or can no longer be.
"""
