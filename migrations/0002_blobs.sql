-- Uploaded documents and large outputs, content-addressed per tenant.

CREATE TABLE blobs (
    tenant text NOT NULL,
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    media_type text NOT NULL,
    size bigint NOT NULL CHECK (size >= 0),
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sha256)
);

-- PDFs and DOCX files are already compressed: store them without another round of compression.
ALTER TABLE blobs ALTER COLUMN content SET STORAGE EXTERNAL;
