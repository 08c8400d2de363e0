"""A Dynamo worker for the holdfast real check (benches/dynamo).

Serves namespace.component.endpoint (default holdfast.echo.generate) with a
handler that answers every request with one item naming this process. Prints
one JSON line per lifecycle event on stdout, flushed:
  {"ev": "started" | "registered" | "kv_published" | "exiting", ...}

Environment (read by the Dynamo runtime itself): ETCD_ENDPOINTS, NATS_SERVER,
DYN_REQUEST_PLANE, DYN_DISCOVERY_BACKEND, DYN_EVENT_PLANE, ETCD_LEASE_TTL.

Optional KV events: with --kv-events-file PATH, the worker creates a
dynamo KvEventPublisher on its endpoint and, whenever PATH appears containing
"<first> <count>", publishes `count` numbered "stored" events (block hash =
event number) and deletes the file. This lets the orchestrator publish events
at a chosen moment (e.g. during a NATS outage) without a GPU or a model.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback


def emit(ev, **kw):
    rec = {"t": round(time.time(), 3), "who": "worker", "pid": os.getpid(), "ev": ev}
    rec.update(kw)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


async def kv_loop(endpoint, path, instance_id):
    from dynamo.llm import KvEventPublisher  # noqa: imported lazily

    try:
        pub = KvEventPublisher(endpoint, kv_block_size=4)
    except Exception as e:  # report, do not fake
        emit("kv_publisher_error", error=f"{type(e).__name__}: {e}")
        return
    emit("kv_publisher_ready", instance=instance_id)
    while True:
        await asyncio.sleep(0.1)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                first, count = (int(x) for x in f.read().split())
            os.unlink(path)
        except Exception as e:
            emit("kv_command_error", error=str(e))
            continue
        errors = 0
        last_err = None
        for n in range(first, first + count):
            try:
                # One block of 4 tokens; the block hash carries the event number.
                pub.publish_stored([n, n, n, n], [4], [n], None)
            except Exception as e:
                errors += 1
                last_err = f"{type(e).__name__}: {e}"
            if (n - first) % 50 == 49:
                await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(0)
        emit("kv_published", first=first, count=count, errors=errors, last_error=last_err)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="holdfast.echo.generate")
    ap.add_argument("--name", default="w")
    ap.add_argument("--kv-events-file", default=None)
    args = ap.parse_args()

    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    request_plane = os.environ.get("DYN_REQUEST_PLANE", "tcp")
    discovery = os.environ.get("DYN_DISCOVERY_BACKEND", "etcd")
    emit("started", name=args.name, request_plane=request_plane, discovery=discovery,
         etcd=os.environ.get("ETCD_ENDPOINTS"), nats=os.environ.get("NATS_SERVER"),
         lease_ttl=os.environ.get("ETCD_LEASE_TTL"))
    try:
        runtime = DistributedRuntime(loop, discovery, request_plane)
    except Exception as e:
        emit("exiting", reason="runtime_error", error=f"{type(e).__name__}: {e}")
        return 3
    endpoint = runtime.endpoint(args.endpoint)
    try:
        instance_id = endpoint.connection_id()
    except Exception:
        instance_id = None
    served = 0

    async def handler(request, context=None):
        nonlocal served
        served += 1
        yield {"name": args.name, "pid": os.getpid(), "instance": instance_id,
               "n": served, "echo": request}

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (emit("signal", sig=int(s)), stop.set(), runtime.shutdown()))

    # serve_endpoint returns a Future (not a coroutine) that completes at shutdown.
    serve = asyncio.ensure_future(endpoint.serve_endpoint(handler))

    async def announce():
        # serve_endpoint only returns at shutdown; registration is visible to
        # clients shortly after it starts.
        await asyncio.sleep(0.5)
        if not serve.done():
            emit("registered", name=args.name, instance=instance_id,
                 instance_hex=(f"{instance_id:x}" if isinstance(instance_id, int) else None))

    asyncio.create_task(announce())
    if args.kv_events_file:
        asyncio.create_task(kv_loop(endpoint, args.kv_events_file, instance_id))
    try:
        await serve
        reason = "signal" if stop.is_set() else "serve_endpoint_returned"
        emit("exiting", reason=reason, served=served)
        return 0
    except Exception as e:
        emit("exiting", reason="serve_endpoint_error", served=served,
             error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-800:])
        return 1


if __name__ == "__main__":
    try:
        rc = asyncio.run(main())
    except BaseException as e:  # KeyboardInterrupt, SystemExit, runtime panics surfacing
        emit("exiting", reason="exception", error=f"{type(e).__name__}: {e}")
        rc = 2
    sys.exit(rc or 0)
