-- The extracted text of each ingested document, for subtasks that read the whole document.

CREATE TABLE document_texts (
    tenant text NOT NULL,
    document_sha256 text NOT NULL,
    text text NOT NULL,
    pages integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, document_sha256)
);
