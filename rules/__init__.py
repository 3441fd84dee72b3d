"""Rules engine: declarative rules in TOML files, a stateful engine, alarms."""
