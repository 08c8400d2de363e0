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

KV block chains (kv_router_check.py): with --kv-chain-file PATH and
--kv-state PATH, the worker keeps a model of a prefix cache and publishes its
changes through KvEventPublisher like an engine would: whenever PATH appears
containing "<id> <count>", it makes `count` changes, each one event: a new
sequence of 1-4 blocks from the root (publish_stored, parent None), a
sequence extended by 1-2 blocks (parent = its last block), a fork from a
block inside a sequence (a shared prefix), or 1-2 blocks evicted from the
end of a sequence no fork hangs from (publish_removed). Live blocks are kept
near --kv-live-cap by evicting. After every batch it writes its TRUE block
set (stored and not removed) to --kv-state atomically, with its worker id and
the number of events published, and prints {"ev": "kv_chain_published"}.
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


class BlockCache:
    """The worker's own prefix cache: sequences of block hashes, each either
    from the root or forked from a block of another sequence. Only a
    sequence's last block may be evicted, and only when no fork hangs from
    it (engines evict leaves)."""

    def __init__(self, hash_base, token_base, seed, live_cap):
        import random
        self.rng = random.Random(seed)
        self.hash_base = hash_base
        self.token_base = token_base
        self.next_block = 0
        self.live_cap = live_cap
        self.seqs = []  # [{"parent": hash | None, "blocks": [hash, ...]}]
        self.forks = {}  # block hash -> number of sequences forked from it
        self.live = set()
        self.events = 0
        self.errors = 0
        self.last_error = None
        self.stored = 0
        self.removed = 0

    def _new_blocks(self, n):
        hashes, tokens = [], []
        for _ in range(n):
            c = self.next_block
            self.next_block += 1
            hashes.append(self.hash_base + c)
            # Unique tokens per block, so each block has its own tokens_hash.
            t = (self.token_base + c * 4) % (1 << 31)
            tokens.extend([t, t + 1, t + 2, t + 3])
        return hashes, tokens

    def step(self, pub):
        rng = self.rng
        evictable = [s for s in self.seqs if s["blocks"] and not self.forks.get(s["blocks"][-1])]
        r = rng.random()
        if evictable and (len(self.live) >= self.live_cap or r < 0.3):
            seq = rng.choice(evictable)
            k = min(len(seq["blocks"]), rng.randint(1, 2))
            # Never a block a fork hangs from.
            while k > 1 and self.forks.get(seq["blocks"][-k]):
                k -= 1
            gone = seq["blocks"][-k:]
            if not self._publish(lambda: pub.publish_removed(list(reversed(gone)))):
                return
            del seq["blocks"][-k:]
            self.live.difference_update(gone)
            self.removed += k
            if not seq["blocks"]:
                self.seqs.remove(seq)
                if seq["parent"] is not None:
                    self.forks[seq["parent"]] -= 1
            return
        if not self.seqs or r < 0.55:
            parent, n, seq = None, rng.randint(1, 4), None
        elif r < 0.9:
            seq = rng.choice(self.seqs)
            parent, n = seq["blocks"][-1], rng.randint(1, 2)
        else:
            base = rng.choice(self.seqs)
            parent, n, seq = rng.choice(base["blocks"]), rng.randint(1, 3), None
        hashes, tokens = self._new_blocks(n)
        if not self._publish(lambda: pub.publish_stored(tokens, [4] * n, hashes, parent)):
            return
        if seq is None:
            self.seqs.append({"parent": parent, "blocks": list(hashes)})
            if parent is not None:
                self.forks[parent] = self.forks.get(parent, 0) + 1
        else:
            seq["blocks"].extend(hashes)
        self.live.update(hashes)
        self.stored += n

    def _publish(self, call):
        try:
            call()
        except Exception as e:  # counted and reported, never hidden
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        self.events += 1
        return True

    def write_state(self, path, worker_id, name):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"t": round(time.time(), 3), "name": name, "pid": os.getpid(),
                       "worker_id": worker_id, "events": self.events, "errors": self.errors,
                       "last_error": self.last_error, "stored_blocks": self.stored,
                       "removed_blocks": self.removed, "blocks": sorted(self.live)}, f)
        os.replace(tmp, path)


async def kv_chain_loop(endpoint, path, state_path, args, instance_id):
    from dynamo.llm import KvEventPublisher  # noqa: imported lazily

    try:
        kw = {"worker_id": args.kv_worker_id} if args.kv_worker_id is not None else {}
        pub = KvEventPublisher(endpoint, kv_block_size=4, **kw)
    except Exception as e:  # report, do not fake
        emit("kv_publisher_error", error=f"{type(e).__name__}: {e}")
        return
    worker_id = args.kv_worker_id if args.kv_worker_id is not None else instance_id
    cache = BlockCache(args.kv_hash_base, args.kv_token_base, args.kv_hash_base, args.kv_live_cap)
    cache.write_state(state_path, worker_id, args.name)
    emit("kv_publisher_ready", instance=instance_id, worker_id=worker_id)
    while True:
        await asyncio.sleep(0.02)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                cmd_id, count = f.read().split()
                count = int(count)
            os.unlink(path)
        except Exception as e:
            emit("kv_command_error", error=str(e))
            continue
        t0 = time.time()
        e0, err0 = cache.events, cache.errors
        for i in range(count):
            cache.step(pub)
            if i % 200 == 199:
                await asyncio.sleep(0)
        cache.write_state(state_path, worker_id, args.name)
        emit("kv_chain_published", id=cmd_id, count=count, events=cache.events - e0,
             errors=cache.errors - err0, last_error=cache.last_error, total_events=cache.events,
             live_blocks=len(cache.live), seconds=round(time.time() - t0, 3))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", default="holdfast.echo.generate")
    ap.add_argument("--name", default="w")
    ap.add_argument("--kv-events-file", default=None)
    ap.add_argument("--kv-chain-file", default=None, help="command file of the block-chain publisher")
    ap.add_argument("--kv-state", default=None, help="where the true block set is written")
    ap.add_argument("--kv-hash-base", type=int, default=1 << 40,
                    help="first block hash (distinct per worker process)")
    ap.add_argument("--kv-token-base", type=int, default=0, help="first token id")
    ap.add_argument("--kv-live-cap", type=int, default=2000, help="live blocks kept near this")
    ap.add_argument("--kv-worker-id", type=int, default=None,
                    help="KvEventPublisher worker_id (default: the endpoint's instance id)")
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
    if args.kv_chain_file:
        asyncio.create_task(kv_chain_loop(endpoint, args.kv_chain_file, args.kv_state, args, instance_id))
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
