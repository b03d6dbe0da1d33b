//! Scenario 3, registry scale: register many agents, then measure the worker's memory,
//! `agent.list` with and without a capability filter, and dispatch with the large registry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::info;

use super::agents::{AgentWatch, Pool};
use super::deployment::Deployment;
use super::probe;
use super::report::{RegistryReport, RegistrySize};
use super::stats::{self, Percentiles};
use super::workflow::Workflows;
use super::{BenchError, Context};
use crate::api::ApiClient;

/// Capabilities the registered agents are spread over; the filtered listing asks for one.
const CAPABILITIES: usize = 10;

/// Runs every size of `--registry-agents`.
pub(crate) async fn run(context: &Context) -> Result<RegistryReport, BenchError> {
    let mut sizes = Vec::new();
    for (n, agents) in context.options.registry_agents.iter().enumerate() {
        sizes.push(size(context, n, *agents).await?);
    }
    Ok(RegistryReport { sizes })
}

async fn size(context: &Context, n: usize, agents: usize) -> Result<RegistrySize, BenchError> {
    let options = &context.options;
    // Silent registered agents would all turn offline after the default 30 s liveness
    // timeout, mid-measurement; that sweep is a different load from the one measured here.
    let extra = [("OPSCORE__AGENTS__LIVENESS_TIMEOUT_SECS", "3600".to_owned())];
    let label = format!("registry-{agents}");
    let deployment = Deployment::start(context, options.workers, &label, &extra).await?;
    let result = async {
        let pids = deployment.pids();
        let rss = |pids: &[u32]| {
            let total: Vec<u64> = pids.iter().filter_map(|pid| probe::rss_kib(*pid)).collect();
            (!total.is_empty()).then(|| total.iter().sum::<u64>() as f64 / 1024.0)
        };
        let rss_start_mib = rss(&pids);

        let prefix = format!("b{}-r{n}-", context.run_id);
        let watch =
            AgentWatch::start(&context.nats_url, &context.run_id, &prefix, context.clock).await?;
        let mut pool =
            Pool::connect(&context.nats_url, options.connections, &prefix, agents).await?;
        let run = context.run_id.clone();
        let started = context.clock.now_ns();
        let tally = pool
            .register(
                Arc::new(move |i| vec![format!("bench-reg-{run}-{}", i % CAPABILITIES)]),
                options.window,
                context.deadline(options.max_phase_secs),
                context.clock,
            )
            .await;
        let timeout = Duration::from_secs(options.drain_secs.max(agents as u64 / 1000));
        let registered_at = watch.wait_registered(tally.acked, timeout).await;
        pool.close().await;
        let registered = watch.registered();
        watch.stop();
        let done = registered_at.map_err(|seen| BenchError::Timeout {
            what: format!("registration of {agents} agents ({seen} seen)"),
            seconds: timeout.as_secs(),
        })?;
        let span = done.saturating_sub(started);
        info!(agents, seconds = stats::seconds(span), "registry filled");
        let rss_registered_mib = rss(&pids);

        let api = ApiClient::new(context.control.clone());
        let (list_all, all_page) = list(&api, json!({"limit": 100}), options.list_calls).await?;
        let capability = format!("bench-reg-{}-0", context.run_id);
        let filtered = json!({"capability": capability, "limit": 100});
        let (list_capability, capability_page) = list(&api, filtered, options.list_calls).await?;

        let workflows = Workflows::prepare(context, &format!("rw{n}")).await?;
        let dispatch = workflows
            .offered(context, &deployment, None, options.registry_dispatch_secs)
            .await;
        workflows.close().await;
        deployment.wait_quiet(context).await?;
        let hwm: Vec<u64> = pids
            .iter()
            .filter_map(|pid| probe::peak_rss_kib(*pid))
            .collect();
        Ok(RegistrySize {
            agents,
            registered,
            register_seconds: stats::seconds(span),
            registered_per_second: stats::per_second(registered, span),
            rss_start_mib,
            rss_registered_mib,
            rss_hwm_mib: (!hwm.is_empty()).then(|| hwm.iter().sum::<u64>() as f64 / 1024.0),
            rss_source: if pids.is_empty() {
                "external worker: not read".to_owned()
            } else {
                "VmRSS and VmHWM of the spawned worker(s), summed".to_owned()
            },
            list_all,
            list_capability,
            list_page_sizes: (all_page, capability_page),
            dispatch: dispatch?,
        })
    }
    .await;
    deployment.stop().await;
    result
}

/// Calls `agent.list` with `request` `calls` times in a row; returns the latencies and the
/// size of the page.
async fn list(
    api: &ApiClient,
    request: serde_json::Value,
    calls: usize,
) -> Result<(Option<Percentiles>, usize), BenchError> {
    let mut latencies = Vec::with_capacity(calls);
    let mut page = 0;
    for _ in 0..calls {
        let started = Instant::now();
        let reply = api
            .call("agent", "list", &request)
            .await
            .map_err(|e| BenchError::api("agent.list", e))?;
        latencies.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        page = reply["agents"].as_array().map_or(0, Vec::len);
    }
    Ok((Percentiles::from_nanos(latencies), page))
}
