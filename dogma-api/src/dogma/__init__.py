"""dogma."""
