"""runkit_memory."""
