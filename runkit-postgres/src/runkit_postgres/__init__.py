"""runkit_postgres."""
