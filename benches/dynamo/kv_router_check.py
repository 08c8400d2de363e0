#!/usr/bin/env python3
"""KV-cache consistency with Dynamo's own radix tree (issue 19, part A, item 2).

A worker (worker.py --kv-chain-file) publishes a prefix cache's changes
(stored chains with parents, forks, evictions) through Dynamo's
KvEventPublisher on the NATS event plane and keeps its TRUE block set. A
router (router.py) on the UPSTREAM nats-server applies every event to
`dynamo._core.RadixTree`. After each fault the router's view (the tree's own
dump) is compared per worker with the worker's true set:
  consistent           equal;
  cleared and rebuilt  the router saw a "cleared" event for the worker and
                       holds a subset of its true set (nothing stale);
  INCONSISTENT         anything else: stale blocks (the router holds blocks
                       the worker removed or never had) and/or missing blocks
                       without a clear.

Modes: direct (worker on nats-server/etcd) and holdfast (worker on
holdfastd's --nats-listen/--etcd-listen; the router stays upstream).

Faults (fresh processes each):
  kv_router_outage          nats-server SIGKILLed for --outage, events
                            (stores and evictions) published throughout
  kv_router_worker_restart  the same; halfway the worker is SIGKILLed and a
                            new worker process started (new worker id; with
                            --reuse-worker-id, the old one's)
  kv_router_burst           the same, plus --burst events at once early in
                            the outage
  kv_router_relay_kill      holdfast only: burst outage; holdfastd SIGKILLed
                            as soon as its replay reaches the router, and
                            restarted on the same data dir
  kv_router_drop_oldest     holdfast only: burst outage with the kv_events
                            class at max_bytes = --drop-max-bytes,
                            when_full = "drop_oldest"

Stdlib only (the Dynamo processes run under --python). Every process is
stopped by its PID, every wait is bounded, everything is on loopback.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dynamo_check import (HERE, Proc, Stack, http_get, log, notable_stderr,  # noqa: E402
                          parse_duration, read_jsonl, wait_for, wait_http_ok,
                          write_command, write_results)

FAULTS = ["kv_router_outage", "kv_router_worker_restart", "kv_router_burst",
          "kv_router_relay_kill", "kv_router_drop_oldest"]
HOLDFAST_ONLY = ("kv_router_relay_kill", "kv_router_drop_oldest")
BURST_FAULTS = ("kv_router_burst", "kv_router_relay_kill", "kv_router_drop_oldest")


class Tail:
    """Reads the JSON lines a process appends to a file, incrementally."""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.partial = b""

    def read(self):
        out = []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return out
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith(b"{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


class RouterHandle:
    def __init__(self, proc, cmd_path):
        self.proc = proc
        self.cmd = cmd_path
        self.tail = Tail(proc.stdout_path)
        self.stats = {}
        self.last_change = time.time()
        self.checkpoints = {}
        self.connects = []

    def poll(self):
        for r in self.tail.read():
            ev = r.get("ev")
            if ev == "stats":
                self.stats = r
                self.last_change = time.time()
            elif ev == "checkpoint":
                self.checkpoints[r["name"]] = r
            elif ev == "connected":
                self.connects.append(r["t"])

    def messages(self):
        self.poll()
        return self.stats.get("messages", 0)

    def last_event_id(self, wid):
        self.poll()
        return ((self.stats.get("workers") or {}).get(str(wid)) or {}).get("last_event_id")

    def checkpoint(self, name, timeout=60):
        write_command(self.cmd, f"checkpoint {name}")

        def got():
            self.poll()
            return self.checkpoints.get(name)
        return wait_for(got, timeout, step=0.1)


class WorkerHandle:
    def __init__(self, label, proc, cmd_path, state_path):
        self.label = label
        self.proc = proc
        self.cmd = cmd_path
        self.state_path = state_path
        self.tail = Tail(proc.stdout_path)
        self.seq = 0
        self.reports = []
        self.ready = None

    def poll(self):
        for r in self.tail.read():
            if r.get("ev") == "kv_chain_published":
                self.reports.append(r)
            elif r.get("ev") == "kv_publisher_ready":
                self.ready = r
            elif r.get("ev") in ("exiting", "kv_publisher_error"):
                self.reports.append(r)

    def wait_ready(self, timeout):
        def ok():
            self.poll()
            return self.ready or (not self.proc.alive() and "exited")
        r = wait_for(ok, timeout)
        return r if isinstance(r, dict) else None

    def publish(self, count, timeout=None):
        """Asks for `count` changes and waits (bounded) for the report."""
        self.seq += 1
        cid = f"{self.label}{self.seq}"
        write_command(self.cmd, f"{cid} {count}")

        def done():
            self.poll()
            return next((r for r in self.reports if r.get("id") == cid), None) or \
                (not self.proc.alive() and {"id": cid, "lost": "worker exited"})
        return wait_for(done, timeout or (20 + count * 0.002), step=0.02)

    def state(self):
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None


def compare(view, states, router_stats):
    """Per worker: the router's view against the worker's true set."""
    rows = []
    workers = (router_stats or {}).get("workers") or {}
    latest = {}
    for st in states:
        if st and st.get("worker_id") is not None:
            latest[str(st["worker_id"])] = st  # a reused worker id: the last process's set
    for wid, st in latest.items():
        r = set(view.get(wid, []))
        t = set(st["blocks"])
        stale, missing = len(r - t), len(t - r)
        ws = workers.get(wid) or {}
        clears = ws.get("clears", 0)
        if not stale and not missing:
            verdict = "consistent"
        elif not stale and clears:
            verdict = "cleared and rebuilt"
        else:
            verdict = "INCONSISTENT"
        rows.append({"worker": st.get("name"), "worker_id": wid, "verdict": verdict,
                     "router_blocks": len(r), "true_blocks": len(t), "stale": stale, "missing": missing,
                     "clears": clears, "events_published": st.get("events"),
                     "router_events": ws.get("events"), "router_last_event_id": ws.get("last_event_id"),
                     "router_gaps": ws.get("gaps"), "router_backwards": ws.get("backwards"),
                     "apply_errors": ws.get("apply_errors")})
    for wid, blocks in view.items():
        if wid not in latest:
            rows.append({"worker": "?", "worker_id": wid, "verdict": "INCONSISTENT",
                         "router_blocks": len(blocks), "true_blocks": 0, "stale": len(blocks),
                         "missing": 0, "clears": (workers.get(wid) or {}).get("clears", 0)})
    return rows


def kv_env(stack):
    etcd_url, nats_url = stack.endpoints()
    env = dict(os.environ)
    env.update({
        "ETCD_ENDPOINTS": etcd_url, "NATS_SERVER": nats_url, "DYN_DISCOVERY_BACKEND": "etcd",
        "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "nats",
        "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
    })
    return env


def relay_metrics(stack):
    if not stack.relay or not stack.relay.alive():
        return []
    _, body = http_get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=3)
    pat = r"^holdfast_(kv_consistency\w*|messages_dropped_total|expired_messages_total|kv_\w+)(\{[^}]*\})? \S+"
    return [m.group(0) for m in re.finditer(pat, body or "", re.M)]


def run_one(mode, fault, args, results):
    outdir = os.path.join(results, mode, fault)
    os.makedirs(outdir, exist_ok=True)
    log(f"=== {mode} / {fault} -> {outdir}")
    res = {"mode": mode, "fault": fault, "notes": [], "marks": {}}
    marks = res["marks"]
    stack = None
    workers = []
    router = None
    try:
        stack = Stack(mode, fault, args, outdir)
        if fault == "kv_router_drop_oldest":
            stack.relay_config_text = ("[classes.kv_events]\n"
                                       f"max_bytes = {args.drop_max_bytes}\n"
                                       'when_full = "drop_oldest"\n')
        stack.start()
        env = kv_env(stack)
        cmd_r = os.path.join(stack.tmp, "router-cmd")
        rproc = Proc("router", [args.python, os.path.join(HERE, "router.py"),
                                "--nats-port", str(stack.nats_nodes[0].port), "--cmd", cmd_r], outdir)
        router = RouterHandle(rproc, cmd_r)
        stack.procs.append(rproc)
        rproc.start()
        if not wait_for(lambda: router.poll() or router.connects, 20):
            raise RuntimeError("router did not connect; see router.err")

        def new_worker(gen, worker_id=None):
            label = "ab"[gen] if gen < 2 else f"g{gen}"
            cmd = os.path.join(stack.tmp, f"kv-cmd-{label}")
            state = os.path.join(outdir, f"state-worker-{label}.json")
            p = Proc(f"worker-{label}", [
                args.python, os.path.join(HERE, "worker.py"), "--name", f"w{label}",
                "--kv-chain-file", cmd, "--kv-state", state,
                "--kv-hash-base", str((gen + 1) << 40), "--kv-token-base", str(gen * (1 << 28)),
                "--kv-live-cap", str(args.live_cap)]
                + (["--kv-worker-id", str(worker_id)] if worker_id is not None else []), outdir, env)
            stack.procs.append(p)
            w = WorkerHandle(label, p, cmd, state)
            workers.append(w)
            p.start()
            return w

        w = new_worker(0)
        if not w.wait_ready(40):
            raise RuntimeError("worker did not start its KV publisher; see worker-a.err")
        res["worker_ids"] = {w.label: w.ready.get("worker_id")}
        w.publish(args.batch * 10)
        settle(router, [w], args)
        cp = router.checkpoint("before")
        res["before"] = compare(cp["workers"], [w.state()], cp["stats"]) if cp else None

        # ---- the outage
        res["worker_rss_mb_before"] = rss_mb(w.proc.pid)
        marks["fault_start"] = time.time()
        stack.kill_nats()
        log(f"nats-server killed; {args.outage:.0f} s outage, {args.batch} events every {args.every} s")
        end = marks["fault_start"] + args.outage
        burst_done = fault not in BURST_FAULTS
        restart_done = fault != "kv_router_worker_restart"
        restart_after_nats = False
        reuse = None
        during = 0
        while time.time() < end:
            t = time.time()
            if not burst_done and t - marks["fault_start"] >= min(5.0, args.outage / 6):
                log(f"burst of {args.burst} events")
                r = w.publish(args.burst, timeout=600)
                marks["burst_reported"] = time.time()
                res["burst_report"] = r
                during += (r or {}).get("events", 0)
                burst_done = True
                if time.time() > end:
                    res["notes"].append(f"the burst took {time.time() - t:.0f} s: outage extended to its end")
            if not restart_done and t - marks["fault_start"] >= args.outage / 2:
                restart_done = True
                time.sleep(1.0)  # let the last batch leave the worker's runtime
                w.proc.kill9()
                marks["worker_killed"] = time.time()
                log(f"worker {w.label} (worker id {w.ready.get('worker_id')}) killed -9; starting a new one")
                reuse = w.ready.get("worker_id") if args.reuse_worker_id else None
                w = new_worker(1, reuse)
                if w.wait_ready(30):
                    res["worker_ids"][w.label] = w.ready.get("worker_id")
                    marks["new_worker_ready"] = time.time()
                else:
                    # Dynamo retries its startup NATS connection for 120 s.
                    res["notes"].append("the new worker did not start during the outage "
                                        f"({'still waiting for NATS' if w.proc.alive() else 'exited'})")
                    restart_after_nats = True
            if w.ready and w.proc.alive():
                r = w.publish(args.batch)
                during += (r or {}).get("events", 0)
            rest = args.every - (time.time() - t)
            if rest > 0:
                time.sleep(min(rest, max(0.0, end - time.time())))
        marks["fault_end"] = time.time()
        res["events_during"] = during
        # Where a direct worker keeps what it could not send: its own memory.
        res["worker_rss_mb_at_outage_end"] = {x.label: rss_mb(x.proc.pid) for x in workers if x.proc.alive()}
        msgs_before_restart = router.messages()
        if not stack.restart_nats():
            res["notes"].append("nats-server did not come back")
        marks["nats_back"] = time.time()
        log("nats-server back")
        if fault == "kv_router_relay_kill":
            got = wait_for(lambda: router.messages() > msgs_before_restart, 60, step=0.01)
            stack.relay.kill9()
            marks["relay_killed"] = time.time()
            res["router_messages_at_relay_kill"] = router.messages() - msgs_before_restart
            log(f"holdfastd killed -9 during the replay ({'after' if got else 'no'} replayed messages "
                f"reached the router: {res['router_messages_at_relay_kill']})")
            time.sleep(1.0)
            stack.relay.start()
            if not wait_http_ok(f"http://127.0.0.1:{stack.metrics_port}/readyz", 120):
                res["notes"].append("holdfastd not ready 120 s after its restart")
            marks["relay_restarted"] = time.time()
        if restart_after_nats:
            if not (w.proc.alive() and w.wait_ready(60)):
                w.proc.stop()
                res["notes"].append("the new worker had exited; another one started after NATS returned")
                w = new_worker(2, reuse)
                w.wait_ready(60)
            if w.ready:
                res["worker_ids"][w.label] = w.ready.get("worker_id")
                marks["new_worker_ready"] = time.time()
                res["notes"].append(f"new worker ready {marks['new_worker_ready'] - marks['nats_back']:.1f} s "
                                    "after NATS returned")
            else:
                res["notes"].append("the new worker did not start after NATS returned either")
        time.sleep(args.settle_min)
        # Events after recovery: the router must follow the live worker on.
        live = [x for x in workers if x.proc.alive() and x.ready]
        for x in live:
            x.publish(args.batch * 5)
        marks["after_published"] = time.time()
        settle(router, live, args)
        marks["end"] = time.time()
        cp = router.checkpoint("end")
        if not cp:
            raise RuntimeError("router did not answer the checkpoint")
        states = [x.state() for x in workers]
        res["end"] = compare(cp["workers"], states, cp["stats"])
        res["router_stats"] = cp["stats"]
        res["worker_states"] = [{k: v for k, v in (s or {}).items() if k != "blocks"} for s in states]
        res["relay_metrics"] = relay_metrics(stack)
        res["relay_status_end"] = stack.relay_status()
    except Exception as e:
        res["notes"].append(f"harness error: {type(e).__name__}: {e}")
        log(f"harness error: {e}")
    finally:
        if stack:
            res["self_exits"] = [p.name for p in stack.procs if p.exited_on_its_own()]
            if stack.relay and stack.relay.exited_on_its_own():
                res["notes"].append("holdfastd exited on its own; see holdfastd.err")
            stack.teardown()
    res["stderr_notable"] = {name: notable_stderr(os.path.join(outdir, name))
                             for name in sorted(os.listdir(outdir)) if name.endswith(".err")}
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    log(f"--- {mode}/{fault}: " + json.dumps(res.get("end"), default=str)[:1500])
    return res


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def settle(router, live_workers, args):
    """Until the router has seen every live worker's last event and nothing
    changed for --settle-min s, or --settle-max s have passed."""
    t0 = time.time()
    while time.time() - t0 < args.settle_max:
        caught_up = True
        for w in live_workers:
            st = w.state() or {}
            eid = router.last_event_id(st.get("worker_id"))
            if eid is None or eid < (st.get("events") or 0):
                caught_up = False
        quiet = time.time() - router.last_change
        if caught_up and quiet >= 1.0:
            return True
        if quiet >= args.settle_min and time.time() - t0 >= args.settle_min:
            return False  # nothing more is coming
        time.sleep(0.2)
    return False


def verdict_cell(rows):
    if not rows:
        return "no result"
    out = []
    for r in rows:
        v = r["verdict"]
        if v != "consistent":
            v += f" (stale {r['stale']}, missing {r['missing']})"
        out.append(f"{r['worker']}: {v}" if len(rows) > 1 else v)
    return "; ".join(out)


def table(all_res, outage):
    head = ("| fault | mode | outage | events published (during outage / total) | router consistent? "
            "(stale/missing) | clears seen | router event-id gaps | notes |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for (mode, fault), r in all_res.items():
        rows = r.get("end") or []
        total = sum((s or {}).get("events") or 0 for s in r.get("worker_states") or [])
        clears = sum(x.get("clears") or 0 for x in rows)
        gaps = ", ".join(str(x.get("router_gaps")) for x in rows if "router_gaps" in x) or "-"
        notes = list(r.get("notes") or [])
        ids = list((r.get("worker_ids") or {}).values())
        if len(ids) != len(set(ids)):
            notes.append("the new worker reused the old one's worker id (its event ids restart at 1)")
        rss = r.get("worker_rss_mb_at_outage_end") or {}
        if rss:
            notes.append(f"worker RSS {r.get('worker_rss_mb_before')} MB before the outage, at its end "
                         + ", ".join(f"{k}: {v} MB" for k, v in rss.items()))
        dup = sum(max(0, (x.get("router_events") or 0) - (x.get("events_published") or 0)
                      - (x.get("clears") or 0)) for x in rows)
        if dup and len(ids) == len(set(ids)):
            notes.append(f"{dup} events applied twice (resent)")
        if r.get("router_messages_at_relay_kill") is not None:
            notes.append(f"relay killed after {r['router_messages_at_relay_kill']} replayed messages")
        for m in r.get("relay_metrics") or []:
            if ("consistency" in m or "drop_oldest" in m) and not m.endswith(" 0"):
                notes.append(m)
        lines.append(f"| {fault} | {mode} | {outage:.0f} s | {r.get('events_during', '-')} / {total} | "
                     f"{verdict_cell(rows)} | {clears} | {gaps} | {'; '.join(notes) or '-'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 s outage (default: 15 min)")
    ap.add_argument("--outage", type=parse_duration, default=None, help="NATS outage (overrides --quick)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(FAULTS))
    ap.add_argument("--modes", default="direct,holdfast")
    ap.add_argument("--batch", type=int, default=20, help="events per batch during the outage")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between batches")
    ap.add_argument("--burst", type=int, default=100_000, help="events of the burst")
    ap.add_argument("--live-cap", type=int, default=2000, help="the worker keeps about this many live blocks")
    ap.add_argument("--drop-max-bytes", type=int, default=262_144,
                    help="kv_events class max_bytes in kv_router_drop_oldest")
    ap.add_argument("--reuse-worker-id", action="store_true",
                    help="kv_router_worker_restart: the new worker publishes under the old one's worker id "
                         "(KvEventPublisher worker_id), its event ids starting at 1 again")
    ap.add_argument("--settle-min", type=float, default=10.0, help="quiet seconds meaning 'nothing more comes'")
    ap.add_argument("--settle-max", type=float, default=300.0)
    ap.add_argument("--holdfastd", default=os.path.join(os.path.dirname(os.path.dirname(HERE)),
                                                        "target", "release", "holdfastd"))
    ap.add_argument("--python", default=os.environ.get("DYN_PYTHON", "/tmp/dynvenv/bin/python"))
    deps = os.path.join(os.path.dirname(os.path.dirname(HERE)), ".deps", "bin", "nats-server")
    ap.add_argument("--nats-server", default=deps if os.access(deps, os.X_OK)
                    else shutil.which("nats-server") or "/usr/sbin/nats-server")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "etcd")
    ap.add_argument("--results", default=None)
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    args.outage = args.outage or (60.0 if args.quick else 900.0)
    args.secured = False  # Stack's options
    args.lease_ttl = None
    faults = FAULTS if not args.only else [f.strip() for f in args.only.split(",") if f.strip()]
    for f in faults:
        if f not in FAULTS:
            ap.error(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "holdfast" in modes and not os.access(args.holdfastd, os.X_OK):
        ap.error(f"holdfastd not found at {args.holdfastd}")
    results = args.results or os.path.join(HERE, "results", "kv-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(results, exist_ok=True)
    params = dict(vars(args), argv=sys.argv, started=time.strftime("%Y-%m-%d %H:%M:%S %z"))
    with open(os.path.join(results, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    all_res = {}
    try:
        for fault in faults:
            for mode in modes:
                if mode == "direct" and fault in HOLDFAST_ONLY:
                    continue
                all_res[(mode, fault)] = run_one(mode, fault, args, results)
                with open(os.path.join(results, "table.md"), "w") as f:
                    f.write(table(all_res, args.outage) + "\n")
    except KeyboardInterrupt:
        log("interrupted")
    t = table(all_res, args.outage)
    print(f"\nKV router check ({params['started']}; NATS outage {args.outage:.0f} s, "
          f"{args.batch} events every {args.every} s, burst {args.burst})\n")
    print(t)
    print("\nPer worker:")
    for (mode, fault), r in all_res.items():
        for row in r.get("end") or []:
            print(f"- {mode}/{fault}: {json.dumps(row)}")
        for m in r.get("relay_metrics") or []:
            print(f"    {m}")
    print(f"\nraw output: {results}")
    write_results(results, t, all_res)


if __name__ == "__main__":
    main()
