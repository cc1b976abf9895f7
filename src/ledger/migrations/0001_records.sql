-- One row per metered request, written by every replica. `id` is the
-- record's own (a gateway process's random prefix and a count): a record shipped
-- twice is stored once. `request_id` is the client's x-request-id, which
-- clients may reuse, so it is a column, not the key.
CREATE TABLE ledger_records (
    id uuid PRIMARY KEY,
    request_id text NOT NULL,
    day date NOT NULL,
    key text NOT NULL,
    model text NOT NULL,
    deployment text NOT NULL,
    input_tokens bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens bigint NOT NULL CHECK (output_tokens >= 0),
    cost_nano_usd bigint NOT NULL CHECK (cost_nano_usd >= 0),
    recorded_at timestamptz NOT NULL
);

-- Budgets at start read this month by key; /admin/spend filters by day
-- and key.
CREATE INDEX ledger_records_day_key ON ledger_records (day, key);
