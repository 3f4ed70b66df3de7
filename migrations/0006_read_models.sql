-- Read models the projector folds the event log into, and the position each projection reached.
-- Every column is derived from events (times included), so a rebuild reproduces rows exactly.
-- The projector rebuilds these tables under a new schema and swaps them in (projections/rebuild.py):
-- it copies them with LIKE … INCLUDING ALL, so defaults, checks and indexes live here only.

CREATE TABLE rm_tickets (
    ticket_id uuid PRIMARY KEY,
    tenant text NOT NULL,
    owner text NOT NULL,
    pipeline_name text NOT NULL,
    pipeline_version integer NOT NULL,
    status text NOT NULL
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    subtasks_total integer NOT NULL CHECK (subtasks_total >= 0),
    subtasks_completed integer NOT NULL DEFAULT 0 CHECK (subtasks_completed >= 0),
    -- Failed attempts, retried or not.
    subtasks_failed integer NOT NULL DEFAULT 0 CHECK (subtasks_failed >= 0),
    -- [{role, filename, sha256, media_type, size}], plus {pages, characters, chunks} once ingested.
    documents jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    ingested_at timestamptz,
    completed_at timestamptz,
    -- When the ticket reached any final status (completed, failed or cancelled).
    finished_at timestamptz,
    failure_reason text,
    failed_subtask_id text,
    cancelled_by text,
    last_position bigint NOT NULL,
    last_version bigint NOT NULL
);

-- Listing a tenant's tickets newest first, optionally by status, pipeline or owner, paginated by
-- the cursor (created_at, ticket_id): ORDER BY created_at DESC, ticket_id DESC.
CREATE INDEX rm_tickets_tenant_created_idx
    ON rm_tickets (tenant, created_at DESC, ticket_id DESC);
CREATE INDEX rm_tickets_tenant_status_created_idx
    ON rm_tickets (tenant, status, created_at DESC, ticket_id DESC);
CREATE INDEX rm_tickets_tenant_pipeline_created_idx
    ON rm_tickets (tenant, pipeline_name, created_at DESC, ticket_id DESC);
CREATE INDEX rm_tickets_tenant_owner_created_idx
    ON rm_tickets (tenant, owner, created_at DESC, ticket_id DESC);

CREATE TABLE rm_subtasks (
    ticket_id uuid NOT NULL,
    subtask_id text NOT NULL,
    tenant text NOT NULL,
    -- Place in the pipeline definition: the order to show subtasks in.
    ordinal integer NOT NULL CHECK (ordinal >= 0),
    title text NOT NULL,
    depends_on text[] NOT NULL,
    status text NOT NULL
        CHECK (status IN ('pending', 'ready', 'running', 'completed', 'failed')),
    -- The latest attempt made ready (0 until the subtask is first ready).
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    worker text,
    last_error text,
    output jsonb,
    output_sha256 text,
    model text,
    prompt_tokens integer,
    completion_tokens integer,
    cached_tokens integer,
    latency_ms double precision,
    -- A result that arrived after the ticket had failed or been cancelled: recorded, not counted.
    ignored boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL,
    last_position bigint NOT NULL,
    PRIMARY KEY (ticket_id, subtask_id)
);

-- One row per completed ticket.
CREATE TABLE rm_reports (
    ticket_id uuid PRIMARY KEY,
    tenant text NOT NULL,
    final_subtask_id text NOT NULL,
    -- The output of the final subtask (the one nothing depends on, last in the pipeline).
    verdict jsonb,
    -- {subtask_id: {title, output, output_sha256}} for every subtask.
    outputs jsonb NOT NULL,
    markdown text NOT NULL,
    completed_at timestamptz NOT NULL,
    position bigint NOT NULL
);

CREATE INDEX rm_reports_tenant_idx ON rm_reports (tenant, completed_at DESC, ticket_id DESC);

-- Tickets per tenant by status: pending + running + completed + failed + cancelled = tickets.
CREATE TABLE rm_tenant_counts (
    tenant text PRIMARY KEY,
    tickets bigint NOT NULL DEFAULT 0 CHECK (tickets >= 0),
    pending bigint NOT NULL DEFAULT 0 CHECK (pending >= 0),
    running bigint NOT NULL DEFAULT 0 CHECK (running >= 0),
    completed bigint NOT NULL DEFAULT 0 CHECK (completed >= 0),
    failed bigint NOT NULL DEFAULT 0 CHECK (failed >= 0),
    cancelled bigint NOT NULL DEFAULT 0 CHECK (cancelled >= 0)
);

-- The position in the global log each projection has applied, written in the same transaction
-- as its rows. Not part of any rebuild: a rebuild swaps the tables and sets the position here.
CREATE TABLE projection_positions (
    name text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    rebuilt_at timestamptz
);
