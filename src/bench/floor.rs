//! Scenario 6, floor: the ingest saturation phase against three processes in turn, each doing
//! more of opscore's work: the relay (the intake and the bus, nothing applied), the worker with
//! the in-memory repository, and the worker with Redis. Measured back to back on the same
//! servers, the steps show how much of the machine the bus itself takes, what storage adds,
//! and how close opscore comes to the floor under it.

use super::ceiling;
use super::deployment::Deployment;
use super::ingest::Ingest;
use super::report::{Ceiling, FloorReport, IngestPhase};
use super::{BenchError, Context};

/// Runs the three steps; needs `--spawn-worker`.
pub(crate) async fn run(context: &Context) -> Result<FloorReport, BenchError> {
    let ceiling = ceiling::measure(context).await?;
    let relay = Deployment::relay(context, "floor-relay").await?;
    let relay = step(context, relay, "fr", &ceiling).await?;
    let memory = [("OPSCORE__STORAGE__BACKEND", "memory".to_owned())];
    let memory = Deployment::start(context, 1, "floor-memory", &memory).await?;
    let memory = step(context, memory, "fm", &ceiling).await?;
    let redis = Deployment::start(context, 1, "floor-redis", &[]).await?;
    let redis = step(context, redis, "fd", &ceiling).await?;
    let ratio = |phase: &IngestPhase| {
        (relay.applied_per_second > 0.0)
            .then(|| phase.applied_per_second / relay.applied_per_second)
    };
    Ok(FloorReport {
        memory_over_relay: ratio(&memory),
        redis_over_relay: ratio(&redis),
        ceiling,
        relay,
        memory,
        redis,
    })
}

/// One saturation phase against `deployment`, which is stopped whatever happens.
async fn step(
    context: &Context,
    deployment: Deployment,
    label: &str,
    ceiling: &Ceiling,
) -> Result<IngestPhase, BenchError> {
    let result = async {
        let mut ingest = Ingest::prepare(context, label).await?;
        let phase = ingest.saturation(context, &deployment, ceiling).await;
        ingest.close().await;
        deployment.wait_quiet(context).await?;
        phase
    }
    .await;
    deployment.stop().await;
    result
}
