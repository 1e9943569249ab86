//! SQLite only: checkpoints on a connection of their own.
//!
//! In WAL mode every commit appends pages to the write-ahead log, and SQLite's default
//! is for the committing connection to copy the log back into the database file once
//! it passes 1 000 pages — on the writer's own thread, between two transactions. At a
//! few hundred thousand lines a second that copy took a sixth of the writer's time.
//! Here a second connection (its own thread in sqlx) runs
//! `PRAGMA wal_checkpoint(PASSIVE)` every tick instead; a passive checkpoint never
//! blocks the writer, and the writer starts the log over once everything in it has
//! been copied. The writer's automatic checkpoint stays on as a backstop, at 4 096
//! pages (`db::connect`), for a database written without an aggregator running.

use std::time::Duration;

use sea_orm::sqlx::sqlite::SqliteConnection;
use sea_orm::sqlx::Connection;
use sea_orm::DatabaseConnection;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const INTERVAL: Duration = Duration::from_millis(25);

/// Checkpoints `db` (when it is SQLite) until `shutdown`.
pub(crate) async fn run(db: DatabaseConnection, shutdown: CancellationToken) {
    let DatabaseConnection::SqlxSqlitePoolConnection(_) = &db else {
        return;
    };
    let options = db.get_sqlite_connection_pool().connect_options();
    let mut connection: Option<SqliteConnection> = None;
    // Said once per spell of failures, not every tick.
    let mut failing = false;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if connection.is_none() {
            match SqliteConnection::connect_with(&options).await {
                Ok(c) => connection = Some(c),
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(%error, "checkpointer: cannot open the database; the writer checkpoints past the backstop meanwhile");
                    }
                    continue;
                }
            }
        }
        let c = connection.as_mut().expect("opened above");
        if let Err(error) = sea_orm::sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *c)
            .await
        {
            if !std::mem::replace(&mut failing, true) {
                warn!(%error, "checkpoint failed; reconnecting (the writer checkpoints past the backstop meanwhile)");
            }
            connection = None;
        } else if std::mem::replace(&mut failing, false) {
            info!("checkpointer: checkpointing again");
        }
    }
    if let Some(c) = connection {
        let _ = c.close().await;
    }
}
