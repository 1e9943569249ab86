//! One row per (run, metric): the series' id, its point count, extremes (NULL when
//! every value is NaN), the point at the highest step, and when a point last arrived.
//! Kept current by the aggregator in the transaction that stores the points.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "run_metric_summaries")]
pub struct Model {
    /// The series' id: the key of its points and rollup blocks.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Unique with `name`.
    pub run_id: String,
    pub name: String,
    pub count: i64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last_step: i64,
    pub last_value: Option<f64>,
    pub last_seq: i64,
    /// µs since the epoch of the newest point emitted.
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
