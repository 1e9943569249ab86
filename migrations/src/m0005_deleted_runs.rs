//! Deleted runs leave a tombstone: their batches may still be in `ATHANOR_RUNS` (until
//! its age limit) and be delivered again, and the aggregator must not bring the run
//! back from them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum DeletedRuns {
    Table,
    RunId,
    DeletedAt,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DeletedRuns::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(DeletedRuns::RunId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(DeletedRuns::DeletedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(DeletedRuns::Table).to_owned())
            .await
    }
}
