"""What the adapters promise beyond their port contracts (schema, errors, embedded fan-out)."""
