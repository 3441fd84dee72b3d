"""Alerting: alarm lifecycle and API, notifications (outbox), cases and their intake.

- `alerting.alarm_json`: the alarm's JSON shape and `announce_alarm` (notify + outbox),
  used by every writer of `alarms`; no web dependencies.
- `alerting.alarms_api`: `router` (GET /api/alarms, POST .../ack, .../close, GET .../stream),
  `AlarmFeed` (the supervised LISTEN task behind the stream) and `attach_alarms`.
- `alerting.outbox`: `OutboxPublisher` / `outbox_task`, outbox rows → MQTT at QoS 1.
- `alerting.cases`: the case loop (open or join, dispatch, actions, timeline, notifications).
- `alerting.intake`: `CaseIntake` / `case_intake_task`, raised alarms queued by the rules
  engine (`case_intake`) → their cases, out of the ingest transaction.
"""
