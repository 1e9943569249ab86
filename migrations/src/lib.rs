//! The database schema of Athanor as sea-orm migrations, the same on SQLite and
//! PostgreSQL. `athanor migrate` applies them, and so does `athanor up` at start.

pub use sea_orm_migration::prelude::*;

mod m0001_initial;
mod m0002_metrics;
mod m0003_instance_runs;
mod m0004_rejected_batches;
mod m0005_deleted_runs;

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_metrics::Migration),
            Box::new(m0003_instance_runs::Migration),
            Box::new(m0004_rejected_batches::Migration),
            Box::new(m0005_deleted_runs::Migration),
        ]
    }
}
