#!/usr/bin/env python3
"""The real check (issue 8, part 4): an unmodified Dynamo worker/client pair
(PyPI ai-dynamo-runtime 1.6.1) through faults, directly against etcd and NATS
and through holdfastd's drop-in front ends (--etcd-listen, --nats-listen).

Stdlib only. Run it with any python3 >= 3.8; the Dynamo processes run under
--python (the venv's interpreter). See README.md next to this file.

Each (mode, fault) pair gets fresh processes: its own nats-server and etcd on
free loopback ports with temporary data dirs, in holdfast mode its own
holdfastd, two workers and one client. Nothing is shared between pairs, so a
fault cannot leak into the next one. Every process started here is stopped by
its PID; every wait is bounded.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAULTS = ["etcd_outage", "etcd_empty", "worker_kill", "nats_request_plane", "kv_events"]
HANG_S = 2.0  # a call slower than this counts as hung
# Block hashes (= event numbers) of the KV events: 1..10 before the outage,
# DURING_BASE.. during it, AFTER_BASE..+10 after recovery.
DURING_BASE = 1_000_000
AFTER_BASE = 9_000_000


def log(msg):
    sys.stderr.write(time.strftime("%H:%M:%S ") + msg + "\n")
    sys.stderr.flush()


def parse_duration(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {s!r} (e.g. 30s, 5m)")
    v = float(m.group(1))
    return v * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def http_get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except Exception as e:
        return None, str(e)


def wait_http_ok(url, timeout):
    end = time.time() + timeout
    while time.time() < end:
        st, _ = http_get(url)
        if st == 200:
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------
# Minimal msgpack decoder (enough for Dynamo's event-plane envelopes).


def mp_decode(b, i=0):
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if 0x80 <= t <= 0x8F:
        return mp_map(b, i, t & 0x0F)
    if 0x90 <= t <= 0x9F:
        return mp_arr(b, i, t & 0x0F)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i:i + n].decode(errors="replace"), i + n
    if t >= 0xE0:
        return t - 0x100, i
    if t == 0xC0:
        return None, i
    if t == 0xC2:
        return False, i
    if t == 0xC3:
        return True, i
    sizes = {0xC4: 1, 0xC5: 2, 0xC6: 4}
    if t in sizes:
        n = int.from_bytes(b[i:i + sizes[t]], "big")
        i += sizes[t]
        return bytes(b[i:i + n]), i + n
    if t in (0xCA, 0xCB):
        import struct
        n = 4 if t == 0xCA else 8
        return struct.unpack(">f" if n == 4 else ">d", b[i:i + n])[0], i + n
    uints = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
    if t in uints:
        n = uints[t]
        return int.from_bytes(b[i:i + n], "big"), i + n
    ints = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    if t in ints:
        n = ints[t]
        return int.from_bytes(b[i:i + n], "big", signed=True), i + n
    strs = {0xD9: 1, 0xDA: 2, 0xDB: 4}
    if t in strs:
        n = int.from_bytes(b[i:i + strs[t]], "big")
        i += strs[t]
        return b[i:i + n].decode(errors="replace"), i + n
    if t in (0xDC, 0xDD):
        k = 2 if t == 0xDC else 4
        return mp_arr(b, i + k, int.from_bytes(b[i:i + k], "big"))
    if t in (0xDE, 0xDF):
        k = 2 if t == 0xDE else 4
        return mp_map(b, i + k, int.from_bytes(b[i:i + k], "big"))
    raise ValueError(f"msgpack type 0x{t:02x} not handled")


def mp_map(b, i, n):
    d = {}
    for _ in range(n):
        k, i = mp_decode(b, i)
        v, i = mp_decode(b, i)
        d[k if not isinstance(k, (list, dict)) else repr(k)] = v
    return d, i


def mp_arr(b, i, n):
    a = []
    for _ in range(n):
        v, i = mp_decode(b, i)
        a.append(v)
    return a, i


def block_hashes(obj, out):
    """Collect every integer under a key naming a block hash."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and "hash" in k and "parent" not in k:
                if isinstance(v, int):
                    out.append(v)
                elif isinstance(v, list):
                    out.extend(x for x in v if isinstance(x, int))
            block_hashes(v, out)
    elif isinstance(obj, list):
        for v in obj:
            block_hashes(v, out)
    elif isinstance(obj, (bytes, bytearray)):
        try:
            inner, _ = mp_decode(obj, 0)
            block_hashes(inner, out)
        except Exception:
            pass


class KvSubscriber(threading.Thread):
    """A plain NATS subscriber (stdlib socket) on the upstream nats-server,
    standing in for a KV router on another node. It reconnects every 20 ms
    while NATS is down and records the block hashes of kv-events it sees."""

    def __init__(self, port, out_path):
        super().__init__(daemon=True)
        self.port = port
        self.out = open(out_path, "a")
        self.seen = set()
        self.messages = 0
        self.connects = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                # Not `SUB >`: a wildcard subscriber on every subject answers
                # (by not answering) holdfastd's no-responders probe on
                # _HOLDFAST.probe.*, and the relay then declares NATS down.
                s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                          b'SUB namespace.*.component.*.endpoint.*.kv-events 1\r\nPING\r\n')
                self.connects.append(time.time())
                self._read(s)
            except OSError:
                pass
            finally:
                s.close()

    def _read(self, s):
        s.settimeout(0.3)
        buf = b""
        while not self.stop.is_set():
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            if not d:
                return
            buf += d
            while b"\r\n" in buf:
                line, rest = buf.split(b"\r\n", 1)
                if line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                    parts = line.split()
                    n = int(parts[-1])
                    if len(rest) < n + 2:
                        break
                    payload = rest[:n]
                    buf = rest[n + 2:]
                    if line.startswith(b"HMSG "):
                        hl = int(parts[-2])
                        payload = payload[hl:]
                    subj = parts[1].decode(errors="replace")
                    if subj.endswith("kv-events"):
                        self._event(subj, payload)
                else:
                    buf = rest
                    if line == b"PING":
                        s.sendall(b"PONG\r\n")

    def _event(self, subj, payload):
        hashes = []
        try:
            env, _ = mp_decode(payload, 0)
            block_hashes(env, hashes)
        except Exception as e:
            hashes = []
            env = {"decode_error": str(e)}
        with self.lock:
            self.messages += 1
            self.seen.update(hashes)
        self.out.write(json.dumps({"t": round(time.time(), 3), "who": "kvsub", "subject": subj,
                                   "hashes": hashes[:20]}) + "\n")
        self.out.flush()


# --------------------------------------------------------------------------
# Processes


class Proc:
    def __init__(self, name, argv, outdir, env=None):
        self.name = name
        self.argv = argv
        self.stdout_path = os.path.join(outdir, f"{name}.out")
        self.stderr_path = os.path.join(outdir, f"{name}.err")
        self.env = env
        self.p = None
        self.killed_by_us = False
        self.starts = 0

    def start(self):
        self.starts += 1
        self.killed_by_us = False
        out = open(self.stdout_path, "a")
        err = open(self.stderr_path, "a")
        self.p = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  env=self.env, start_new_session=True)
        out.close()
        err.close()
        return self

    @property
    def pid(self):
        return self.p.pid if self.p else None

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def kill9(self):
        if self.alive():
            self.killed_by_us = True
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)

    def stop(self, grace=5.0):
        if not self.alive():
            return
        self.killed_by_us = True
        os.kill(self.p.pid, signal.SIGTERM)
        try:
            self.p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)

    def exited_on_its_own(self):
        return self.p is not None and self.p.poll() is not None and not self.killed_by_us


def read_jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def notable_stderr(path, limit=12):
    """The ERROR/WARN/panic lines of a process's log, de-duplicated."""
    lines = []
    seen = set()
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = ANSI.sub("", line.rstrip())
                if re.search(r"\b(ERROR|WARN)\b|panicked|Traceback|Error:", line):
                    key = re.sub(r"^\S+\s+", "", line)  # drop the timestamp
                    key = re.sub(r"\d+", "N", key)[:160]
                    if key in seen:
                        continue
                    seen.add(key)
                    lines.append(line[:400])
    except FileNotFoundError:
        pass
    return lines[-limit:]


class Stack:
    """nats-server + etcd (+ holdfastd) for one (mode, fault) run."""

    def __init__(self, mode, args, outdir):
        self.mode = mode
        self.args = args
        self.outdir = outdir
        self.tmp = tempfile.mkdtemp(prefix=f"hf-dynamo-{mode}-")
        self.nats_port = free_port()
        self.etcd_port = free_port()
        self.etcd_peer = free_port()
        self.etcd_dir = os.path.join(self.tmp, "etcd")
        self.nats = Proc("nats-server", [args.nats_server, "-a", "127.0.0.1", "-p", str(self.nats_port)],
                         outdir)
        self.etcd = Proc("etcd", [
            args.etcd, "--name", "hf", "--data-dir", self.etcd_dir,
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
            "--initial-cluster", f"hf=http://127.0.0.1:{self.etcd_peer}",
        ], outdir)
        self.relay = None
        self.procs = []

    def start(self):
        self.nats.start()
        self.etcd.start()
        if not wait_tcp(self.nats_port, 10):
            raise RuntimeError("nats-server did not start")
        if not self.wait_etcd(20):
            raise RuntimeError("etcd did not start")
        if self.mode == "holdfast":
            self.metrics_port = free_port()
            self.nats_listen = free_port()
            self.etcd_listen = free_port()
            self.relay = Proc("holdfastd", [
                self.args.holdfastd, "--socket", os.path.join(self.tmp, "hf.sock"),
                "--data-dir", os.path.join(self.tmp, "hfdata"),
                "--nats", f"nats://127.0.0.1:{self.nats_port}",
                "--etcd", f"http://127.0.0.1:{self.etcd_port}",
                "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
                "--nats-listen", f"127.0.0.1:{self.nats_listen}",
                "--etcd-listen", f"127.0.0.1:{self.etcd_listen}",
            ], self.outdir, env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
            self.relay.start()
            ok = (wait_http_ok(f"http://127.0.0.1:{self.metrics_port}/readyz", 20)
                  and wait_tcp(self.nats_listen, 10) and wait_tcp(self.etcd_listen, 10))
            if not ok:
                raise RuntimeError("holdfastd did not become ready; see holdfastd.err")

    def wait_etcd(self, timeout):
        return wait_http_ok(f"http://127.0.0.1:{self.etcd_port}/health", timeout)

    def endpoints(self):
        if self.mode == "holdfast":
            return f"http://127.0.0.1:{self.etcd_listen}", f"nats://127.0.0.1:{self.nats_listen}"
        return f"http://127.0.0.1:{self.etcd_port}", f"nats://127.0.0.1:{self.nats_port}"

    def restart_etcd(self, wipe=False):
        if wipe:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
        self.etcd.start()
        return self.wait_etcd(30)

    def restart_nats(self):
        self.nats.start()
        return wait_tcp(self.nats_port, 10)

    def relay_status(self):
        if not self.relay:
            return None
        st, body = http_get(f"http://127.0.0.1:{self.metrics_port}/status")
        try:
            return json.loads(body) if st == 200 else {"error": body}
        except ValueError:
            return {"raw": body[:500]}

    def teardown(self):
        for p in self.procs:
            p.stop(grace=3)
        if self.relay:
            self.relay.stop(grace=8)
        self.etcd.stop()
        self.nats.stop()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# One (mode, fault) run


def dyn_env(stack, args, fault):
    etcd_url, nats_url = stack.endpoints()
    env = dict(os.environ)
    env.update({
        "ETCD_ENDPOINTS": etcd_url,
        "NATS_SERVER": nats_url,
        "DYN_DISCOVERY_BACKEND": "etcd",
        "DYN_REQUEST_PLANE": "nats" if fault == "nats_request_plane" else "tcp",
        # Keep the TCP request/response planes and the event plane on loopback.
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    })
    if fault == "kv_events":
        env["DYN_EVENT_PLANE"] = "nats"
    if args.lease_ttl:
        env["ETCD_LEASE_TTL"] = str(int(args.lease_ttl))
    return env


def wait_for(pred, timeout, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def run_one(mode, fault, args, results):
    outdir = os.path.join(results, mode, fault)
    os.makedirs(outdir, exist_ok=True)
    log(f"=== {mode} / {fault} -> {outdir}")
    stack = Stack(mode, args, outdir)
    marks = {}
    res = {"mode": mode, "fault": fault, "notes": []}
    kvsub = None
    try:
        stack.start()
        env = dyn_env(stack, args, fault)
        kv_cmd = os.path.join(stack.tmp, "kv-cmd")
        w1 = Proc("worker1", [args.python, os.path.join(HERE, "worker.py"), "--name", "w1"]
                  + (["--kv-events-file", kv_cmd] if fault == "kv_events" else []), outdir, env)
        w2 = Proc("worker2", [args.python, os.path.join(HERE, "worker.py"), "--name", "w2"], outdir, env)
        give_up = max(args.nats_outage, 10) + args.recovery + 30
        cl = Proc("client", [args.python, os.path.join(HERE, "client.py"),
                             "--interval", str(args.interval), "--give-up", str(give_up)], outdir, env)
        stack.procs = [cl, w1, w2]
        if fault == "kv_events":
            kvsub = KvSubscriber(stack.nats_port, os.path.join(outdir, "kvsub.out"))
            kvsub.start()
        w1.start()
        w2.start()
        if not wait_for(lambda: all(any(r.get("ev") == "registered" for r in read_jsonl(w.stdout_path))
                                    for w in (w1, w2)), 30):
            res["notes"].append("workers did not register within 30 s")
        cl.start()

        def client_ok_calls():
            return sum(1 for r in read_jsonl(cl.stdout_path) if r.get("ev") == "call" and r.get("ok"))

        if not wait_for(lambda: client_ok_calls() >= 5, 40):
            res["notes"].append("client made no successful calls before the fault")
            res["setup_failed"] = True
        time.sleep(args.baseline)
        instances = {}
        for w in (w1, w2):
            for r in read_jsonl(w.stdout_path):
                if r.get("ev") == "registered":
                    instances[w.name] = r.get("instance")
        res["instances"] = instances

        marks["fault_start"] = time.time()
        if fault == "etcd_outage":
            stack.etcd.kill9()
            log(f"etcd killed; down for {args.etcd_outage:.0f} s")
            time.sleep(args.etcd_outage)
            marks["fault_end"] = time.time()
            if not stack.restart_etcd():
                res["notes"].append("etcd did not come back")
        elif fault == "etcd_empty":
            stack.etcd.kill9()
            if not stack.restart_etcd(wipe=True):
                res["notes"].append("etcd did not come back")
            marks["fault_end"] = time.time()
            log("etcd restarted empty")
        elif fault == "worker_kill":
            w1.kill9()
            marks["fault_end"] = time.time()
            log(f"worker1 (instance {instances.get('worker1')}) killed -9")
        elif fault == "nats_request_plane":
            stack.nats.kill9()
            log(f"nats-server killed; down for {args.nats_outage:.0f} s")
            time.sleep(args.nats_outage)
            marks["fault_end"] = time.time()
            if not stack.restart_nats():
                res["notes"].append("nats-server did not come back")
        elif fault == "kv_events":
            n = args.kv_events
            _kv_publish(kv_cmd, w1, 1, 10)  # control batch: the subscriber sees events at all
            time.sleep(2)
            stack.nats.kill9()
            log(f"nats-server killed; publishing {n} KV events during a {args.nats_outage:.0f} s outage")
            time.sleep(min(2.0, args.nats_outage / 4))
            marks["kv_publish"] = time.time()
            _kv_publish(kv_cmd, w1, DURING_BASE, n)
            rest = args.nats_outage - (time.time() - marks["fault_start"])
            if rest > 0:
                time.sleep(rest)
            marks["fault_end"] = time.time()
            if not stack.restart_nats():
                res["notes"].append("nats-server did not come back")
        log(f"recovery: watching for {args.recovery:.0f} s")
        time.sleep(args.recovery)
        if fault == "kv_events":
            _kv_publish(kv_cmd, w1, AFTER_BASE, 10)  # control batch after recovery
            time.sleep(3)
        marks["end"] = time.time()
        res["relay_status_end"] = stack.relay_status()
    except Exception as e:
        res["notes"].append(f"harness error: {type(e).__name__}: {e}")
        log(f"harness error: {e}")
    finally:
        procs_exited = {p.name: (p.p.returncode if p.p else None)
                        for p in stack.procs if p.exited_on_its_own()}
        relay_exited = stack.relay.exited_on_its_own() if stack.relay else False
        stack.teardown()
        if kvsub:
            kvsub.stop.set()
            kvsub.join(timeout=2)
    res["marks"] = marks
    res["self_exits"] = procs_exited
    if relay_exited:
        res["notes"].append("holdfastd exited on its own; see holdfastd.err")
    analyse(res, outdir, kvsub, args)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    log(f"--- {mode}/{fault}: " + json.dumps({k: res.get(k) for k in
        ("failed", "calls", "exits", "dead_routed_s", "kv_lost", "hung", "ok_at_end")}))
    return res


def _kv_publish(cmd_path, worker, first, count):
    tmp = cmd_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{first} {count}")
    os.rename(tmp, cmd_path)
    # Wait (bounded) for the worker to report the batch.
    wait_for(lambda: any(r.get("ev") == "kv_published" and r.get("first") == first
                         for r in read_jsonl(worker.stdout_path)), 10 + count * 0.05)


def analyse(res, outdir, kvsub, args):
    marks = res["marks"]
    t0 = marks.get("fault_start")
    calls = [r for r in read_jsonl(os.path.join(outdir, "client.out")) if r.get("ev") == "call"]
    during = [r for r in calls if t0 and r.get("start", 0) >= t0]
    res["calls"] = len(during)
    res["failed"] = sum(1 for r in during if not r.get("ok"))
    res["hung"] = sum(1 for r in during if r.get("hung") or (r.get("latency") or 0) > HANG_S)
    errs = {}
    for r in during:
        if not r.get("ok"):
            e = re.sub(r"\d{6,}", "N", str(r.get("error")))[:300]
            errs[e] = errs.get(e, 0) + 1
    res["errors"] = sorted(errs.items(), key=lambda kv: -kv[1])[:8]
    # Expected calls (one per interval) vs made: a client that died makes none.
    if t0 and marks.get("end"):
        res["calls_expected"] = int((marks["end"] - t0) / args.interval)
    last = calls[-5:]
    res["ok_at_end"] = bool(last) and all(r.get("ok") for r in last) and \
        bool(marks.get("end")) and last[-1].get("t", 0) > marks["end"] - 3
    # Process exits: a process that printed "exiting" for a reason other than
    # our own signal, or that died without one.
    exits = {}
    for name in ("worker1", "worker2", "client"):
        for r in read_jsonl(os.path.join(outdir, f"{name}.out")):
            if r.get("ev") == "exiting" and r.get("reason") != "signal":
                exits[name] = {"t_rel": round(r["t"] - t0, 1) if t0 else None,
                               "reason": r.get("reason"), "error": r.get("error")}
    for name, rc in res.get("self_exits", {}).items():
        exits.setdefault(name, {"reason": f"process exited rc={rc}"})
    if res["fault"] == "worker_kill":
        exits.pop("worker1", None)  # killed by us
    res["exit_details"] = exits
    res["exits"] = len(exits)
    # Dead worker routing: seconds from the kill until the client's instance
    # list no longer holds it, and the start of the last call that failed.
    if res["fault"] == "worker_kill" and t0:
        dead = res.get("instances", {}).get("worker1")
        gone = None
        for r in during:
            k = r.get("known")
            if isinstance(k, list) and dead not in k:
                gone = r["t"] - t0
                break
        fails = [r for r in during if not r.get("ok")]
        last_fail = (fails[-1]["start"] - t0) if fails else 0.0
        res["dead_unlisted_s"] = round(gone, 1) if gone is not None else None
        res["dead_last_fail_s"] = round(last_fail, 1)
        window = marks.get("end", time.time()) - t0
        if gone is None:
            res["dead_routed_s"] = f">{window:.0f}"
        else:
            res["dead_routed_s"] = round(max(gone, last_fail), 1)
    if res["fault"] == "kv_events":
        pubs = [r for r in read_jsonl(os.path.join(outdir, "worker1.out")) if r.get("ev") == "kv_published"]
        res["kv_publish_reports"] = pubs
        if any(r.get("ev") == "kv_publisher_error" for r in read_jsonl(os.path.join(outdir, "worker1.out"))):
            res["kv_lost"] = "n/a (publisher unavailable)"
        elif kvsub is None:
            res["kv_lost"] = None
        else:
            seen = kvsub.seen
            n = args.kv_events
            during_seen = sum(1 for h in range(DURING_BASE, DURING_BASE + n) if h in seen)
            res["kv_control_before_seen"] = sum(1 for h in range(1, 11) if h in seen)
            res["kv_control_after_seen"] = sum(1 for h in range(AFTER_BASE, AFTER_BASE + 10) if h in seen)
            res["kv_published_during"] = n
            res["kv_seen_during"] = during_seen
            res["kv_lost"] = n - during_seen
            res["kv_subscriber_reconnects"] = [round(t - t0, 2) for t in kvsub.connects if t >= t0]
            if res["kv_control_before_seen"] == 0:
                res["notes"].append("the subscriber saw no control event before the outage: KV counts unreliable")
                res["kv_lost"] = f"{res['kv_lost']}?"
    res["stderr_notable"] = {name: notable_stderr(os.path.join(outdir, f"{name}.err"))
                             for name in ("worker1", "worker2", "client", "holdfastd")
                             if os.path.exists(os.path.join(outdir, f"{name}.err"))}


# --------------------------------------------------------------------------


def fmt(v):
    if v is None:
        return "-"
    return str(v)


def table(all_res, modes, faults):
    cols = ["failed/calls", "exits", "dead routed s", "KV lost", "hung", "ok at end"]
    head = "| fault | mode | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for fault in faults:
        for mode in modes:
            r = all_res.get((mode, fault))
            if r is None:
                continue
            fc = f"{r.get('failed')}/{r.get('calls')}"
            if r.get("calls_expected") and r.get("calls", 0) < 0.8 * r["calls_expected"]:
                fc += f" (of ~{r['calls_expected']} due)"
            ex = str(r.get("exits"))
            if r.get("exit_details"):
                ex += " (" + ", ".join(f"{k}@{v.get('t_rel')}s" for k, v in r["exit_details"].items()) + ")"
            kv = fmt(r.get("kv_lost"))
            after = r.get("kv_control_after_seen")
            if isinstance(after, int) and after < 10:
                kv += f" (+{10 - after}/10 published after recovery)"
            row = [fc, ex, fmt(r.get("dead_routed_s")), kv,
                   fmt(r.get("hung")), "yes" if r.get("ok_at_end") else "NO"]
            lines.append(f"| {fault} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--etcd-outage", type=parse_duration, default=parse_duration("5m"))
    ap.add_argument("--nats-outage", type=parse_duration, default=parse_duration("30s"))
    ap.add_argument("--recovery", type=parse_duration, default=parse_duration("30s"),
                    help="how long to keep watching after a fault ends")
    ap.add_argument("--baseline", type=parse_duration, default=parse_duration("5s"),
                    help="steady calls before each fault")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(FAULTS))
    ap.add_argument("--modes", default="direct,holdfast")
    ap.add_argument("--holdfastd", default=os.path.join(REPO, "target", "release", "holdfastd"))
    ap.add_argument("--python", default=os.environ.get("DYN_PYTHON", "/tmp/dynvenv/bin/python"))
    ap.add_argument("--nats-server", default=shutil.which("nats-server") or "/usr/sbin/nats-server")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "etcd")
    ap.add_argument("--lease-ttl", type=parse_duration, default=None,
                    help="ETCD_LEASE_TTL for the Dynamo processes (runtime default 30 s)")
    ap.add_argument("--interval", type=float, default=0.2, help="client call interval, seconds")
    ap.add_argument("--kv-events", type=int, default=100, help="KV events published during the NATS outage")
    ap.add_argument("--results", default=None, help="results dir (default benches/dynamo/results/<timestamp>)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep etcd/relay data dirs")
    args = ap.parse_args()

    faults = FAULTS if not args.only else [f.strip() for f in args.only.split(",") if f.strip()]
    for f in faults:
        if f not in FAULTS:
            ap.error(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("direct", "holdfast"):
            ap.error(f"unknown mode {m!r}")
    if "holdfast" in modes and not os.access(args.holdfastd, os.X_OK):
        ap.error(f"holdfastd not found at {args.holdfastd} (cargo build --release -p holdfast-broker)")
    results = args.results or os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(results, exist_ok=True)
    params = {k: v for k, v in vars(args).items()}
    params["argv"] = sys.argv
    params["started"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    with open(os.path.join(results, "params.json"), "w") as f:
        json.dump(params, f, indent=2)

    all_res = {}
    try:
        for fault in faults:
            for mode in modes:
                all_res[(mode, fault)] = run_one(mode, fault, args, results)
                with open(os.path.join(results, "table.md"), "w") as f:
                    f.write(table(all_res, modes, faults) + "\n")
    except KeyboardInterrupt:
        log("interrupted")
    t = table(all_res, modes, faults)
    print(f"\nDynamo real check ({params['started']}; etcd outage {args.etcd_outage:.0f} s, "
          f"NATS outage {args.nats_outage:.0f} s, lease TTL "
          f"{int(args.lease_ttl) if args.lease_ttl else 'runtime default (30 s)'}, interval {args.interval} s)\n")
    print(t)
    print("\nDetails (client error texts with counts, process exits, notes):")
    for (mode, fault), r in all_res.items():
        print(f"- {mode}/{fault}:")
        for text, n in r.get("errors") or []:
            print(f"    {n:5d} x {text}")
        for name, d in (r.get("exit_details") or {}).items():
            print(f"    exit: {name} at {d.get('t_rel')} s: {d.get('reason')} {d.get('error') or ''}")
        if fault == "worker_kill":
            print(f"    dead worker: unlisted after {r.get('dead_unlisted_s')} s, "
                  f"last failed call at {r.get('dead_last_fail_s')} s")
        if fault == "kv_events":
            print(f"    kv events: control before {r.get('kv_control_before_seen')}/10, during "
                  f"{r.get('kv_seen_during')}/{r.get('kv_published_during')}, control after "
                  f"{r.get('kv_control_after_seen')}/10")
        for note in r.get("notes") or []:
            print(f"    note: {note}")
    print(f"\nraw JSON lines and summaries: {results}")
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(t + "\n")
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump([v for v in all_res.values()], f, indent=2, default=str)


if __name__ == "__main__":
    main()
