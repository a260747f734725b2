//! The SQL: the schema, its migration, and the statements built from a [`Part`] (only the
//! column name ever is; values are always parameters).

use tokio_postgres::Client;

use crate::storage::Part;

/// The schema version this code creates and understands.
pub(super) const SCHEMA_VERSION: i32 = 1;

/// The advisory-lock class of writer sessions (see [`PgStorage`](super::PgStorage)'s
/// outbox), an arbitrary constant ("mc").
pub(super) const WRITER_LOCK_CLASS: i32 = 0x6d63;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mcstore_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS mcstore_collections (name text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS mcstore_resources (
    collection text NOT NULL REFERENCES mcstore_collections (name),
    name text NOT NULL,
    content bytea,
    meta bytea,
    PRIMARY KEY (collection, name)
);
CREATE TABLE IF NOT EXISTS mcstore_outbox (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    -- NULL: a failed invalidation, replayable now. Else the writer session whose write is in
    -- flight: replayable once that session is gone (its advisory lock released).
    writer integer,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mcstore_outbox_key ON mcstore_outbox (key);
CREATE SEQUENCE IF NOT EXISTS mcstore_writer_seq;
";

/// The schema, created or checked in one transaction; returns the version found.
pub(super) async fn migrate(
    c: &mut Client,
) -> std::result::Result<Option<i32>, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&i64::from(WRITER_LOCK_CLASS)],
    )
    .await?;
    tx.batch_execute(SCHEMA).await?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM mcstore_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    if found.is_none() {
        tx.execute(
            "INSERT INTO mcstore_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await?;
    }
    // A newer schema: rolled back on drop, nothing touched.
    if found.is_none_or(|v| v <= SCHEMA_VERSION) {
        tx.commit().await?;
    }
    Ok(found)
}

/// Upserts `part` of a resource ($1 collection, $2 name, $3 bytes).
pub(super) fn put_sql(part: Part) -> String {
    // The column name comes from the fixed `Part`, never from input.
    let col = column(part);
    format!(
        "INSERT INTO mcstore_resources (collection, name, {col}) VALUES ($1, $2, $3) \
         ON CONFLICT (collection, name) DO UPDATE SET {col} = EXCLUDED.{col} RETURNING 1"
    )
}

/// CTEs `d` and `u` removing `part` of a resource ($1 collection, $2 name), and the row
/// when the other part is absent too: the row is either deleted (no other part) or updated
/// (another part), never both, so one statement does it.
fn remove_ctes(part: Part) -> String {
    let (col, other) = (column(part), column(part.other()));
    format!(
        "d AS (DELETE FROM mcstore_resources WHERE collection = $1 AND name = $2 \
             AND {col} IS NOT NULL AND {other} IS NULL RETURNING 1), \
         u AS (UPDATE mcstore_resources SET {col} = NULL WHERE collection = $1 AND name = $2 \
             AND {col} IS NOT NULL AND {other} IS NOT NULL RETURNING 1)"
    )
}

/// Removes `part`; one row returned when something was removed.
pub(super) fn remove_sql(part: Part) -> String {
    format!(
        "WITH {} SELECT 1 FROM d UNION ALL SELECT 1 FROM u",
        remove_ctes(part)
    )
}

/// The outbox row for key `$k`, writer `$w` (parameter numbers given), inserted when the
/// write `changed` (an SQL condition), notified at commit; the statement returns its id.
pub(super) fn outbox_cte(k: u8, w: u8, changed: &str) -> String {
    format!(
        "o AS (INSERT INTO mcstore_outbox (key, writer) SELECT ${k}, ${w} WHERE {changed} \
         RETURNING id) SELECT id, pg_notify('mcstore_outbox', '') FROM o"
    )
}

/// A put and its outbox row in one statement ($1 collection, $2 name, $3 bytes, $4 key,
/// $5 writer).
pub(super) fn put_intending_sql(part: Part) -> String {
    format!(
        "WITH w AS ({}), {}",
        put_sql(part),
        outbox_cte(4, 5, "EXISTS (SELECT 1 FROM w)")
    )
}

/// A removal and its outbox row in one statement ($1 collection, $2 name, $3 key,
/// $4 writer).
pub(super) fn remove_intending_sql(part: Part) -> String {
    format!(
        "WITH {}, {}",
        remove_ctes(part),
        outbox_cte(3, 4, "EXISTS (SELECT 1 FROM d UNION ALL SELECT 1 FROM u)")
    )
}

/// The column of `part`.
pub(super) fn column(part: Part) -> &'static str {
    match part {
        Part::Content => "content",
        Part::Meta => "meta",
    }
}
