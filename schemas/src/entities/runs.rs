//! One execution of an experiment: status, timestamps, latest progress, counters, and
//! how far its batches are stored.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "runs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub experiment: String,
    pub instance_id: Option<String>,
    /// JSON object: the validated config.
    #[sea_orm(column_type = "Text")]
    pub config: String,
    /// `pending`, `running`, `completed`, `failed`, `cancelled`, `lost`.
    pub status: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// When a batch of this run was last stored.
    pub updated_at: i64,
    pub progress_current: Option<i64>,
    pub progress_total: Option<i64>,
    #[sea_orm(column_type = "Text", nullable)]
    pub progress_message: Option<String>,
    pub progress_at: Option<i64>,
    /// Log lines stored.
    pub lines: i64,
    /// Result records received (a key recorded twice counts twice).
    pub results: i64,
    /// Batches stored.
    pub batches: i64,
    /// Highest `batch_seq` such that every batch up to it is stored.
    pub last_batch_seq: Option<i64>,
    /// The JetStream sequence of that batch: where a live follower resumes.
    pub last_stream_seq: Option<i64>,
    /// From the run's final batch: its number of batches, state and error. The run
    /// becomes terminal once all `final_batches` are stored.
    pub final_batches: Option<i64>,
    pub final_status: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub final_error: Option<String>,
    /// When the worker ended the run (its terminal status time).
    pub final_at: Option<i64>,
    /// Which batches of the run were rejected (dead-lettered) and why; none: null.
    #[sea_orm(column_type = "Text", nullable)]
    pub warning: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
