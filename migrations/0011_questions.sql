-- Follow-up questions on tickets' documents, one row per question, with the answer once the
-- subtask answering it completed. A read model like those of 0006: rebuilt with LIKE … INCLUDING
-- ALL, every column derived from events.

CREATE TABLE rm_questions (
    ticket_id uuid NOT NULL,
    question_id uuid NOT NULL,
    tenant text NOT NULL,
    -- The subtask answering it (`question_` and the question id's hex digits).
    subtask_id text NOT NULL,
    -- Its place in the ticket's conversation, from 0, in the order asked.
    ordinal integer NOT NULL CHECK (ordinal >= 0),
    question text NOT NULL,
    asked_by text NOT NULL,
    status text NOT NULL
        CHECK (status IN ('asked', 'ready', 'running', 'answered', 'failed')),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- The subtask's output once answered: {answerable, answer, citations: [{excerpt, page, heading}]}.
    answer jsonb,
    model text,
    prompt_sha256 text,
    last_error text,
    failure_reason text,
    asked_at timestamptz NOT NULL,
    answered_at timestamptz,
    updated_at timestamptz NOT NULL,
    last_position bigint NOT NULL,
    PRIMARY KEY (ticket_id, question_id)
);

CREATE UNIQUE INDEX rm_questions_subtask_idx ON rm_questions (ticket_id, subtask_id);
