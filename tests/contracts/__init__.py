"""Contract suites: one per port, run against every registered implementation."""
