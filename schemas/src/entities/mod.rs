//! The database model (sea-orm entities), shared by the aggregator (writes run output),
//! the gateway (control plane, reads) and the migrations.
//!
//! Times are microseconds since the Unix epoch; JSON values are stored as text.

pub mod instances;
pub mod run_batches;
pub mod run_logs;
pub mod run_metric_summaries;
pub mod run_metrics;
pub mod run_results;
pub mod runs;

/// Deletes run `run_id`'s rows from every table, in `txn` (the caller's transaction),
/// and leaves its tombstone in `deleted_runs`, so that its batches, delivered again from
/// `ATHANOR_RUNS`, do not bring it back (the aggregator drops batches of tombstoned
/// runs). Returns what was removed.
pub async fn delete_run<C: sea_orm::ConnectionTrait>(
    txn: &C,
    run_id: &str,
    now: i64,
) -> Result<crate::api::Removed, sea_orm::DbErr> {
    use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait};
    let series = run_metric_summaries::Entity::find()
        .select_only()
        .column(run_metric_summaries::Column::Id)
        .filter(run_metric_summaries::Column::RunId.eq(run_id))
        .into_query();
    // The rollups of the run's series (a table without an entity: the aggregator and
    // the gateway reach it with SQL of their own).
    let rollups = Query::delete()
        .from_table(Alias::new("run_metric_rollups"))
        .and_where(Expr::col(Alias::new("series_id")).in_subquery(series.clone()))
        .to_owned();
    txn.execute(txn.get_database_backend().build(&rollups))
        .await?;
    let removed = crate::api::Removed {
        metric_points: run_metrics::Entity::delete_many()
            .filter(run_metrics::Column::SeriesId.in_subquery(series))
            .exec(txn)
            .await?
            .rows_affected,
        metric_series: run_metric_summaries::Entity::delete_many()
            .filter(run_metric_summaries::Column::RunId.eq(run_id))
            .exec(txn)
            .await?
            .rows_affected,
        lines: run_logs::Entity::delete_many()
            .filter(run_logs::Column::RunId.eq(run_id))
            .exec(txn)
            .await?
            .rows_affected,
        results: run_results::Entity::delete_many()
            .filter(run_results::Column::RunId.eq(run_id))
            .exec(txn)
            .await?
            .rows_affected,
        batches: run_batches::Entity::delete_many()
            .filter(run_batches::Column::RunId.eq(run_id))
            .exec(txn)
            .await?
            .rows_affected,
    };
    runs::Entity::delete_by_id(run_id.to_string())
        .exec(txn)
        .await?;
    let tombstone = Query::insert()
        .into_table(Alias::new("deleted_runs"))
        .columns([Alias::new("run_id"), Alias::new("deleted_at")])
        .values_panic([run_id.into(), now.into()])
        .on_conflict(
            OnConflict::column(Alias::new("run_id"))
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    txn.execute(txn.get_database_backend().build(&tombstone))
        .await?;
    Ok(removed)
}
