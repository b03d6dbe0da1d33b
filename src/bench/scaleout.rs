//! Scenario 4, scale-out: the saturation phases of ingest and workflow against one worker
//! process, then against two sharing the consumer and the Redis keys.

use super::ceiling;
use super::deployment::Deployment;
use super::ingest::Ingest;
use super::report::{ScaleoutReport, ScaleoutStep};
use super::workflow::Workflows;
use super::{BenchError, Context};

/// Worker processes of each step.
const STEPS: [usize; 2] = [1, 2];

/// Runs both steps; needs `--spawn-worker`.
pub(crate) async fn run(context: &Context) -> Result<ScaleoutReport, BenchError> {
    let ceiling = ceiling::measure(context).await?;
    let mut steps = Vec::new();
    for workers in STEPS {
        let label = format!("scaleout-{workers}");
        let deployment = Deployment::start(context, workers, &label, &[]).await?;
        let result = step(context, &deployment, workers, &ceiling).await;
        deployment.stop().await;
        steps.push(result?);
    }
    let speedup = |figure: fn(&ScaleoutStep) -> f64| {
        let one = figure(steps.first()?);
        let two = figure(steps.get(1)?);
        (one > 0.0).then(|| two / one)
    };
    Ok(ScaleoutReport {
        ingest_speedup: speedup(|s| s.ingest.applied_per_second),
        workflow_speedup: speedup(|s| s.workflow.tasks_per_second),
        ceiling,
        steps,
    })
}

async fn step(
    context: &Context,
    deployment: &Deployment,
    workers: usize,
    ceiling: &super::report::Ceiling,
) -> Result<ScaleoutStep, BenchError> {
    let mut ingest = Ingest::prepare(context, &format!("so{workers}")).await?;
    let ingest_phase = ingest.saturation(context, deployment, ceiling).await;
    ingest.close().await;
    let ingest_phase = ingest_phase?;

    let workflows = Workflows::prepare(context, &format!("sw{workers}")).await?;
    let workflow_phase = workflows
        .saturation(context, deployment, Some(ceiling))
        .await;
    workflows.close().await;
    deployment.wait_quiet(context).await?;
    Ok(ScaleoutStep {
        workers: deployment.workers,
        ingest: ingest_phase,
        workflow: workflow_phase?,
    })
}
