"""What the schema migrations of every backend raise when they cannot run."""


class MigrationError(Exception):
    """A migration cannot run: bad files, a lock held too long, a conflicting mapping."""
