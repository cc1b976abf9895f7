-- The ledger's SQLite licence tables, per calendar month ('YYYY-MM'):
-- the Llama end users' HyperLogLog registers, what each licence served,
-- the EU multimodal refusals; and requests per hour (since the Unix
-- epoch) and model, for the hourly peak.
CREATE TABLE licence_users (
    month TEXT PRIMARY KEY,
    registers BLOB NOT NULL
);
CREATE TABLE licence_served (
    month TEXT NOT NULL,
    licence TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_nano_usd INTEGER NOT NULL,
    PRIMARY KEY (month, licence)
);
CREATE TABLE licence_refusals (
    month TEXT PRIMARY KEY,
    eu_multimodal INTEGER NOT NULL
);
CREATE TABLE traffic_hours (
    hour INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (hour, model)
);
