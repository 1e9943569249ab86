//! run_metric_summaries (one row per run and metric, unique by the two: the series' id
//! and its summary), run_metrics (one row per series id and step: a narrow key, the run
//! and the name are not repeated in every point) and run_metric_rollups (the points of
//! aligned blocks of 16, 256, … 2^32 steps pre-aggregated, so a long series is drawn
//! from a few thousand rows; see `athanor_schemas::metric::rollup`); the aggregator keeps
//! the summaries and the blocks current in the transaction that stores the points. A NaN value is stored as NULL:
//! SQLite turns NaN into NULL anyway, so both databases say it the same way.

use sea_orm_migration::prelude::*;

use crate::m0001_initial::without_rowid;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum RunMetrics {
    Table,
    SeriesId,
    Step,
    Value,
    Seq,
    Ts,
}

#[derive(DeriveIden)]
enum RunMetricRollups {
    Table,
    SeriesId,
    Level,
    Block,
    Count,
    Min,
    MinStep,
    Max,
    MaxStep,
    LastStep,
    LastTs,
    LastValue,
    LastSeq,
}

#[derive(DeriveIden)]
enum RunMetricSummaries {
    Table,
    Id,
    RunId,
    Name,
    Count,
    Min,
    Max,
    LastStep,
    LastValue,
    LastSeq,
    UpdatedAt,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RunMetrics::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RunMetrics::SeriesId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetrics::Step).big_integer().not_null())
                    .col(ColumnDef::new(RunMetrics::Value).double().null())
                    .col(ColumnDef::new(RunMetrics::Seq).big_integer().not_null())
                    .col(ColumnDef::new(RunMetrics::Ts).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(RunMetrics::SeriesId)
                            .col(RunMetrics::Step),
                    )
                    .extra(without_rowid(manager))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunMetricRollups::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RunMetricRollups::SeriesId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricRollups::Level).integer().not_null())
                    .col(
                        ColumnDef::new(RunMetricRollups::Block)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricRollups::Count)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricRollups::Min).double().null())
                    .col(
                        ColumnDef::new(RunMetricRollups::MinStep)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricRollups::Max).double().null())
                    .col(
                        ColumnDef::new(RunMetricRollups::MaxStep)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricRollups::LastStep)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricRollups::LastTs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricRollups::LastValue).double().null())
                    .col(
                        ColumnDef::new(RunMetricRollups::LastSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(RunMetricRollups::SeriesId)
                            .col(RunMetricRollups::Level)
                            .col(RunMetricRollups::Block),
                    )
                    .extra(without_rowid(manager))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunMetricSummaries::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RunMetricSummaries::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(RunMetricSummaries::RunId)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricSummaries::Name).string().not_null())
                    .col(
                        ColumnDef::new(RunMetricSummaries::Count)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunMetricSummaries::Min).double().null())
                    .col(ColumnDef::new(RunMetricSummaries::Max).double().null())
                    .col(
                        ColumnDef::new(RunMetricSummaries::LastStep)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricSummaries::LastValue)
                            .double()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricSummaries::LastSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunMetricSummaries::UpdatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("run_metric_summaries_run_name")
                    .table(RunMetricSummaries::Table)
                    .unique()
                    .col(RunMetricSummaries::RunId)
                    .col(RunMetricSummaries::Name)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            RunMetricSummaries::Table.into_iden(),
            RunMetricRollups::Table.into_iden(),
            RunMetrics::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
