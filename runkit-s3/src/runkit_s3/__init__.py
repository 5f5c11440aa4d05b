"""runkit_s3."""
