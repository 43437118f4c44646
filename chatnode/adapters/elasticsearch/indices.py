"""The names of the archive's Elasticsearch indices, from the deployment's key prefix."""

from __future__ import annotations

import re
from typing import Final

_PREFIX_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.\-]*")


def messages_index(prefix: str) -> str:
    """The archive index for ``prefix``; raise ``ValueError`` if ES would refuse the name."""
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > 200:
        raise ValueError(
            f"the index prefix {prefix!r} must be lowercase letters, digits, '_', '.', '-' "
            "(an Elasticsearch index name)"
        )
    return f"{prefix}-messages"


def dead_letters_index(prefix: str) -> str:
    """The dead letters' index for ``prefix`` (``ValueError`` as :func:`messages_index`)."""
    messages_index(prefix)
    return f"{prefix}-dead-letters"
