-- Personal data in events is encrypted per data subject with keys kept here, outside the log;
-- erasing a subject destroys its key (crypto-shredding). See docs/adr/0021-crypto-shredding.md.

-- 1. One AES-256 key per data subject (a user) and tenant. An erased subject keeps its row, with
-- no key and the time it was erased, so readers can tell "erased" from "never encrypted".
CREATE TABLE ticketflow_subject_keys (
    tenant text NOT NULL,
    subject uuid NOT NULL,
    key bytea CHECK (key IS NULL OR octet_length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    erased_at timestamptz,
    PRIMARY KEY (tenant, subject),
    CHECK ((key IS NULL) = (erased_at IS NOT NULL))
);

-- The key is never copied into a TOAST table nor compressed: it stays in the row it belongs to.
ALTER TABLE ticketflow_subject_keys ALTER COLUMN key SET STORAGE PLAIN;

-- An erased subject stays erased: its key can neither come back nor change, and its row stays.
CREATE FUNCTION ticketflow_subject_keys_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'subject keys are erased (key set to NULL), never deleted'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.key IS NULL AND NEW.key IS NOT NULL THEN
        RAISE EXCEPTION 'subject % of tenant % was erased; it gets no key again',
            OLD.subject, OLD.tenant USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.key IS NOT NULL AND NEW.key IS NOT NULL AND NEW.key <> OLD.key THEN
        RAISE EXCEPTION 'a subject key is never replaced' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER ticketflow_subject_keys_guard
    BEFORE UPDATE OR DELETE ON ticketflow_subject_keys
    FOR EACH ROW EXECUTE FUNCTION ticketflow_subject_keys_guard();

-- 2. Retention: the newest retention setting of each tenant is found without scanning the log.
CREATE INDEX ticketflow_events_retention_idx ON ticketflow_events (tenant, notification_id)
    WHERE topic = 'ticketflow.tenant.retention_set.v1';

-- Blobs by age, for the retention job.
CREATE INDEX blobs_tenant_created_idx ON blobs (tenant, created_at);
