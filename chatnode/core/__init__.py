"""Pure domain: no I/O, no trio, no client libraries."""
