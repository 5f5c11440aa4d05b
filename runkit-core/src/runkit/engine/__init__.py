"""The runkit engine: runs Dogma applications on partitions of journals, keyspaces and sets.

See ``docs/internals/engine-seams.md`` for the modules and the seams between them,
and ``docs/architecture.md`` for the design.
"""
