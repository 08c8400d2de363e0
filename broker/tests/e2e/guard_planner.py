"""Drives Dynamo 1.6.1's real planner connector for the planner guard's e2e
tests (broker/tests/e2e/guard.rs).

A VirtualConnectorCoordinator (the planner side) makes decision 0 (1/1
workers), then decision 1 (3/3); a VirtualConnectorClient (the deployment
side) acknowledges every decision it sees; a WorkerMetricsPublisher
publishes the worker's KV blocks in use every 100 ms on Dynamo's event
plane (NATS). With `high`, the load stays at 99 % until the deployment sees
a new decision (the guard's rollback), then drops to 50 %, and the planner
makes one more decision (2/2) to check that the deployment still gets it.
With `normal`, the load stays at 50 % for `--seconds`.

Prints one JSON object per line: {"event": "acked", "decision_id", "prefill",
"decode"} for each decision the deployment acknowledged, and
{"event": "done"} at the end. Needs ETCD_ENDPOINTS, NATS_SERVER and the
DYN_* variables the test sets.
"""

import argparse
import asyncio
import json
import time


def say(**fields):
    print(json.dumps(fields), flush=True)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("load", choices=["high", "normal"])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    from dynamo.runtime import DistributedRuntime
    from dynamo._core import VirtualConnectorCoordinator, VirtualConnectorClient
    from dynamo.llm import WorkerMetricsPublisher

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "etcd", "tcp")
    endpoint = runtime.endpoint(f"{args.namespace}.worker.generate")

    async def handler(request, context=None):
        yield {}

    serving = asyncio.ensure_future(endpoint.serve_endpoint(handler))
    metrics = WorkerMetricsPublisher()
    await metrics.create_endpoint(endpoint)

    coordinator = VirtualConnectorCoordinator(runtime, args.namespace, 1, 10, 3)
    await coordinator.async_init()
    client = VirtualConnectorClient(runtime, args.namespace)
    acked = []
    used = 99 if args.load == "high" else 50

    async def deployment():
        # The deployment's loop: wait for an unacknowledged decision, act on
        # it (nothing to scale here), acknowledge it.
        while True:
            await client.wait()
            decision = await client.get()
            await client.complete(decision)
            acked.append((decision.decision_id, decision.num_prefill_workers))
            say(
                event="acked",
                decision_id=decision.decision_id,
                prefill=decision.num_prefill_workers,
                decode=decision.num_decode_workers,
            )

    async def worker():
        while True:
            metrics.publish(0, 10, used)
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(deployment())]

    async def until(what, limit=10.0):
        stop = time.monotonic() + limit
        while not what() and time.monotonic() < stop:
            await asyncio.sleep(0.05)

    await coordinator.update_scaling_decision(1, 1)
    await until(lambda: len(acked) >= 1)
    await coordinator.update_scaling_decision(3, 3)
    await until(lambda: len(acked) >= 2)
    tasks.append(asyncio.ensure_future(worker()))

    deadline = time.monotonic() + args.seconds
    if args.load == "high":
        # The guard's rollback: back to one prefill worker.
        await until(lambda: len(acked) >= 3, args.seconds)
        if len(acked) >= 3:
            # Load falls, and the planner decides again.
            used = 50
            await coordinator.update_scaling_decision(2, 2)
            await until(lambda: len(acked) >= 4, max(deadline - time.monotonic(), 0.1))
    else:
        await asyncio.sleep(args.seconds)
    for task in tasks:
        task.cancel()
    say(event="done")
    serving.cancel()
    runtime.shutdown()


asyncio.run(main())
