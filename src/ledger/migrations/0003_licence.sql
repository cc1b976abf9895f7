-- The Llama licence's evidence, per calendar month (UTC, 'YYYY-MM'):
-- the distinct end users served by llama deployments as HyperLogLog
-- registers (2^14 bytes, merged register by register, the larger), what
-- each licence served, and the EU multimodal refusals.
CREATE TABLE licence_users (
    month text PRIMARY KEY,
    registers bytea NOT NULL
);

CREATE TABLE licence_served (
    month text NOT NULL,
    licence text NOT NULL,
    requests bigint NOT NULL CHECK (requests >= 0),
    input_tokens bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens bigint NOT NULL CHECK (output_tokens >= 0),
    cost_nano_usd bigint NOT NULL CHECK (cost_nano_usd >= 0),
    PRIMARY KEY (month, licence)
);

CREATE TABLE licence_refusals (
    month text PRIMARY KEY,
    eu_multimodal bigint NOT NULL CHECK (eu_multimodal >= 0)
);
