"""The URL schemes this driver handles (a module of its own so the plugin can
name them without importing psycopg)."""

SCHEMES = ("postgres", "postgresql")
