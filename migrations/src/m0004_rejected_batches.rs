//! A batch the aggregator had to dead-letter becomes a known gap: `run_batches.rejected`
//! holds why (the run's watermark moves past it, so the run still ends), and
//! `runs.warning` tells readers which batches of the run were rejected.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    Warning,
}

#[derive(DeriveIden)]
enum RunBatches {
    Table,
    Rejected,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .add_column(ColumnDef::new(Runs::Warning).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunBatches::Table)
                    .add_column(ColumnDef::new(RunBatches::Rejected).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RunBatches::Table)
                    .drop_column(RunBatches::Rejected)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .drop_column(Runs::Warning)
                    .to_owned(),
            )
            .await
    }
}
