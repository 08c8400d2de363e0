"""A Dynamo client for the holdfast real check (benches/dynamo).

Calls namespace.component.endpoint (default holdfast.echo.generate) every
--interval seconds (default 0.2) with round-robin routing and prints one JSON
line per call on stdout, flushed:
  {"ev": "call", "seq", "t" (start), "ok", "latency", "error", "instance",
   "name", "known" (instance ids the client currently routes to)}
Calls run concurrently (one task per tick), so a hung call does not stop the
ticks; a call that has not finished after --give-up seconds is reported as
{"ok": false, "hung": true} and abandoned (it is reported again, as "late",
if it ever completes). A final {"ev": "exiting", "reason"} line ends the run.
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
    rec = {"t": round(time.time(), 3), "who": "client", "pid": os.getpid(), "ev": ev}
    rec.update(kw)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def unwrap(item):
    """Response items may arrive as plain JSON or wrapped (annotated)."""
    if isinstance(item, dict):
        if "name" in item and "instance" in item:
            return item
        for k in ("data", "response"):
            if isinstance(item.get(k), dict):
                return unwrap(item[k])
        return item
    for attr in ("data", "response"):
        v = getattr(item, attr, None)
        if v is not None:
            v = v() if callable(v) else v
            return unwrap(v)
    return {"raw": repr(item)[:200]}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="holdfast.echo.generate")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--give-up", type=float, default=30.0,
                    help="seconds after which an unfinished call is reported as hung")
    ap.add_argument("--wait-instances", type=float, default=60.0)
    args = ap.parse_args()

    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    request_plane = os.environ.get("DYN_REQUEST_PLANE", "tcp")
    discovery = os.environ.get("DYN_DISCOVERY_BACKEND", "etcd")
    emit("started", request_plane=request_plane, discovery=discovery,
         etcd=os.environ.get("ETCD_ENDPOINTS"), nats=os.environ.get("NATS_SERVER"))
    try:
        runtime = DistributedRuntime(loop, discovery, request_plane)
        endpoint = runtime.endpoint(args.endpoint)
        client = await endpoint.client()
        ids = await asyncio.wait_for(client.wait_for_instances(), args.wait_instances)
    except Exception as e:
        emit("exiting", reason="startup_error", error=f"{type(e).__name__}: {e}")
        return 3
    emit("ready", instances=list(ids))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (emit("signal", sig=int(s)), stop.set()))

    def known():
        try:
            return sorted(client.instance_ids())
        except Exception as e:
            return f"error: {e}"

    async def one_call(seq):
        t0 = time.time()
        rec = {"seq": seq, "start": round(t0, 3)}
        try:
            stream = await client.round_robin({"seq": seq})
            got = None
            async for item in stream:
                got = unwrap(item)
            rec.update(ok=got is not None, instance=(got or {}).get("instance"),
                       name=(got or {}).get("name"), error=None if got else "empty stream")
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        rec["latency"] = round(time.time() - t0, 4)
        return rec

    seq = 0
    pending = {}
    exit_reason = None
    next_tick = time.monotonic()
    while not stop.is_set():
        seq += 1
        task = asyncio.create_task(one_call(seq))
        pending[task] = (seq, time.time(), False)
        next_tick += args.interval
        # Report finished calls and calls running longer than --give-up.
        done_now = [t for t in pending if t.done()]
        for t in done_now:
            s, started, reported_hung = pending.pop(t)
            try:
                rec = t.result()
            except BaseException as e:
                rec = {"seq": s, "ok": False, "error": f"{type(e).__name__}: {e}"}
            if reported_hung:
                emit("late", **rec)
            else:
                emit("call", known=known(), **rec)
        now = time.time()
        for t, (s, started, reported_hung) in list(pending.items()):
            if not reported_hung and now - started > args.give_up:
                pending[t] = (s, started, True)
                emit("call", seq=s, start=round(started, 3), ok=False, hung=True,
                     latency=round(now - started, 3), error=f"no answer after {args.give_up}s",
                     known=known())
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        if len(pending) > 2000:
            exit_reason = "too_many_pending"
            break
    now = time.time()
    for t, (s, started, reported_hung) in pending.items():
        if not reported_hung and not t.done():
            emit("call", seq=s, start=round(started, 3), ok=False, hung=True,
                 latency=round(now - started, 3), error="unfinished at client exit", known=known())
    emit("exiting", reason=exit_reason or "signal", calls=seq, pending=len(pending))
    return 0


if __name__ == "__main__":
    try:
        rc = asyncio.run(main())
    except BaseException as e:
        emit("exiting", reason="exception", error=f"{type(e).__name__}: {e}")
        rc = 2
    sys.exit(rc or 0)
