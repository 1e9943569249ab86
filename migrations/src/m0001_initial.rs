//! instances, runs, run_batches, run_logs, run_results.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Instances {
    Table,
    Id,
    Name,
    Experiment,
    Config,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    Experiment,
    InstanceId,
    Config,
    Status,
    Error,
    WorkerId,
    CreatedAt,
    StartedAt,
    FinishedAt,
    UpdatedAt,
    ProgressCurrent,
    ProgressTotal,
    ProgressMessage,
    ProgressAt,
    Lines,
    Results,
    Batches,
    LastBatchSeq,
    LastStreamSeq,
    FinalBatches,
    FinalStatus,
    FinalError,
    FinalAt,
}

#[derive(DeriveIden)]
enum RunBatches {
    Table,
    RunId,
    BatchSeq,
    StreamSeq,
    Lines,
    StoredAt,
}

#[derive(DeriveIden)]
enum RunLogs {
    Table,
    RunId,
    Seq,
    Ts,
    Level,
    Message,
    Metadata,
}

#[derive(DeriveIden)]
enum RunResults {
    Table,
    RunId,
    Key,
    Value,
    Seq,
    Ts,
}

/// SQLite keeps a table with a composite primary key as a rowid table plus an index,
/// two B-trees per row; `WITHOUT ROWID` stores the rows in the key's B-tree itself.
/// For `run_logs`, the table the aggregator writes hundreds of thousands of rows a
/// second into, that is one B-tree insert per line instead of two.
pub(crate) fn without_rowid(manager: &SchemaManager) -> String {
    match manager.get_database_backend() {
        sea_orm_migration::sea_orm::DatabaseBackend::Sqlite => "WITHOUT ROWID".into(),
        _ => String::new(),
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Instances::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Instances::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Instances::Name).string().not_null())
                    .col(ColumnDef::new(Instances::Experiment).string().not_null())
                    .col(ColumnDef::new(Instances::Config).text().not_null())
                    .col(
                        ColumnDef::new(Instances::CreatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Instances::UpdatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Runs::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Runs::Id).string().not_null().primary_key())
                    .col(ColumnDef::new(Runs::Experiment).string().not_null())
                    .col(ColumnDef::new(Runs::InstanceId).string().null())
                    .col(ColumnDef::new(Runs::Config).text().not_null())
                    .col(ColumnDef::new(Runs::Status).string().not_null())
                    .col(ColumnDef::new(Runs::Error).text().null())
                    .col(ColumnDef::new(Runs::WorkerId).string().null())
                    .col(ColumnDef::new(Runs::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Runs::StartedAt).big_integer().null())
                    .col(ColumnDef::new(Runs::FinishedAt).big_integer().null())
                    .col(ColumnDef::new(Runs::UpdatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Runs::ProgressCurrent).big_integer().null())
                    .col(ColumnDef::new(Runs::ProgressTotal).big_integer().null())
                    .col(ColumnDef::new(Runs::ProgressMessage).text().null())
                    .col(ColumnDef::new(Runs::ProgressAt).big_integer().null())
                    .col(
                        ColumnDef::new(Runs::Lines)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(Runs::Results)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(Runs::Batches)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Runs::LastBatchSeq).big_integer().null())
                    .col(ColumnDef::new(Runs::LastStreamSeq).big_integer().null())
                    .col(ColumnDef::new(Runs::FinalBatches).big_integer().null())
                    .col(ColumnDef::new(Runs::FinalStatus).string().null())
                    .col(ColumnDef::new(Runs::FinalError).text().null())
                    .col(ColumnDef::new(Runs::FinalAt).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("runs_status_created")
                    .table(Runs::Table)
                    .col(Runs::Status)
                    .col(Runs::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("runs_experiment_created")
                    .table(Runs::Table)
                    .col(Runs::Experiment)
                    .col(Runs::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunBatches::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RunBatches::RunId).string().not_null())
                    .col(
                        ColumnDef::new(RunBatches::BatchSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RunBatches::StreamSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RunBatches::Lines).big_integer().not_null())
                    .col(
                        ColumnDef::new(RunBatches::StoredAt)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(RunBatches::RunId)
                            .col(RunBatches::BatchSeq),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunLogs::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RunLogs::RunId).string().not_null())
                    .col(ColumnDef::new(RunLogs::Seq).big_integer().not_null())
                    .col(ColumnDef::new(RunLogs::Ts).big_integer().not_null())
                    .col(ColumnDef::new(RunLogs::Level).string().not_null())
                    .col(ColumnDef::new(RunLogs::Message).text().not_null())
                    .col(ColumnDef::new(RunLogs::Metadata).text().null())
                    .primary_key(Index::create().col(RunLogs::RunId).col(RunLogs::Seq))
                    .extra(without_rowid(manager))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunResults::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RunResults::RunId).string().not_null())
                    .col(ColumnDef::new(RunResults::Key).string().not_null())
                    .col(ColumnDef::new(RunResults::Value).text().not_null())
                    .col(ColumnDef::new(RunResults::Seq).big_integer().not_null())
                    .col(ColumnDef::new(RunResults::Ts).big_integer().not_null())
                    .primary_key(Index::create().col(RunResults::RunId).col(RunResults::Key))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            RunResults::Table.into_iden(),
            RunLogs::Table.into_iden(),
            RunBatches::Table.into_iden(),
            Runs::Table.into_iden(),
            Instances::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
