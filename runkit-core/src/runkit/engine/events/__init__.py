"""The events side: what consumes the partition streams.

``consumers`` decides what runs per partition; process handlers run as steps
of each instance's home partition (``processes``, ``process_routing``,
``process_homes``, ``process_state``, ``process_records`` and the other
``process_*`` helpers); ``deadlines`` keeps deadline journals and timers;
``projections`` delivers with ADR-26 checkpoints; ``observers`` decides when an
``execute_command`` observer is satisfied or can no longer be.
"""
