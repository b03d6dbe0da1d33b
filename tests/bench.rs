//! The benchmark harness runs every scenario end to end with tiny counts, against servers and
//! a worker it starts itself, and reports figures that add up.

use clap::Parser;
use opscore::bench::report::{IngestPhase, ScenarioReport, WorkflowPhase};
use opscore::bench::stats::Percentiles;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    options: opscore::bench::Options,
}

fn assert_ordered(what: &str, p: Option<&Percentiles>, samples: u64) {
    let p = p.unwrap_or_else(|| panic!("{what}: no percentiles"));
    assert_eq!(p.samples as u64, samples, "{what}: one sample per event");
    assert!(
        0.0 < p.p50_ms && p.p50_ms <= p.p99_ms && p.p99_ms <= p.p999_ms && p.p999_ms <= p.max_ms,
        "{what}: percentiles out of order: {p:?}"
    );
}

fn assert_ingest(what: &str, phase: &IngestPhase) {
    assert!(phase.published > 0, "{what}: something was published");
    assert_eq!(phase.publish_failed, 0, "{what}");
    assert_eq!(phase.monitor_dropped, 0, "{what}");
    assert_eq!(
        phase.applied, phase.published,
        "{what}: every event applied"
    );
    assert!(
        phase.applied_per_second > 0.0 && phase.ceiling_ratio > 0.0,
        "{what}"
    );
    assert_ordered(what, phase.latency.as_ref(), phase.applied);
}

fn assert_workflow(what: &str, phase: &WorkflowPhase) {
    assert!(
        phase.sessions_triggered > 0,
        "{what}: sessions were triggered"
    );
    assert_eq!(phase.trigger_failed, 0, "{what}");
    assert_eq!(
        phase.sessions_completed, phase.sessions_triggered,
        "{what}: every session completed"
    );
    assert_eq!(
        (phase.sessions_failed, phase.sessions_unfinished),
        (0, 0),
        "{what}"
    );
    // Sessions alternate a 3-task chain and a 5-task fan-out/fan-in.
    let chains = phase.sessions_triggered.div_ceil(2);
    let fans = phase.sessions_triggered / 2;
    assert_eq!(phase.tasks_completed, 3 * chains + 5 * fans, "{what}");
    assert!(phase.tasks_per_second > 0.0, "{what}");
    assert_ordered(what, phase.dispatch.as_ref(), phase.tasks_completed);
    assert_ordered(
        what,
        phase.session_duration.as_ref(),
        phase.sessions_completed,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_its_figures_add_up() {
    let cli = Cli::parse_from([
        "opscore-bench",
        "--start-servers",
        "--spawn-worker",
        env!("CARGO_BIN_EXE_opscore"),
        "--scenario",
        "all",
        "--ceiling-secs",
        "1",
        "--connections",
        "2",
        "--window",
        "32",
        "--agents",
        "20",
        "--events",
        "400",
        "--backlog",
        "100",
        "--rate",
        "200",
        "--duration-secs",
        "2",
        "--workflow-agents",
        "4",
        "--sessions",
        "20",
        "--concurrency",
        "5",
        "--task-rate",
        "40",
        "--registry-agents",
        "300",
        "--list-calls",
        "5",
        "--registry-dispatch-secs",
        "1",
        "--bridge-concurrency",
        "1,4",
        "--bridge-requests",
        "60",
        "--relay-binary",
        env!("CARGO_BIN_EXE_opscore-bench"),
    ]);
    let report = opscore::bench::run(cli.options)
        .await
        .expect("the run completes");
    assert!(report.machine.nproc >= 1);
    assert_eq!(report.scenarios.len(), 6, "{report}");

    for scenario in &report.scenarios {
        match scenario {
            ScenarioReport::Ingest(ingest) => {
                assert!(ingest.ceiling.per_second > 0.0);
                assert!(ingest.ceiling.messages > 0 && ingest.ceiling.failed == 0);
                assert_ingest("ingest saturation", &ingest.saturation);
                assert_ingest("ingest offered", &ingest.offered);
                assert_eq!(ingest.offered.published, 400, "2 s at 200/s");
            }
            ScenarioReport::Workflow(workflow) => {
                assert_workflow("workflow saturation", &workflow.saturation);
                assert_eq!(workflow.saturation.sessions_triggered, 20);
                assert_workflow("workflow offered", &workflow.offered);
            }
            ScenarioReport::Registry(registry) => {
                let size = &registry.sizes[0];
                assert_eq!(size.registered, 300);
                assert_eq!(size.list_page_sizes, (100, 30), "30 agents per capability");
                assert!(size.rss_hwm_mib.is_some_and(|mib| mib > 0.0));
                assert_ordered("agent.list", size.list_all.as_ref(), 5);
                assert_workflow("registry dispatch", &size.dispatch);
            }
            ScenarioReport::Scaleout(scaleout) => {
                let workers: Vec<usize> = scaleout.steps.iter().map(|s| s.workers).collect();
                assert_eq!(workers, vec![1, 2]);
                for step in &scaleout.steps {
                    assert_ingest("scaleout ingest", &step.ingest);
                    assert_workflow("scaleout workflow", &step.workflow);
                }
                assert!(scaleout.ingest_speedup.is_some());
            }
            ScenarioReport::Floor(floor) => {
                assert_ingest("floor relay", &floor.relay);
                assert_ingest("floor in-memory", &floor.memory);
                assert_ingest("floor redis", &floor.redis);
                let relay_cpu = floor.relay.observed.cpu.as_ref().expect("cpu read");
                assert!(
                    relay_cpu.processes.iter().any(|p| p.name == "relay#0"),
                    "the relay's CPU is accounted: {relay_cpu:?}"
                );
                assert!(floor.memory_over_relay.is_some() && floor.redis_over_relay.is_some());
            }
            ScenarioReport::Bridge(bridge) => {
                let concurrency: Vec<usize> = bridge.phases.iter().map(|p| p.concurrency).collect();
                assert_eq!(concurrency, vec![1, 4]);
                for phase in &bridge.phases {
                    let what = format!("bridge, {} in flight", phase.concurrency);
                    assert_eq!((phase.accepted, phase.failed), (60, 0), "{what}");
                    assert_eq!(phase.applied, 60, "{what}: every accepted report applied");
                    assert_eq!(phase.monitor_dropped, 0, "{what}");
                    assert!(phase.accepted_per_second > 0.0, "{what}");
                    assert_ordered(&what, phase.request.as_ref(), 60);
                    assert_ordered(&what, phase.request_to_applied.as_ref(), 60);
                }
            }
        }
    }
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert_eq!(json["scenarios"][0]["scenario"], "ingest");
}
