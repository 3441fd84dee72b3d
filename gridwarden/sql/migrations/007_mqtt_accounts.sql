-- Broker accounts: who may connect to the MQTT broker and what each may publish or read.
-- gridwarden renders Mosquitto's password and ACL files from this table (gridwarden/
-- broker_auth.py) and reloads the broker on change. Only the password's Mosquitto hash
-- (PBKDF2-SHA512, salted) is kept; the password itself is shown once, when issued.
--   device    publishes only under {prefix}/dev/{subject}/ and {prefix}/codec/+/{subject}
--   gateway   publishes for any device (a LoRa network server, a Zigbee bridge, the simulator)
--   worker    reads only {prefix}/workers/{subject}/
--   operator  reads {prefix}/alarms/ and {prefix}/workers/ (consoles, dispatch desks)
--   service   the platform itself: everything
CREATE TABLE mqtt_accounts (
    username       text PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('device', 'gateway', 'worker', 'operator', 'service')),
    subject        text,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    changed_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    CHECK ((kind IN ('device', 'worker')) = (subject IS NOT NULL)),
    -- Mosquitto's password file separates user and hash with ':'; its ACL file ends a
    -- user name at the line's end, so no control characters or spaces either.
    CHECK (username ~ '^[A-Za-z0-9_.@/-]{1,128}$')
);
-- One live account per device or worker: re-issuing rotates the password in place.
CREATE UNIQUE INDEX mqtt_accounts_subject_idx ON mqtt_accounts (kind, subject)
    WHERE subject IS NOT NULL;
