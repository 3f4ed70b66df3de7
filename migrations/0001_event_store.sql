-- The event store: the table layout the eventsourcing library's PostgreSQL recorder expects
-- (application name "ticketflow"), plus a guard that keeps it append-only.

CREATE TYPE stored_event_uuid AS (
    originator_id uuid,
    originator_version bigint,
    topic text,
    state bytea
);

CREATE TABLE ticketflow_events (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text,
    state bytea,
    notification_id bigserial,
    PRIMARY KEY (originator_id, originator_version)
) WITH (
    autovacuum_enabled = true,
    autovacuum_vacuum_threshold = 100000000,
    autovacuum_vacuum_scale_factor = 0.5,
    autovacuum_analyze_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01
);

CREATE UNIQUE INDEX ticketflow_events_notification_id_idx
    ON ticketflow_events (notification_id ASC);

-- Events are facts: nothing is ever updated or deleted in place.
CREATE FUNCTION ticketflow_events_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ticketflow_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ticketflow_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ticketflow_events
    FOR EACH ROW EXECUTE FUNCTION ticketflow_events_are_append_only();

CREATE TRIGGER ticketflow_events_no_truncate
    BEFORE TRUNCATE ON ticketflow_events
    FOR EACH STATEMENT EXECUTE FUNCTION ticketflow_events_are_append_only();
