"""gridwarden shared core: configuration, database, registries, embedded services, CLI."""

__version__ = "0.1.0"
