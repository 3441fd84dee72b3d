-- Keys the service makes for itself (gridwarden/keys.py): the key card and phone numbers
-- are hashed with when GRIDWARDEN_CREDENTIAL_HASH_KEY is unset, random, made on first use
-- and the same for every process and restart.
CREATE TABLE service_keys (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Before, an unset key meant the public default 'gridwarden-dev-key'. A database that
-- holds hashes made with it keeps it, or they would no longer match new input;
-- `gridwarden up` then warns that the key is public.
INSERT INTO service_keys (name, value)
SELECT 'credential_hash', 'gridwarden-dev-key'
WHERE EXISTS (SELECT 1 FROM workers WHERE phone_hash IS NOT NULL)
   OR EXISTS (SELECT 1 FROM device_events WHERE credential_hash IS NOT NULL);
