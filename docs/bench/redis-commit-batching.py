"""Redis CPU per agent commit: one script call per commit, or several commits per call.

An experiment behind docs/performance.md, not part of the harness. It runs opscore's own
src/repository/scripts/commit_agent.lua against a Redis server of your choosing, with
arguments shaped like an ingest state report (record, history entry, one outbox message,
two counter moves), either as one EVALSHA per commit or wrapped so that one EVALSHA runs
a batch of commits in turn. Each variant is pipelined 32 commits at a time, followed by
the batched outbox removal the worker does, and Redis's own CPU time (from /proc) is
divided by the commits. Variants alternate within each round; the medians are printed.

    pip install redis
    redis-server --port 6390 --save '' --appendonly no --daemonize yes
    python3 docs/bench/redis-commit-batching.py --port 6390 --rounds 7

It flushes the server's data before each variant: never point it at a Redis that matters.
"""

import argparse
import os
import pathlib
import statistics
import time

import redis

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "src/repository/scripts/commit_agent.lua"
AGENTS = 1000
PIPELINE = 32

# One call runs ARGV[1] commits; each is preceded by its number of keys and arguments.
BATCH_WRAPPER = """
local results = {}
local k, a = 1, 2
for c = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  results[c] = commit({unpack(KEYS, k, k + nk - 1)}, {unpack(ARGV, a, a + na - 1)})
  k, a = k + nk, a + na
end
return results
"""

RECORD = '{"agentId":"a%d","state":"active","details":{"note":"' + "x" * 300 + '"}}'
HISTORY = '{"state":"active","details":{"note":"' + "y" * 150 + '"}}'
OUTBOX = '{"id":"%s","type":"opscore.agent.state_changed","data":{"note":"' + "z" * 450 + '"}}'


def commit_args(i, versions):
    """Keys and arguments of the i-th commit, in commit_agent.lua's order."""
    agent = i % AGENTS
    p = "bench:"
    keys = [
        f"{p}agent:a{agent}", f"{p}agent:a{agent}:events", f"{p}agent:a{agent}:history",
        f"{p}timers:liveness", f"{p}agents", f"{p}outbox", f"{p}outbox:due", f"{p}counters",
    ]
    now = int(time.time() * 1000)
    args = [
        versions[agent], RECORD % agent, f"a{agent}", f"event-{i}", now, now - 600_000,
        HISTORY, 50, now + 30_000, now + 5_000, 0, 0, 2, 0, "", "incarnation",
        "agents:idle", -1, "agents:active", 1, f"message-{i}", OUTBOX % i,
    ]
    versions[agent] += 1
    return keys, args


def redis_cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(client, pid, single, batched, batch, commits):
    """Redis CPU microseconds per commit, `batch` commits per call (0: one plain call each)."""
    client.flushall()
    versions = [0] * AGENTS
    before = redis_cpu_seconds(pid)
    pipe = client.pipeline(transaction=False)
    i = 0
    while i < commits:
        first = i
        if batch == 0:
            for _ in range(PIPELINE):
                keys, args = commit_args(i, versions)
                pipe.evalsha(single, len(keys), *keys, *args)
                i += 1
        else:
            for _ in range(max(1, PIPELINE // batch)):
                all_keys, all_args = [], [batch]
                for _ in range(batch):
                    keys, args = commit_args(i, versions)
                    all_keys += keys
                    all_args += [len(keys), len(args), *args]
                    i += 1
                pipe.evalsha(batched, len(all_keys), *all_keys, *all_args)
        replies = pipe.execute()
        last = replies[-1] if batch == 0 else replies[-1][-1]
        assert last[0] == b"ok", last
        published = [f"message-{j}" for j in range(first, i)]
        client.zrem("bench:outbox:due", *published)
        client.hdel("bench:outbox", *published)
    return 1e6 * (redis_cpu_seconds(pid) - before) / i


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=6390)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--commits", type=int, default=64_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[0, 8, 32])
    options = parser.parse_args()

    client = redis.Redis(port=options.port)
    pid = int(client.info("server")["process_id"])
    body = SCRIPT.read_text()
    single = client.script_load(body)
    batched = client.script_load(
        "local function commit(KEYS, ARGV)\n" + body + "\nend\n" + BATCH_WRAPPER
    )
    figures = {batch: [] for batch in options.batches}
    for round_ in range(1, options.rounds + 1):
        for batch in options.batches:
            cost = run(client, pid, single, batched, batch, options.commits)
            figures[batch].append(cost)
            print(f"round {round_}, {batch or 1} per call: {cost:.1f} us per commit", flush=True)
    for batch, costs in figures.items():
        runs = ", ".join(f"{c:.1f}" for c in sorted(costs))
        print(f"{batch or 1} commits per call: median {statistics.median(costs):.1f} us ({runs})")


if __name__ == "__main__":
    main()
