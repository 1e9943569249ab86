//! What an experiment author implements.

use athanor_schemas::ConfigSchema;

use crate::context::RunContext;

/// The error an experiment returns; anything that converts (`?` on most errors,
/// `Err("message".into())`) works.
pub type RunError = Box<dyn std::error::Error + Send + Sync>;

/// An experiment: a named, described piece of code with a typed config.
///
/// `run` is called on a thread of its own, so it may block, compute and call the
/// context from as many threads as it likes. It ends the run by returning `Ok`
/// (`completed`) or `Err` (`failed` with the error's message), or by calling
/// [`RunContext::complete`] / [`RunContext::fail`] first. A panic fails the run with
/// the panic message; the worker carries on.
pub trait Experiment: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// The config fields; a run's config is validated against it before the run starts.
    fn config_schema(&self) -> ConfigSchema;
    fn run(&self, ctx: &RunContext) -> Result<(), RunError>;
}
