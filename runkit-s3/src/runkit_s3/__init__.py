"""Amazon S3 persistence for runkit: journals, keyspaces and sets on conditional writes.

``s3:///<bucket>`` and ``s3://host:port/<bucket>`` URLs (through
``runkit.persistence.provider_from_url``), with the parameters ``region``,
``role_arn``, ``insecure`` and ``prefix``, or ``S3Provider(bucket, ...)``
directly. See ``docs/drivers/s3.md`` for the object layout, the append and
truncate protocol, request counts and IAM permissions.
"""

from ._provider import S3Provider as S3Provider
from ._settings import S3Settings as S3Settings
from ._settings import parse_url as parse_url

__all__ = ["S3Provider", "S3Settings", "parse_url"]

S3Provider.__module__ = __name__
S3Settings.__module__ = __name__
