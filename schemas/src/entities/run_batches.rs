//! Batches stored: the idempotency key of the aggregator. A batch seen again is
//! absorbed by the primary key (run_id, batch_seq).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "run_batches")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub run_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub batch_seq: i64,
    /// Sequence of the message in `ATHANOR_RUNS`.
    pub stream_seq: i64,
    pub lines: i64,
    pub stored_at: i64,
    /// Set for a batch the aggregator dead-lettered: why. A known gap — its lines are
    /// not stored, and the run's watermark moves past it.
    #[sea_orm(column_type = "Text", nullable)]
    pub rejected: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
