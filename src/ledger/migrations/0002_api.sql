-- The inbound API a request came through: chat, completions, embeddings,
-- messages or responses. Records from before are 'unknown'; the default
-- also keeps an older replica's inserts working during a rolling upgrade.
ALTER TABLE ledger_records ADD COLUMN api text NOT NULL DEFAULT 'unknown';
