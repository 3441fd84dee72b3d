"""Alerting: alarm lifecycle and API, notifications (outbox), cases (next issue)."""
