//! Metric points, one row per (series, step): the record with the highest `seq`
//! wins. A NaN value is NULL.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "run_metrics")]
pub struct Model {
    /// `run_metric_summaries.id` of the run's series.
    #[sea_orm(primary_key, auto_increment = false)]
    pub series_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub step: i64,
    pub value: Option<f64>,
    pub seq: i64,
    pub ts: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
