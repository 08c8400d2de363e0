"""A KV router for the holdfast real check (benches/dynamo, kv_router_check.py).

Stands in for Dynamo's KV router on another node: it subscribes on an
UPSTREAM nats-server (never through holdfastd) to the workers' KV event
subject and applies every event to the Dynamo runtime's own radix tree
(`dynamo._core.RadixTree`, the index Dynamo's KV router routes on).

Decoding: the NATS message is Dynamo 1.6.1's event-plane envelope (msgpack
map: publisher_id, sequence, published_at, topic, payload = bin); the payload
is a msgpack array of router events {worker_id, storage_tier,
residency_domain, event: {event_id, data, dp_rank}}. The envelope and the
array are unpacked here (stdlib msgpack reader from dynamo_check.py: the venv
has no msgpack package); each inner `event` goes to RadixTree.apply_event as
JSON, the form Dynamo's own serde accepts (the tree's dump_tree_as_events
emits the same shape). So stored/removed/cleared semantics, orphan handling
and all tree state are Dynamo's, not ours.

Stdout, one JSON line each, flushed:
  {"ev": "connected" | "disconnected"}
  {"ev": "stats", ...}  every 0.25 s while anything changed
  {"ev": "checkpoint", "name", "workers": {worker_id: [block hashes]}, "stats"}
      when --cmd PATH appears containing "checkpoint NAME" (the file is
      deleted); the block sets come from RadixTree.dump_tree_as_events().
"""

import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dynamo_check import mp_decode  # noqa: E402  stdlib msgpack reader

SUBJECT = "namespace.*.component.*.endpoint.*.kv-events"


def emit(ev, **kw):
    rec = {"t": round(time.time(), 3), "who": "router", "ev": ev}
    rec.update(kw)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


class WorkerStats:
    def __init__(self):
        self.events = 0
        self.last_event_id = None
        self.gaps = 0  # event ids skipped (never seen)
        self.gap_runs = 0
        self.backwards = 0  # event id not above the last one (a restart or a resend)
        self.clears = []  # times
        self.stored_events = 0
        self.removed_events = 0
        self.apply_errors = {}

    def as_dict(self):
        return {"events": self.events, "last_event_id": self.last_event_id, "gaps": self.gaps,
                "gap_runs": self.gap_runs, "backwards": self.backwards, "clears": len(self.clears),
                "clear_times": self.clears[-5:], "stored_events": self.stored_events,
                "removed_events": self.removed_events, "apply_errors": self.apply_errors}


class Router:
    def __init__(self):
        from dynamo._core import RadixTree
        self.tree = RadixTree()
        self.lock = threading.Lock()
        self.workers = {}
        self.messages = 0
        self.decode_errors = 0
        self.last_decode_error = None
        self.changed = True

    def on_message(self, payload):
        try:
            env, _ = mp_decode(payload, 0)
            inner = env.get("payload") if isinstance(env, dict) else None
            if isinstance(inner, (bytes, bytearray)):
                events, _ = mp_decode(inner, 0)
            else:
                events = inner
            if isinstance(events, dict):
                events = [events]
            if not isinstance(events, list):
                raise ValueError(f"payload is {type(events).__name__}")
        except Exception as e:
            with self.lock:
                self.messages += 1
                self.decode_errors += 1
                self.last_decode_error = f"{type(e).__name__}: {e}"
                self.changed = True
            return
        with self.lock:
            self.messages += 1
            self.changed = True
            for rev in events:
                self._apply(rev)

    def _apply(self, rev):
        wid = rev.get("worker_id")
        event = rev.get("event") or {}
        st = self.workers.setdefault(wid, WorkerStats())
        st.events += 1
        eid = event.get("event_id")
        if isinstance(eid, int):
            if st.last_event_id is not None:
                if eid > st.last_event_id + 1:
                    st.gaps += eid - st.last_event_id - 1
                    st.gap_runs += 1
                elif eid <= st.last_event_id:
                    st.backwards += 1
            st.last_event_id = eid
        data = event.get("data")
        if data == "cleared" or (isinstance(data, dict) and "cleared" in data):
            st.clears.append(round(time.time(), 3))
        elif isinstance(data, dict) and "stored" in data:
            st.stored_events += 1
        elif isinstance(data, dict) and "removed" in data:
            st.removed_events += 1
        try:
            self.tree.apply_event(int(wid), json.dumps(event).encode())
        except Exception as e:
            key = str(e).split("\x1b")[0][:80]
            st.apply_errors[key] = st.apply_errors.get(key, 0) + 1

    def stats(self):
        with self.lock:
            self.changed = False
            return {"messages": self.messages, "decode_errors": self.decode_errors,
                    "last_decode_error": self.last_decode_error,
                    "workers": {str(w): s.as_dict() for w, s in self.workers.items()}}

    def view(self):
        """worker id -> block hashes the tree holds for it (Dynamo's own dump)."""
        with self.lock:
            dump = self.tree.dump_tree_as_events()
        out = {}
        for text in dump:
            rev = json.loads(text)
            data = (rev.get("event") or {}).get("data") or {}
            stored = data.get("stored") if isinstance(data, dict) else None
            if not stored:
                continue
            blocks = out.setdefault(str(rev.get("worker_id")), set())
            blocks.update(b["block_hash"] for b in stored.get("blocks") or [])
        return {w: sorted(b) for w, b in out.items()}


def nats_loop(router, port, stop):
    """Plain NATS client (stdlib): reconnects every 20 ms while the server is down."""
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            time.sleep(0.02)
            continue
        try:
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"kv-router"}\r\n'
                      + f"SUB {SUBJECT} 1\r\nPING\r\n".encode())
            emit("connected", port=port)
            read_loop(router, s, stop)
        except (OSError, ValueError) as e:
            emit("disconnected", error=f"{type(e).__name__}: {e}")
        finally:
            s.close()
        time.sleep(0.02)


def read_loop(router, s, stop):
    s.settimeout(0.3)
    buf = bytearray()
    while not stop.is_set():
        try:
            d = s.recv(1 << 20)
        except socket.timeout:
            continue
        if not d:
            emit("disconnected", error="closed by server")
            return
        buf += d
        pos = 0
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            line = bytes(buf[pos:nl])
            if line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                parts = line.split()
                n = int(parts[-1])
                if len(buf) < nl + 2 + n + 2:
                    break
                payload = bytes(buf[nl + 2:nl + 2 + n])
                if line.startswith(b"HMSG "):
                    payload = payload[int(parts[-2]):]
                pos = nl + 2 + n + 2
                router.on_message(payload)
            else:
                pos = nl + 2
                if line == b"PING":
                    s.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    emit("nats_error", line=line.decode(errors="replace"))
        del buf[:pos]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats-port", type=int, required=True)
    ap.add_argument("--cmd", required=True, help="command file: 'checkpoint NAME'")
    args = ap.parse_args()
    router = Router()
    stop = threading.Event()
    th = threading.Thread(target=nats_loop, args=(router, args.nats_port, stop), daemon=True)
    th.start()
    emit("started", port=args.nats_port)
    last_stats = 0.0
    try:
        while True:
            time.sleep(0.05)
            now = time.time()
            if router.changed and now - last_stats >= 0.25:
                emit("stats", **router.stats())
                last_stats = now
            if not os.path.exists(args.cmd):
                continue
            try:
                with open(args.cmd) as f:
                    verb, name = f.read().split()
                os.unlink(args.cmd)
            except Exception as e:
                emit("command_error", error=str(e))
                continue
            if verb == "checkpoint":
                view = router.view()
                emit("checkpoint", name=name, workers=view, stats=router.stats())
    except KeyboardInterrupt:
        pass
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
