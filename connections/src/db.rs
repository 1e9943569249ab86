//! The `[database]` config section and how every component opens the database:
//! SQLite (default, tuned for this workload) or PostgreSQL, by URL.

use std::str::FromStr;
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, SqlxPostgresConnector,
    SqlxSqliteConnector, Statement, Value,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`. `athanor up` uses `<data-dir>/athanor.db` when unset.
    pub url: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// SQLite `synchronous`: `full` (default: every commit is fsynced before the
    /// aggregator acknowledges its batches, so it survives a power loss) or `normal`
    /// (in WAL mode a commit survives a crash of the process, but the commits since the
    /// write-ahead log was last synced — the aggregator's checkpointer syncs it every
    /// 25 ms — can roll back on power loss or an OS crash, after their batches were
    /// acknowledged).
    pub sqlite_synchronous: SqliteSync,
    /// How long a SQLite writer waits for a lock before failing (and retrying).
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// Finished runs older than this (since they finished) are deleted by the
    /// aggregator in the background, in bounded chunks. Unset (the default): kept.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    Normal,
    Full,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            max_connections: 8,
            sqlite_synchronous: SqliteSync::Full,
            busy_timeout: Duration::from_secs(5),
            retention: None,
        }
    }
}

impl DatabaseConfig {
    pub const DEFAULT_URL: &'static str = "sqlite://./data/athanor.db";

    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or(Self::DEFAULT_URL)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database {url}: {source}")]
    Open {
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create the database's folder {dir}: {source}")]
    CreateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database {url}: the URL must start with sqlite:// or postgres://")]
    UnknownScheme { url: String },
}

/// Opens a pool. SQLite: WAL journal, the configured `synchronous`, a busy timeout,
/// foreign keys on, the file created when missing, with 16 KiB pages.
pub async fn connect(config: &DatabaseConfig) -> Result<DatabaseConnection, DbError> {
    let url = config.url();
    let open = |source: Box<dyn std::error::Error + Send + Sync>| DbError::Open {
        url: url.to_string(),
        source,
    };
    if url.starts_with("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map_err(|e| open(e.into()))?
            .create_if_missing(true)
            // For a new file (an existing one keeps its page size). Lines are appended
            // at the end of `run_logs`' B-tree, and every commit writes the pages it
            // touched to the log, one write per page: with 16 KiB pages instead of the
            // default 4 KiB, a quarter of the writes and page splits for the same lines.
            .page_size(16384)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(match config.sqlite_synchronous {
                SqliteSync::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
                SqliteSync::Full => sqlx::sqlite::SqliteSynchronous::Full,
            })
            .busy_timeout(config.busy_timeout)
            .foreign_keys(true)
            // A committing connection copies the log back into the database file once
            // it passes this many pages (default 1 000). The aggregator's checkpointer
            // does that on a connection of its own as it goes; this is the backstop
            // (64 MiB of 16 KiB pages), high enough to stay off the writer's path.
            .pragma("wal_autocheckpoint", "4096");
        if let Some(dir) = options
            .get_filename()
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .after_release(|conn, _| Box::pin(reusable::<sqlx::Sqlite>(conn)))
            .connect_with(options)
            .await
            .map_err(|e| open(e.into()))?;
        Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let options =
            sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| open(e.into()))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .after_release(|conn, _| Box::pin(reusable::<sqlx::Postgres>(conn)))
            .connect_with(options)
            .await
            .map_err(|e| open(e.into()))?;
        Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
    } else {
        Err(DbError::UnknownScheme { url: url.into() })
    }
}

/// Whether a connection given back to the pool may be handed out again: only when
/// it holds no transaction. A COMMIT that fails (SQLite: "database or disk is full")
/// can leave the driver counting a transaction the database already rolled back; the
/// connection's next transaction would then begin with a SAVEPOINT, and its "commit"
/// would only release that savepoint while the caller acknowledged what it wrote —
/// lost for good. Such a connection is closed, never reused. The ping first runs
/// the rollback a dropped transaction queued, so the count read after it is current.
async fn reusable<DB: sqlx::Database>(conn: &mut DB::Connection) -> Result<bool, sqlx::Error> {
    use sqlx::{Connection, TransactionManager};
    conn.ping().await?;
    let depth = DB::TransactionManager::get_transaction_depth(conn);
    if depth != 0 {
        tracing::warn!(
            depth,
            "a database connection still counts a transaction after its end (a failed COMMIT or ROLLBACK): closed, not reused"
        );
    }
    Ok(depth == 0)
}

/// SQLite has one writer at a time, and a connection that finds the database locked
/// polls for it (SQLite's busy handler sleeps 1 ms, 2 ms, 5 ms, … up to 100 ms between
/// tries). Against an aggregator committing transactions back to back under full load,
/// the lock is free only for the moment between two of them, and a poller can miss
/// every such moment until its busy timeout runs out ("database is locked"). So the
/// writers of one process take turns here first: a first-come-first-served queue per
/// database file. The gateway's small writes then wait for at most the transaction
/// being written. (Separate processes writing one SQLite file still meet only at
/// SQLite's lock: deploy those on PostgreSQL.) PostgreSQL locks rows, not the whole
/// database: no turn is taken.
pub async fn write_turn(db: &DatabaseConnection) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Arc, LazyLock, Mutex};
    type Turns = Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>;
    static TURNS: LazyLock<Turns> = LazyLock::new(Default::default);
    let DatabaseConnection::SqlxSqlitePoolConnection(_) = db else {
        return None;
    };
    let file = db
        .get_sqlite_connection_pool()
        .connect_options()
        .get_filename()
        .to_path_buf();
    let turn = TURNS
        .lock()
        .expect("no panic while holding the map")
        .entry(file)
        .or_default()
        .clone();
    Some(turn.lock_owned().await)
}

/// `s` as the database stores it: PostgreSQL text cannot hold NUL characters, so they
/// are stored as U+2400 (␀). The aggregator writes text through this, and the gateway
/// looks text up through it.
pub fn stored_text(backend: DatabaseBackend, s: String) -> String {
    if backend == DatabaseBackend::Postgres && s.contains('\0') {
        s.replace('\0', "\u{2400}")
    } else {
        s
    }
}

/// A statement written with `?` placeholders, numbered `$1, $2, …` for PostgreSQL.
/// (The SQL Athanor writes by hand is otherwise the same on both backends.)
pub fn stmt(backend: DatabaseBackend, sql: &str, values: Vec<Value>) -> Statement {
    if backend == DatabaseBackend::Postgres {
        let mut out = String::with_capacity(sql.len() + values.len() * 3);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        Statement::from_sql_and_values(backend, out, values)
    } else {
        Statement::from_sql_and_values(backend, sql, values)
    }
}

/// Whether the database answers (for readiness checks and tests).
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.execute_unprepared("SELECT 1").await.is_ok()
}
