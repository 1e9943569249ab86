//! PostgreSQL's write path: the same transaction as on SQLite (`super::write`), run on a
//! connection of sqlx's own taken from sea-orm's pool, so that the lines and metric
//! points of new batches can go by `COPY … FROM STDIN` — one stream of rows instead of
//! multi-row INSERTs of 50 000 bind parameters each. Everything else in the transaction
//! (the `run_batches` keys that make a batch new, results, the metric summaries and
//! rollups, counters) is the same statements through sea-orm's `ConnectionTrait`,
//! implemented here over that connection, so exactly-once is unchanged: a batch's rows
//! are written only by the transaction that inserted its `run_batches` row. The bulk
//! ones among them (results, summaries, rollup blocks) bind one array per column
//! ([`BulkWrite::insert_many`]) instead of their rows' values.
//!
//! COPY cannot skip a row that exists. Lines can exist without their batch's key only
//! in an oddity (a line stored by an earlier version, a hand-made row), so each run's
//! seq range is checked first in one query; a run with any line there already takes the
//! `INSERT … ON CONFLICT DO NOTHING` path instead. Points are checked the same way per
//! series and step range (a step repeated by a later batch is legitimate there); when
//! any is stored they go by one INSERT of `unnest`ed arrays that skips those (a step
//! committed by a concurrent transaction while the COPY runs fails it: the
//! transaction is retried, and takes the INSERT). The points' COPY is in the binary
//! format: all numbers, none formatted here or parsed there.

use std::sync::atomic::{AtomicBool, Ordering};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, ExecResult, QueryResult,
    RuntimeErr, Statement, Value,
};
use sea_query_binder::SqlxValues;
use sqlx::postgres::PgCopyIn;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::Mutex;

use super::metrics::PointRows;
use super::{insert_lines, BulkWrite, LineRow, Prepared, Written};

/// Whether lines go by COPY (see `super::set_postgres_copy`).
pub(super) static COPY: AtomicBool = AtomicBool::new(true);

/// Whether [`BulkWrite::insert_many`] binds arrays (see `super::set_postgres_arrays`).
pub(super) static ARRAYS: AtomicBool = AtomicBool::new(true);

/// Bytes of COPY data sent per message.
const COPY_CHUNK: usize = 4 << 20;

/// The pool to write through when `db` is PostgreSQL and COPY is on.
pub(super) fn copy_pool(db: &DatabaseConnection) -> Option<&PgPool> {
    (db.get_database_backend() == DatabaseBackend::Postgres && COPY.load(Ordering::Relaxed))
        .then(|| db.get_postgres_connection_pool())
}

/// [`super::store_prepared`]'s transaction on a connection of `pool`. A connection whose COMMIT
/// failed is closed, never reused.
pub(super) async fn store(pool: &PgPool, prepared: Prepared) -> Result<Written, DbErr> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(e)))?;
    match transaction(&mut conn, prepared).await {
        Ok(written) => Ok(written),
        Err(Failed::Commit(error)) => {
            let _ = conn.close().await;
            Err(error)
        }
        Err(Failed::Before(error)) => Err(error),
    }
}

enum Failed {
    /// Before the COMMIT: the transaction rolled back (on drop).
    Before(DbErr),
    Commit(DbErr),
}

async fn transaction(conn: &mut PgConnection, prepared: Prepared) -> Result<Written, Failed> {
    let tx = conn.begin().await.map_err(|e| Failed::Before(exec(e)))?;
    let txn = PgTxn { tx: Mutex::new(tx) };
    // Dropped unfinished (an error, or the caller gone), the transaction rolls back.
    let written = super::write(&txn, prepared).await.map_err(Failed::Before)?;
    let tx = txn.tx.into_inner();
    tx.commit().await.map_err(|e| Failed::Commit(exec(e)))?;
    Ok(written)
}

fn exec(error: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(error))
}

fn query(error: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(error))
}

/// An open transaction on one PostgreSQL connection, for sea-orm statements and COPY.
struct PgTxn<'c> {
    tx: Mutex<sqlx::Transaction<'c, Postgres>>,
}

fn bound(stmt: &Statement) -> sqlx::query::Query<'_, Postgres, SqlxValues> {
    let values = stmt
        .values
        .clone()
        .unwrap_or_else(|| sea_orm::Values(Vec::new()));
    sqlx::query_with(&stmt.sql, SqlxValues(values))
}

#[async_trait::async_trait]
impl ConnectionTrait for PgTxn<'_> {
    fn get_database_backend(&self) -> DatabaseBackend {
        DatabaseBackend::Postgres
    }

    async fn execute(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        bound(&stmt)
            .execute(conn)
            .await
            .map(Into::into)
            .map_err(exec)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.execute(Statement::from_string(DatabaseBackend::Postgres, sql))
            .await
    }

    async fn query_one(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        bound(&stmt)
            .fetch_optional(conn)
            .await
            .map(|row| row.map(Into::into))
            .map_err(query)
    }

    async fn query_all(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        bound(&stmt)
            .fetch_all(conn)
            .await
            .map(|rows| rows.into_iter().map(Into::into).collect())
            .map_err(query)
    }
}

impl BulkWrite for PgTxn<'_> {
    async fn write_lines(&self, lines: Vec<(String, Vec<LineRow>)>) -> Result<(), DbErr> {
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        // Runs with a line in their new seq range already: one query for all of them.
        let (mut ids, mut lows, mut highs) = (Vec::new(), Vec::new(), Vec::new());
        for (run_id, rows) in &lines {
            let seqs = rows.iter().map(|r| r.seq);
            if let (Some(low), Some(high)) = (seqs.clone().min(), seqs.max()) {
                ids.push(run_id.clone());
                lows.push(low);
                highs.push(high);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let held: Vec<String> = sqlx::query_scalar(
            "SELECT q.run_id FROM unnest($1::text[], $2::int8[], $3::int8[]) AS q(run_id, lo, hi) \
             WHERE EXISTS (SELECT 1 FROM run_logs l WHERE l.run_id = q.run_id AND l.seq BETWEEN q.lo AND q.hi)",
        )
        .bind(&ids)
        .bind(&lows)
        .bind(&highs)
        .fetch_all(&mut *conn)
        .await
        .map_err(query)?;
        let (inserted, copied): (Vec<_>, Vec<_>) = lines
            .into_iter()
            .partition(|(run_id, _)| held.contains(run_id));
        if !copied.is_empty() {
            let mut copy = conn
                .copy_in_raw("COPY run_logs (run_id, seq, ts, level, message, metadata) FROM STDIN")
                .await
                .map_err(exec)?;
            let mut data = CopyData::new();
            for (run_id, rows) in &copied {
                for row in rows {
                    copy_row(&mut data.0, run_id, row);
                    if let Some(full) = data.full() {
                        copy.send(full).await.map_err(exec)?;
                    }
                }
            }
            data.finish(copy).await?;
        }
        drop(tx);
        if !inserted.is_empty() {
            insert_lines(self, inserted).await?;
        }
        Ok(())
    }

    /// Like the lines: when no series has a stored point in the step range it brings
    /// (one query for all), the points go by COPY — no `ON CONFLICT` to check row by
    /// row; otherwise one INSERT of `unnest`ed arrays (five parameters, not five a
    /// point) that skips the points stored before.
    ///
    /// Another transaction may be writing one of these steps at the same moment (another
    /// aggregator, or a second writer, storing a later batch of the run that repeats the
    /// step). The check cannot see its uncommitted point; the COPY waits on it and, once
    /// it commits, meets its key. That unique violation is not the data's fault, so it
    /// is returned as an outage, not a data error ([`super::is_permanent`]): the
    /// consumer retries the transaction, whose check then sees the committed point and
    /// takes the INSERT. (Not a savepoint around each COPY: a transaction of more than
    /// 64 runs would overflow PostgreSQL's subtransaction cache and slow every other
    /// session's visibility checks while it is open.)
    async fn insert_points(&self, points: PointRows) -> Result<u64, DbErr> {
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        if !points_held(conn, &points).await? {
            return copy_points(conn, &points).await.map_err(|error| {
                if is_unique_violation(&error) {
                    DbErr::Custom(format!(
                        "a step of these metric points was stored by a concurrent transaction while they were copied; \
                         the transaction is retried ({error})"
                    ))
                } else {
                    error
                }
            });
        }
        sqlx::query(
            "INSERT INTO run_metrics (series_id, step, value, seq, ts) \
             SELECT * FROM unnest($1::int8[], $2::int8[], $3::float8[], $4::int8[], $5::int8[]) \
             ON CONFLICT (series_id, step) DO NOTHING",
        )
        .bind(&points.series_id)
        .bind(&points.step)
        .bind(&points.value)
        .bind(&points.seq)
        .bind(&points.ts)
        .execute(conn)
        .await
        .map(|done| done.rows_affected())
        .map_err(exec)
    }

    /// One statement whatever the number of rows: each column bound as one array and
    /// `unnest`ed, so the statement's text is the same every time and is prepared once
    /// per connection (multi-row VALUES of a new length each time were parsed and
    /// planned anew, 12 parameters a row for a rollup block). Values of a type it does
    /// not bind as arrays go by the multi-row INSERT.
    async fn insert_many(
        &self,
        insert: &str,
        width: usize,
        values: Vec<Value>,
        tail: &str,
    ) -> Result<u64, DbErr> {
        if values.is_empty() {
            return Ok(0);
        }
        if !ARRAYS.load(Ordering::Relaxed) {
            return super::insert_values(self, insert, width, values, tail).await;
        }
        let columns = match Column::split(width, values) {
            Ok(columns) => columns,
            Err(values) => {
                tracing::debug!(
                    insert,
                    "values of a type not bound as arrays: multi-row VALUES"
                );
                return super::insert_values(self, insert, width, values, tail).await;
            }
        };
        let arrays: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, column)| format!("${}::{}[]", i + 1, column.sql_type()))
            .collect();
        let sql = format!("{insert} SELECT * FROM unnest({}){tail}", arrays.join(", "));
        let mut query = sqlx::query(&sql);
        for column in columns {
            query = match column {
                Column::Int4(values) => query.bind(values),
                Column::Int8(values) => query.bind(values),
                Column::Float8(values) => query.bind(values),
                Column::Text(values) => query.bind(values),
            };
        }
        let mut tx = self.tx.lock().await;
        let conn: &mut PgConnection = &mut tx;
        query
            .execute(conn)
            .await
            .map(|done| done.rows_affected())
            .map_err(exec)
    }
}

/// One column of [`BulkWrite::insert_many`]'s rows, as the array it is bound as.
#[derive(Debug, PartialEq)]
enum Column {
    Int4(Vec<Option<i32>>),
    Int8(Vec<Option<i64>>),
    Float8(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
}

impl Column {
    /// `values` (`width` a row) column by column; given back when a value is of a type
    /// not bound as an array here, or not the type of its column's first row.
    fn split(width: usize, values: Vec<Value>) -> Result<Vec<Column>, Vec<Value>> {
        if width == 0 || values.is_empty() || !values.len().is_multiple_of(width) {
            return Err(values);
        }
        let rows = values.len() / width;
        let mut columns: Vec<Column> = Vec::with_capacity(width);
        for value in &values[..width] {
            columns.push(match value {
                Value::Int(_) => Column::Int4(Vec::with_capacity(rows)),
                Value::BigInt(_) => Column::Int8(Vec::with_capacity(rows)),
                Value::Double(_) => Column::Float8(Vec::with_capacity(rows)),
                Value::String(_) => Column::Text(Vec::with_capacity(rows)),
                _ => return Err(values),
            });
        }
        let fits = values
            .iter()
            .zip(columns.iter().cycle())
            .all(|(value, column)| {
                matches!(
                    (value, column),
                    (Value::Int(_), Column::Int4(_))
                        | (Value::BigInt(_), Column::Int8(_))
                        | (Value::Double(_), Column::Float8(_))
                        | (Value::String(_), Column::Text(_))
                )
            });
        if !fits {
            return Err(values);
        }
        for (i, value) in values.into_iter().enumerate() {
            match (value, &mut columns[i % width]) {
                (Value::Int(v), Column::Int4(c)) => c.push(v),
                (Value::BigInt(v), Column::Int8(c)) => c.push(v),
                (Value::Double(v), Column::Float8(c)) => c.push(v),
                (Value::String(v), Column::Text(c)) => c.push(v.map(|s| *s)),
                _ => unreachable!("checked above"),
            }
        }
        Ok(columns)
    }

    fn sql_type(&self) -> &'static str {
        match self {
            Column::Int4(_) => "int4",
            Column::Int8(_) => "int8",
            Column::Float8(_) => "float8",
            Column::Text(_) => "text",
        }
    }
}

/// COPY's data being written, sent [`COPY_CHUNK`] bytes a message.
struct CopyData(Vec<u8>);

impl CopyData {
    fn new() -> Self {
        CopyData(Vec::with_capacity(COPY_CHUNK + (64 << 10)))
    }

    /// The data written so far, once it fills a message.
    fn full(&mut self) -> Option<Vec<u8>> {
        (self.0.len() >= COPY_CHUNK).then(|| std::mem::replace(self, CopyData::new()).0)
    }

    /// Sends the rest and ends the COPY; returns the rows copied.
    async fn finish(self, mut copy: PgCopyIn<&mut PgConnection>) -> Result<u64, DbErr> {
        if !self.0.is_empty() {
            copy.send(self.0).await.map_err(exec)?;
        }
        copy.finish().await.map_err(exec)
    }
}

/// Whether any series of `points` has a point stored in the step range they bring
/// (each series' rows are together, by step): one query for all.
async fn points_held(conn: &mut PgConnection, points: &PointRows) -> Result<bool, DbErr> {
    let (mut ids, mut lows, mut highs) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    for series in points.series_id.chunk_by(|a, b| a == b) {
        let steps = &points.step[start..start + series.len()];
        ids.push(series[0]);
        lows.push(steps[0]);
        highs.push(steps[steps.len() - 1]);
        start += series.len();
    }
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM unnest($1::int8[], $2::int8[], $3::int8[]) AS q(id, lo, hi) \
         WHERE EXISTS (SELECT 1 FROM run_metrics m WHERE m.series_id = q.id AND m.step BETWEEN q.lo AND q.hi))",
    )
    .bind(&ids)
    .bind(&lows)
    .bind(&highs)
    .fetch_one(conn)
    .await
    .map_err(query)
}

/// `points` by `COPY … FROM STDIN`; the rows copied.
async fn copy_points(conn: &mut PgConnection, points: &PointRows) -> Result<u64, DbErr> {
    let mut copy = conn
        .copy_in_raw(
            "COPY run_metrics (series_id, step, value, seq, ts) FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(exec)?;
    let mut data = CopyData::new();
    data.0.extend_from_slice(BINARY_HEADER);
    for i in 0..points.len() {
        point_row(&mut data.0, points, i);
        if let Some(full) = data.full() {
            copy.send(full).await.map_err(exec)?;
        }
    }
    data.0.extend_from_slice(&(-1i16).to_be_bytes());
    data.finish(copy).await
}

/// PostgreSQL's `unique_violation` (SQLSTATE 23505).
fn is_unique_violation(error: &DbErr) -> bool {
    matches!(error, DbErr::Exec(RuntimeErr::SqlxError(e))
        if e.as_database_error().and_then(|db| db.code()).as_deref() == Some("23505"))
}

/// COPY's binary format starts with its signature, 32 bits of flags (none) and the
/// length of a header extension (none); it ends with a tuple of -1 fields.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Point `i` of `points` as a tuple of COPY's binary format: five fields, each its
/// length and its bytes in network order, NaN (`None`) as NULL (length -1). Binary, not
/// text: no number is formatted here and parsed by PostgreSQL (measured: see
/// BENCHMARKS.md), and every f64, the infinities too, arrives bit for bit.
fn point_row(out: &mut Vec<u8>, points: &PointRows, i: usize) {
    let field = |out: &mut Vec<u8>, bytes: [u8; 8]| {
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&bytes);
    };
    out.extend_from_slice(&5i16.to_be_bytes());
    field(out, points.series_id[i].to_be_bytes());
    field(out, points.step[i].to_be_bytes());
    match points.value[i] {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => field(out, v.to_be_bytes()),
    }
    field(out, points.seq[i].to_be_bytes());
    field(out, points.ts[i].to_be_bytes());
}

/// One row of COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_row(out: &mut Vec<u8>, run_id: &str, row: &LineRow) {
    use std::io::Write;
    copy_text(out, run_id);
    let _ = write!(out, "\t{}\t{}\t", row.seq, row.ts);
    copy_text(out, row.level);
    out.push(b'\t');
    copy_text(out, &row.message);
    out.push(b'\t');
    match &row.metadata {
        Some(metadata) => copy_text(out, metadata),
        None => out.extend_from_slice(b"\\N"),
    }
    out.push(b'\n');
}

fn copy_text(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_rows_are_binary_tuples_with_nan_as_null() {
        let points = PointRows {
            series_id: vec![3, 3],
            step: vec![7, 8],
            value: vec![None, Some(f64::NEG_INFINITY)],
            seq: vec![10, 11],
            ts: vec![1_700_000_000_000_000; 2],
        };
        let mut out = Vec::new();
        point_row(&mut out, &points, 0);
        point_row(&mut out, &points, 1);
        let int8 = |v: i64| [&8i32.to_be_bytes()[..], &v.to_be_bytes()[..]].concat();
        let mut expected = Vec::new();
        for (step, value, seq) in [(7, None, 10), (8, Some(f64::NEG_INFINITY), 11)] {
            expected.extend_from_slice(&[0, 5]);
            expected.extend(int8(3));
            expected.extend(int8(step));
            match value {
                None => expected.extend_from_slice(&[0xff; 4]),
                Some(v) => {
                    expected.extend_from_slice(&[0, 0, 0, 8]);
                    expected.extend_from_slice(&f64::to_bits(v).to_be_bytes());
                }
            }
            expected.extend(int8(seq));
            expected.extend(int8(1_700_000_000_000_000));
        }
        assert_eq!(out, expected);
        assert_eq!(
            BINARY_HEADER.len(),
            19,
            "11-byte signature, flags, extension length"
        );
    }

    #[test]
    fn rows_split_into_typed_columns_or_are_given_back_whole() {
        let row = |n: i64, x: Option<f64>| -> Vec<Value> {
            vec![
                n.into(),
                (n as i32).into(),
                x.into(),
                Some(format!("r{n}")).into(),
            ]
        };
        let values: Vec<Value> = [row(1, Some(0.5)), row(2, None)].concat();
        assert_eq!(
            Column::split(4, values).unwrap(),
            vec![
                Column::Int8(vec![Some(1), Some(2)]),
                Column::Int4(vec![Some(1), Some(2)]),
                Column::Float8(vec![Some(0.5), None]),
                Column::Text(vec![Some("r1".into()), Some("r2".into())]),
            ]
        );
        // A column whose type changes from one row to the next, a type not bound as an
        // array, a row cut short: the values come back as they were, for the INSERT.
        let mixed: Vec<Value> = [
            row(1, Some(0.5)),
            vec![1i64.into(), 1i32.into(), 2i64.into(), "x".into()],
        ]
        .concat();
        assert_eq!(Column::split(4, mixed.clone()).unwrap_err(), mixed);
        let unbound = vec![Value::Bool(Some(true)), 1i64.into()];
        assert_eq!(Column::split(2, unbound.clone()).unwrap_err(), unbound);
        let short: Vec<Value> = [row(1, None), vec![2i64.into()]].concat();
        assert_eq!(Column::split(4, short.clone()).unwrap_err(), short);
        let shorter: Vec<Value> = vec![2i64.into()];
        assert_eq!(Column::split(4, shorter.clone()).unwrap_err(), shorter);
        assert_eq!(
            Column::split(4, Vec::new()).unwrap_err(),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn copy_rows_escape_what_the_text_format_would_misread() {
        let mut out = Vec::new();
        let row = LineRow {
            seq: 7,
            ts: 1_700_000_000_000_000,
            level: "info",
            message: "a\ttab, a\nnewline, a \\ backslash, a\r return, ünïcødé".into(),
            metadata: None,
        };
        copy_row(&mut out, "run-1", &row);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "run-1\t7\t1700000000000000\tinfo\ta\\ttab, a\\nnewline, a \\\\ backslash, a\\r return, ünïcødé\t\\N\n"
        );
        let mut out = Vec::new();
        let row = LineRow {
            metadata: Some(r#"{"k":"v\\n"}"#.into()),
            ..row
        };
        copy_row(&mut out, "r", &row);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("\t{\"k\":\"v\\\\\\\\n\"}\n"));
    }
}
