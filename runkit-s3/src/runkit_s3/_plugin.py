"""runkit plugin hooks for this driver (filled in by the driver implementation)."""
