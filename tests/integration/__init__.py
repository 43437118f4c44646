"""Adapters against the real services of scripts/services (marked ``integration``)."""
