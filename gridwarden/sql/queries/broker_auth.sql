-- Broker accounts (gridwarden/broker_auth.py).

-- name: device_exists
SELECT 1 FROM devices WHERE id = $1;

-- name: worker_exists
SELECT 1 FROM workers WHERE id = $1;

-- name: upsert_mqtt_account
-- $1 user name, $2 kind, $3 subject, $4 password hash. Issuing again rotates the password
-- and brings a revoked account back.
INSERT INTO mqtt_accounts (username, kind, subject, password_hash)
VALUES ($1, $2, $3, $4)
ON CONFLICT (username) DO UPDATE
SET password_hash = EXCLUDED.password_hash, changed_at = now(), revoked_at = NULL
WHERE mqtt_accounts.kind = EXCLUDED.kind
RETURNING username;

-- name: devices_without_mqtt_account
SELECT d.id FROM devices d
WHERE NOT EXISTS (
    SELECT 1 FROM mqtt_accounts a WHERE a.kind = 'device' AND a.subject = d.id
      AND a.revoked_at IS NULL
)
ORDER BY d.id;

-- name: revoke_mqtt_account
UPDATE mqtt_accounts SET revoked_at = now(), changed_at = now()
WHERE username = $1 AND revoked_at IS NULL
RETURNING username;

-- name: live_mqtt_accounts
SELECT username, kind, subject, password_hash FROM mqtt_accounts
WHERE revoked_at IS NULL
ORDER BY username;

-- name: list_mqtt_accounts
SELECT username, kind, subject, created_at, changed_at, revoked_at FROM mqtt_accounts
ORDER BY username;

-- name: mqtt_accounts_version
-- Changes whenever an account is issued, rotated or revoked.
SELECT count(*) AS accounts, max(changed_at) AS changed FROM mqtt_accounts;
