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

The faults etcd_member_kill and nats_node_kill run on a 3-member etcd cluster
and a 3-node NATS cluster instead. With --secured, every holdfast-mode run
does, and those clusters are secured: NATS with TLS and decentralized JWT
auth (operator mode, in-memory resolver), etcd with TLS and client
certificates; holdfastd reaches them with a config file, the Dynamo processes
still use its plain loopback front ends. --secured needs the PyPI package
`nkeys` (ed25519 for the JWTs), which run.sh installs into the venv.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAULTS = ["etcd_outage", "etcd_empty", "worker_kill", "nats_request_plane", "kv_events",
          "etcd_member_kill", "nats_node_kill"]
# Faults that kill one member of a cluster: they always run on clusters.
CLUSTER_FAULTS = ("etcd_member_kill", "nats_node_kill")
# Faults whose worker1 publishes KV events on the NATS event plane.
KV_FAULTS = ("kv_events", "nats_node_kill")
CLUSTER_SIZE = 3
STATUS_EVERY = 0.2  # holdfastd /status sampling period, seconds
HANG_S = 2.0  # a call slower than this counts as hung
# Block hashes (= event numbers) of the KV events: 1..10 before the outage,
# DURING_BASE.. during it, AFTER_BASE..+10 after recovery.
DURING_BASE = 1_000_000
AFTER_BASE = 9_000_000
# nats_node_kill publishes one batch right after each of its two kills.
DURING2_BASE = 2_000_000


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


def http_get(url, timeout=1.0, context=None):
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status, r.read().decode(errors="replace")
    except Exception as e:
        return None, str(e)


def wait_http_ok(url, timeout, context=None):
    end = time.time() + timeout
    while time.time() < end:
        st, _ = http_get(url, context=context)
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
    """A plain NATS subscriber (stdlib socket) on one upstream nats-server,
    standing in for a KV router on another node. It reconnects every 20 ms
    while its server is down and records the block hashes of kv-events it
    sees. With `auth` (a SecuredUpstreams), it speaks TLS and authenticates
    with its own JWT user, signing the server's nonce."""

    def __init__(self, port, out_path, auth=None, name="kvsub"):
        super().__init__(daemon=True)
        self.port = port
        self.auth = auth
        self.name = name
        self.out = open(out_path, "a")
        self.seen = set()
        self.messages = 0
        self.connects = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _connect_line(self, s):
        """The CONNECT line; on a secured server also upgrades `s` to TLS.
        Returns (socket, line)."""
        if not self.auth:
            return s, b'CONNECT {"verbose":false,"pedantic":false}\r\n'
        s.settimeout(2)
        buf = b""
        while b"\r\n" not in buf and len(buf) < 65536:
            d = s.recv(4096)
            if not d:
                raise OSError("closed before INFO")
            buf += d
        line = buf.split(b"\r\n", 1)[0]
        if not line.startswith(b"INFO "):
            raise OSError(f"expected INFO, got {line[:80]!r}")
        info = json.loads(line[5:])
        s = self.auth.nats_client_tls().wrap_socket(s, server_hostname="127.0.0.1")
        jwt, sig = self.auth.kvsub_sign(info.get("nonce", ""))
        connect = {"verbose": False, "pedantic": False, "tls_required": True,
                   "jwt": jwt, "sig": sig, "name": self.name}
        return s, b"CONNECT " + json.dumps(connect).encode() + b"\r\n"

    def run(self):
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                s, connect = self._connect_line(s)
                # Not `SUB >`: a wildcard subscriber on every subject answers
                # (by not answering) holdfastd's no-responders probe on
                # _HOLDFAST.probe.*, and the relay then declares NATS down.
                s.sendall(connect + b'SUB namespace.*.component.*.endpoint.*.kv-events 1\r\nPING\r\n')
                self.connects.append(time.time())
                self._read(s)
            except (OSError, ValueError) as e:
                self._note(f"connection ended: {type(e).__name__}: {e}")
                time.sleep(0.02)
            finally:
                s.close()

    def _note(self, text):
        self.out.write(json.dumps({"t": round(time.time(), 3), "who": self.name, "port": self.port,
                                   "note": text[:300]}) + "\n")
        self.out.flush()

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
                    elif line.startswith(b"-ERR"):
                        self._note(line.decode(errors="replace"))

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
        self.out.write(json.dumps({"t": round(time.time(), 3), "who": self.name, "subject": subj,
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


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def secret_file(path, text):
    """Writes a file only its owner may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class SecuredUpstreams:
    """Certificates (holdfastd gen-cert) and NATS decentralized-auth material
    for one run: an operator, an application account, the system account,
    and two users of the account (holdfastd's and the KV subscribers'), signed
    as nats-io/jwt v2 does (header {"typ":"JWT","alg":"ed25519-nkey"},
    base64url without padding, ed25519 over header.claims), the way
    broker/tests/e2e/nats_jwt.rs does it in Rust."""

    def __init__(self, holdfastd, tmp):
        try:
            import nkeys  # PyPI nkeys (with PyNaCl): the JWTs need ed25519
        except ImportError:
            raise RuntimeError("--secured needs the PyPI package nkeys in this interpreter "
                               "(run.sh installs it into the venv)")
        self.nkeys = nkeys
        self.jti = 0
        self.dir = os.path.join(tmp, "secrets")
        os.makedirs(self.dir, mode=0o700)
        certs = os.path.join(self.dir, "certs")
        out = subprocess.run([holdfastd, "gen-cert", "--out", certs, "--client-cn", "relay"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"holdfastd gen-cert failed: {out.stderr.strip()}")
        self.ca = os.path.join(certs, "ca.pem")
        self.server_cert = os.path.join(certs, "server.pem")
        self.server_key = os.path.join(certs, "server.key")
        self.client_cert = os.path.join(certs, "client.pem")
        self.client_key = os.path.join(certs, "client.key")

        operator = self._keypair(nkeys.PREFIX_BYTE_OPERATOR)
        account = self._keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        system = self._keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        self.operator_jwt = self._sign(operator, self._pub(operator), "holdfast-dynamo-operator", {
            "type": "operator", "version": 2, "system_account": self._pub(system)})
        # Absent limits decode as 0, which nats-server enforces: unlimited.
        account_claims = {
            "type": "account", "version": 2,
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": True, "conn": -1, "leaf": -1},
            "default_permissions": {"pub": {}, "sub": {}},
        }
        self.account_pub = self._pub(account)
        self.account_jwt = self._sign(operator, self.account_pub, "dynamo", account_claims)
        self.system_pub = self._pub(system)
        self.system_jwt = self._sign(operator, self.system_pub, "SYS", account_claims)
        self.relay_jwt, self.relay_seed = self._user(account, "holdfastd")
        self.kvsub_jwt, self.kvsub_seed = self._user(account, "kv-subscriber")
        self._kvsub_key = nkeys.from_seed(self.kvsub_seed.encode())
        self.relay_creds = secret_file(os.path.join(self.dir, "holdfastd.creds"),
                                       self._creds(self.relay_jwt, self.relay_seed))
        self._nats_ctx = None

    def _keypair(self, prefix):
        return self.nkeys.from_seed(self.nkeys.encode_seed(os.urandom(32), prefix))

    @staticmethod
    def _pub(kp):
        return kp.public_key.decode()

    def _sign(self, issuer, subject, name, nats):
        self.jti += 1
        now = int(time.time())
        claims = {"jti": f"jti-{now}-{self.jti}", "iat": now, "iss": self._pub(issuer),
                  "sub": subject, "name": name, "nats": nats}
        header = b64url(b'{"typ":"JWT","alg":"ed25519-nkey"}')
        body = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{body}"
        return f"{signing_input}.{b64url(issuer.sign(signing_input.encode()))}"

    def _user(self, account, name):
        user = self._keypair(self.nkeys.PREFIX_BYTE_USER)
        # Absent limits decode as 0: no subscriptions and a 0-byte payload cap.
        jwt = self._sign(account, self._pub(user), name, {
            "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
        return jwt, user.seed.decode()

    @staticmethod
    def _creds(jwt, seed):
        return ("-----BEGIN NATS USER JWT-----\n" + jwt + "\n------END NATS USER JWT------\n\n"
                "************************* IMPORTANT *************************\n"
                "NKEY Seed printed below can be used to sign and prove identity.\n"
                "NKEYs are sensitive and should be treated as secrets.\n\n"
                "-----BEGIN USER NKEY SEED-----\n" + seed + "\n------END USER NKEY SEED------\n\n"
                "*************************************************************\n")

    def nats_server_config(self):
        """TLS for clients (no client certificates: users authenticate with
        JWTs) and operator mode with the in-memory resolver. Once a system
        account is named, it must be preloaded too."""
        return (f'tls {{\n  cert_file: "{self.server_cert}"\n  key_file: "{self.server_key}"\n'
                f'  ca_file: "{self.ca}"\n  verify: false\n  timeout: 2\n}}\n'
                f"operator: {self.operator_jwt}\n"
                f"system_account: {self.system_pub}\n"
                "resolver: MEMORY\n"
                f"resolver_preload: {{\n  {self.account_pub}: {self.account_jwt}\n"
                f"  {self.system_pub}: {self.system_jwt}\n}}\n")

    def etcd_flags(self):
        return ["--cert-file", self.server_cert, "--key-file", self.server_key,
                "--trusted-ca-file", self.ca, "--client-cert-auth"]

    def etcd_client_tls(self):
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx

    def nats_client_tls(self):
        if self._nats_ctx is None:
            self._nats_ctx = ssl.create_default_context(cafile=self.ca)
        return self._nats_ctx

    def kvsub_sign(self, nonce):
        return self.kvsub_jwt, b64url(self._kvsub_key.sign(nonce.encode()))

    def secrets(self):
        """(name, text) of every secret whose appearance in a log is a leak:
        the nkey seeds and each base64 line of the private keys' PEM bodies."""
        out = [("holdfastd user nkey seed (creds)", self.relay_seed),
               ("kv-subscriber user nkey seed", self.kvsub_seed)]
        for name, path in (("etcd client private key (client.key)", self.client_key),
                           ("server private key (server.key)", self.server_key)):
            with open(path) as f:
                body = [line.strip() for line in f if line.strip() and not line.startswith("-----")]
            out.extend((f"{name} PEM body line {i + 1}", line) for i, line in enumerate(body)
                       if len(line) >= 16)
        return out


class NatsNode:
    def __init__(self, index, proc, port, route_port=None, monitor_port=None):
        self.index = index
        self.proc = proc
        self.port = port
        self.route_port = route_port
        self.monitor_port = monitor_port

    def routes(self):
        """Distinct servers this node routes to, or None."""
        st, body = http_get(f"http://127.0.0.1:{self.monitor_port}/routez", timeout=1.0)
        if st != 200:
            return None
        try:
            return len({r.get("remote_id") for r in json.loads(body).get("routes") or []})
        except ValueError:
            return None


class EtcdMember:
    def __init__(self, index, name, proc, client_url, data_dir):
        self.index = index
        self.name = name
        self.proc = proc
        self.client_url = client_url
        self.data_dir = data_dir


class Stack:
    """nats-server(s) + etcd member(s) (+ holdfastd) for one (mode, fault) run:
    one of each, or, for the cluster faults and for --secured holdfast runs,
    3-node/3-member loopback clusters (secured with --secured)."""

    def __init__(self, mode, fault, args, outdir):
        self.mode = mode
        self.fault = fault
        self.args = args
        self.outdir = outdir
        self.tmp = tempfile.mkdtemp(prefix=f"hf-dynamo-{mode}-")
        self.secured = bool(args.secured) and mode == "holdfast"
        self.cluster = (fault in CLUSTER_FAULTS and mode == "holdfast") or self.secured
        self.sec = SecuredUpstreams(args.holdfastd, self.tmp) if self.secured else None
        self.etcd_ctx = self.sec.etcd_client_tls() if self.sec else None
        self.relay = None
        self.procs = []
        self.config_path = None
        # TOML for holdfastd (--config) on the single-server stack, e.g. a
        # [classes.kv_events] override (kv_router_check.py).
        self.relay_config_text = None
        if not self.cluster:
            # Exactly the original single-server stack.
            port = free_port()
            self.nats_nodes = [NatsNode(0, Proc("nats-server", [
                args.nats_server, "-a", "127.0.0.1", "-p", str(port)], outdir), port)]
            client, peer = free_port(), free_port()
            data = os.path.join(self.tmp, "etcd")
            self.etcd_members = [EtcdMember(0, "hf", Proc("etcd", [
                args.etcd, "--name", "hf", "--data-dir", data,
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"hf=http://127.0.0.1:{peer}",
            ], outdir), f"http://127.0.0.1:{client}", data)]
            return
        n = CLUSTER_SIZE
        ports = [free_port() for _ in range(n)]
        route_ports = [free_port() for _ in range(n)]
        monitor_ports = [free_port() for _ in range(n)]
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in route_ports)
        self.nats_nodes = []
        for i in range(n):
            conf = os.path.join(self.tmp, f"nats-{i}.conf")
            text = (f"server_name: n{i}\nlisten: \"127.0.0.1:{ports[i]}\"\n"
                    f"http: \"127.0.0.1:{monitor_ports[i]}\"\n"
                    f"cluster {{\n  name: holdfast-dynamo\n  listen: \"127.0.0.1:{route_ports[i]}\"\n"
                    f"  routes: [{routes}]\n}}\n")
            if self.sec:
                text += self.sec.nats_server_config()
            with open(conf, "w") as f:
                f.write(text)
            self.nats_nodes.append(NatsNode(i, Proc(f"nats-{i}", [args.nats_server, "-c", conf], outdir),
                                            ports[i], route_ports[i], monitor_ports[i]))
        scheme = "https" if self.sec else "http"
        clients = [free_port() for _ in range(n)]
        peers = [free_port() for _ in range(n)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peers[i]}" for i in range(n))
        token = f"hf-dynamo-{os.getpid()}-{free_port()}"
        self.etcd_members = []
        for i in range(n):
            url = f"{scheme}://127.0.0.1:{clients[i]}"
            data = os.path.join(self.tmp, f"etcd-{i}")
            argv = [args.etcd, "--name", f"m{i}", "--data-dir", data,
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", f"http://127.0.0.1:{peers[i]}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[i]}",
                    "--initial-cluster", initial, "--initial-cluster-token", token,
                    "--initial-cluster-state", "new"]
            if self.sec:
                argv += self.sec.etcd_flags()
            self.etcd_members.append(EtcdMember(i, f"m{i}", Proc(f"etcd-{i}", argv, outdir), url, data))

    # --- NATS

    def nats_urls(self):
        scheme = "tls" if self.sec else "nats"
        return [f"{scheme}://127.0.0.1:{n.port}" for n in self.nats_nodes]

    def nats_node_at(self, host_port):
        """The node listening on "127.0.0.1:PORT" (holdfastd's nats.server)."""
        try:
            port = int(str(host_port).rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None
        return next((n for n in self.nats_nodes if n.port == port), None)

    def wait_nats_routes(self, timeout):
        """Until every running node routes to every other running one."""
        if not self.cluster:
            return True
        running = [n for n in self.nats_nodes if n.proc.alive()]
        return bool(wait_for(lambda: all((n.routes() or 0) >= len(running) - 1 for n in running), timeout))

    def start_nats_node(self, node):
        node.proc.start()
        return wait_tcp(node.port, 10)

    def kill_nats(self):
        for n in self.nats_nodes:
            n.proc.kill9()

    def restart_nats(self):
        ok = all([self.start_nats_node(n) for n in self.nats_nodes])
        return ok and self.wait_nats_routes(15)

    # --- etcd

    def etcd_urls(self):
        return [m.client_url for m in self.etcd_members]

    def etcd_member_healthy(self, member):
        st, _ = http_get(member.client_url + "/health", context=self.etcd_ctx)
        return st == 200

    def wait_etcd(self, timeout, members=None):
        members = members or self.etcd_members
        return bool(wait_for(lambda: all(self.etcd_member_healthy(m) for m in members), timeout))

    def etcd_leader(self):
        """The member whose /metrics says etcd_server_is_leader 1, or None."""
        for m in self.etcd_members:
            if not m.proc.alive():
                continue
            st, body = http_get(m.client_url + "/metrics", context=self.etcd_ctx)
            if st == 200 and re.search(r"^etcd_server_is_leader 1(\.0)?$", body, re.M):
                return m
        return None

    def kill_etcd(self):
        for m in self.etcd_members:
            m.proc.kill9()

    def restart_etcd(self, wipe=False):
        for m in self.etcd_members:
            if wipe:
                shutil.rmtree(m.data_dir, ignore_errors=True)
            m.proc.start()
        return self.wait_etcd(30)

    # --- all

    def start(self):
        for n in self.nats_nodes:
            n.proc.start()
        for m in self.etcd_members:
            m.proc.start()
        if not all(wait_tcp(n.port, 10) for n in self.nats_nodes):
            raise RuntimeError("nats-server did not start")
        if not self.wait_nats_routes(20):
            raise RuntimeError("the NATS cluster's routes did not form")
        if not self.wait_etcd(30):
            raise RuntimeError("etcd did not start")
        if self.mode != "holdfast":
            return
        self.metrics_port = free_port()
        self.nats_listen = free_port()
        self.etcd_listen = free_port()
        argv = [self.args.holdfastd, "--socket", os.path.join(self.tmp, "hf.sock"),
                "--data-dir", os.path.join(self.tmp, "hfdata"),
                "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
                "--nats-listen", f"127.0.0.1:{self.nats_listen}",
                "--etcd-listen", f"127.0.0.1:{self.etcd_listen}"]
        if self.cluster:
            self.config_path = self.write_relay_config()
            argv += ["--config", self.config_path]
        else:
            argv += ["--nats", self.nats_urls()[0], "--etcd", self.etcd_urls()[0]]
            if self.relay_config_text:
                self.config_path = os.path.join(self.tmp, "holdfast.toml")
                with open(self.config_path, "w") as f:
                    f.write(self.relay_config_text)
                shutil.copy(self.config_path, os.path.join(self.outdir, "holdfast.toml"))
                argv += ["--config", self.config_path]
        self.relay = Proc("holdfastd", argv, self.outdir,
                          env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        self.relay.start()
        ok = (wait_http_ok(f"http://127.0.0.1:{self.metrics_port}/readyz", 20)
              and wait_tcp(self.nats_listen, 10) and wait_tcp(self.etcd_listen, 10))
        if not ok:
            raise RuntimeError("holdfastd did not become ready; see holdfastd.err")
        if self.cluster:
            def links_up():
                st = self.relay_status() or {}
                return ((st.get("nats") or {}).get("status") == "up"
                        and (st.get("etcd") or {}).get("status") == "up")
            if not wait_for(links_up, 30):
                raise RuntimeError(f"holdfastd's links did not come up: {self.relay_status()}")

    def write_relay_config(self):
        """holdfastd's config for the clusters: every node and member listed;
        with --secured, TLS (CA), JWT creds for NATS and a client certificate
        for etcd."""
        q = json.dumps  # a TOML basic string is a JSON string here (paths, URLs)
        lines = ["[nats]", "servers = [" + ", ".join(q(u) for u in self.nats_urls()) + "]"]
        if self.sec:
            lines += [f"tls_ca = {q(self.sec.ca)}", f"creds_file = {q(self.sec.relay_creds)}"]
        lines += ["", "[etcd]", "endpoints = [" + ", ".join(q(u) for u in self.etcd_urls()) + "]"]
        if self.sec:
            lines += [f"tls_ca = {q(self.sec.ca)}", f"tls_cert = {q(self.sec.client_cert)}",
                      f"tls_key = {q(self.sec.client_key)}"]
        path = os.path.join(self.tmp, "holdfast.toml")
        secret_file(path, "\n".join(lines) + "\n")
        # A copy without secrets (there are none in it: only paths) for the results.
        shutil.copy(path, os.path.join(self.outdir, "holdfast.toml"))
        return path

    def endpoints(self):
        if self.mode == "holdfast":
            return f"http://127.0.0.1:{self.etcd_listen}", f"nats://127.0.0.1:{self.nats_listen}"
        # Direct mode always has the single server and member (main() skips
        # the cluster faults in direct mode; --secured is holdfast-only).
        return self.etcd_urls()[0], self.nats_urls()[0]

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
        for m in self.etcd_members:
            m.proc.stop()
        for n in self.nats_nodes:
            n.proc.stop()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class StatusSampler(threading.Thread):
    """Reads holdfastd's /status every STATUS_EVERY s into status.jsonl."""

    def __init__(self, stack, path):
        super().__init__(daemon=True)
        self.stack = stack
        self.out = open(path, "a")
        self.samples = []
        self.stop = threading.Event()
        # Each whole /status document is searched for the secrets too.
        self.secrets = stack.sec.secrets() if stack.sec else []
        self.secret_hits = {}

    def run(self):
        while not self.stop.is_set():
            t = time.time()
            code, body = http_get(f"http://127.0.0.1:{self.stack.metrics_port}/status")
            for what, secret in self.secrets:
                if secret in body:
                    self.secret_hits[what] = self.secret_hits.get(what, 0) + 1
            try:
                st = json.loads(body) if code == 200 else {"error": body}
            except ValueError:
                st = {"raw": body[:500]}
            nats = st.get("nats") or {}
            etcd = st.get("etcd") or {}
            rec = {"t": round(t, 3), "nats": nats.get("status"), "nats_server": nats.get("server"),
                   "nats_reachable": nats.get("reachable_servers"), "nats_outages": nats.get("outages"),
                   "etcd": etcd.get("status"), "etcd_endpoint": etcd.get("endpoint"),
                   "etcd_switches": etcd.get("member_switches"), "etcd_outages": etcd.get("outages"),
                   "etcd_members": {m.get("endpoint"): m.get("health") for m in etcd.get("members") or []},
                   "etcd_pending": etcd.get("pending_changes")}
            if "error" in st or "raw" in st or not st:
                rec["error"] = str(st.get("error") or st.get("raw") or "no answer")[:200]
            self.samples.append(rec)
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()
            self.stop.wait(max(0.0, STATUS_EVERY - (time.time() - t)))


# --------------------------------------------------------------------------
# One (mode, fault) run


def dyn_env(stack, args, fault):
    etcd_url, nats_url = stack.endpoints()
    env = dict(os.environ)
    env.update({
        "ETCD_ENDPOINTS": etcd_url,
        "NATS_SERVER": nats_url,
        "DYN_DISCOVERY_BACKEND": "etcd",
        "DYN_REQUEST_PLANE": "nats" if fault in ("nats_request_plane", "nats_node_kill") else "tcp",
        # Keep the TCP request/response planes and the event plane on loopback.
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    })
    if fault in KV_FAULTS:
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
    marks = {}
    res = {"mode": mode, "fault": fault, "notes": [], "kills": []}
    kvsubs = []
    sampler = None
    stack = None
    try:
        stack = Stack(mode, fault, args, outdir)
        res["secured"] = stack.secured
        res["cluster"] = stack.cluster
        stack.start()
        if stack.relay:
            sampler = StatusSampler(stack, os.path.join(outdir, "status.jsonl"))
            sampler.start()
        env = dyn_env(stack, args, fault)
        kv_cmd = os.path.join(stack.tmp, "kv-cmd")
        w1 = Proc("worker1", [args.python, os.path.join(HERE, "worker.py"), "--name", "w1"]
                  + (["--kv-events-file", kv_cmd] if fault in KV_FAULTS else []), outdir, env)
        w2 = Proc("worker2", [args.python, os.path.join(HERE, "worker.py"), "--name", "w2"], outdir, env)
        give_up = max(args.nats_outage, 10) + args.recovery + 30
        cl = Proc("client", [args.python, os.path.join(HERE, "client.py"),
                             "--interval", str(args.interval), "--give-up", str(give_up)], outdir, env)
        stack.procs = [cl, w1, w2]
        if fault in KV_FAULTS:
            # One subscriber per node: whichever nodes are up, every event
            # routed through the cluster reaches at least one of them.
            for node in stack.nats_nodes:
                sub = KvSubscriber(node.port, os.path.join(outdir, "kvsub.out"), auth=stack.sec,
                                   name=f"kvsub-{node.index}")
                sub.start()
                kvsubs.append(sub)
            if not wait_for(lambda: all(sub.connects for sub in kvsubs), 10):
                res["notes"].append("a KV subscriber did not connect within 10 s; see kvsub.out")
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
            stack.kill_etcd()
            log(f"etcd killed; down for {args.etcd_outage:.0f} s")
            time.sleep(args.etcd_outage)
            marks["fault_end"] = time.time()
            if not stack.restart_etcd():
                res["notes"].append("etcd did not come back")
        elif fault == "etcd_empty":
            stack.kill_etcd()
            if not stack.restart_etcd(wipe=True):
                res["notes"].append("etcd did not come back")
            marks["fault_end"] = time.time()
            log("etcd restarted empty")
        elif fault == "worker_kill":
            w1.kill9()
            marks["fault_end"] = time.time()
            log(f"worker1 (instance {instances.get('worker1')}) killed -9")
        elif fault == "nats_request_plane":
            stack.kill_nats()
            log(f"nats-server killed; down for {args.nats_outage:.0f} s")
            time.sleep(args.nats_outage)
            marks["fault_end"] = time.time()
            if not stack.restart_nats():
                res["notes"].append("nats-server did not come back")
        elif fault == "kv_events":
            n = args.kv_events
            _kv_publish(kv_cmd, w1, 1, 10)  # control batch: the subscriber sees events at all
            time.sleep(2)
            stack.kill_nats()
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
        elif fault == "etcd_member_kill":
            _etcd_member_kill(stack, args, res, marks)
        elif fault == "nats_node_kill":
            _nats_node_kill(stack, args, res, marks, kv_cmd, w1)
        log(f"recovery: watching for {args.recovery:.0f} s")
        time.sleep(args.recovery)
        if fault in KV_FAULTS:
            _kv_publish(kv_cmd, w1, AFTER_BASE, 10)  # control batch after recovery
            time.sleep(3)
        marks["end"] = time.time()
        res["relay_status_end"] = stack.relay_status()
        if stack.relay:
            code, body = http_get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=3)
            with open(os.path.join(outdir, "holdfastd-metrics-end.txt"), "w") as f:
                f.write(body)
            res["relay_limit_rejections"] = re.findall(r"^holdfast_limit_rejections_total\{[^}]*\} \S+", body, re.M)
    except Exception as e:
        res["notes"].append(f"harness error: {type(e).__name__}: {e}")
        log(f"harness error: {e}")
    finally:
        procs_exited = {}
        relay_exited = False
        if stack:
            procs_exited = {p.name: (p.p.returncode if p.p else None)
                            for p in stack.procs if p.exited_on_its_own()}
            relay_exited = stack.relay.exited_on_its_own() if stack.relay else False
            upstream_exited = [p.proc.name for p in stack.nats_nodes + stack.etcd_members
                               if p.proc.exited_on_its_own()]
            if upstream_exited:
                res["notes"].append(f"upstream processes exited on their own: {upstream_exited}")
        if sampler:
            sampler.stop.set()
            sampler.join(timeout=3)
        secrets = stack.sec.secrets() if stack and stack.sec else None
        if stack:
            stack.teardown()
        for sub in kvsubs:
            sub.stop.set()
            sub.join(timeout=2)
    res["marks"] = marks
    res["self_exits"] = procs_exited
    if relay_exited:
        res["notes"].append("holdfastd exited on its own; see holdfastd.err")
    res["status_samples"] = sampler.samples if sampler else None
    if secrets is not None:
        res["secrets_found"] = scan_secrets(secrets, outdir)
        res["secrets_found"] += [{"file": "/status (every sample)", "secret": what, "samples": k}
                                 for what, k in sampler.secret_hits.items()] if sampler else []
        res["secrets_checked"] = len(secrets)
    analyse(res, outdir, kvsubs, args)
    res.pop("status_samples", None)  # in status.jsonl
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    log(f"--- {mode}/{fault}: " + json.dumps({k: res.get(k) for k in
        ("failed", "calls", "exits", "dead_routed_s", "kv_lost", "hung", "ok_at_end",
         "etcd_not_up", "nats_moved_s", "secrets_found") if k in res}))
    return res


def port_of(url):
    m = re.search(r":(\d+)/?$", str(url or ""))
    return int(m.group(1)) if m else None


def _etcd_member_kill(stack, args, res, marks):
    """SIGKILL the etcd leader, keep it down for --etcd-outage, restart it;
    then the same with a follower: the one holdfastd's calls go to if they
    go to a follower, else one not killed yet. If neither kill hit the
    member holdfastd's calls went to, a third round kills that member, so
    the relay's own member failover is exercised in every run."""
    hit_in_use = False
    killed = set()
    for role in ("leader", "follower", "in use"):
        leader = wait_for(stack.etcd_leader, 10)
        if leader is None:
            res["notes"].append(f"no etcd leader found before the {role} kill")
        st = stack.relay_status() or {}
        in_use = (st.get("etcd") or {}).get("endpoint")
        in_use_member = next((m for m in stack.etcd_members
                              if port_of(m.client_url) == port_of(in_use)), None)
        if role == "leader":
            victim = leader or stack.etcd_members[0]
        elif role == "follower":
            followers = [m for m in stack.etcd_members if m is not leader and m.proc.alive()]
            victim = (in_use_member if in_use_member in followers else
                      next((m for m in followers if m.name not in killed),
                           followers[0] if followers else stack.etcd_members[0]))
        else:
            if hit_in_use:
                break
            if in_use_member is None:
                res["notes"].append(f"holdfastd's etcd.endpoint {in_use!r} is no member")
                break
            victim = in_use_member
            role = "leader, in use" if victim is leader else "follower, in use"
        killed.add(victim.name)
        hit_in_use = hit_in_use or victim is in_use_member
        t = time.time()
        victim.proc.kill9()
        kill = {"what": f"etcd {role} {victim.name}", "member": victim.name, "url": victim.client_url,
                "t": t, "relay_on_before": in_use,
                "relay_was_on_it": port_of(in_use) == port_of(victim.client_url)}
        log(f"etcd {role} {victim.name} ({victim.client_url}) killed -9; holdfastd's calls went to "
            f"{in_use}; down for {args.etcd_outage:.0f} s")
        after = wait_for(stack.etcd_leader, 10)
        kill["new_leader"] = after.name if after else None
        kill["new_leader_after_s"] = round(time.time() - t, 1) if after else None
        rest = args.etcd_outage - (time.time() - t)
        if rest > 0:
            time.sleep(rest)
        st = stack.relay_status() or {}
        kill["relay_on_during"] = (st.get("etcd") or {}).get("endpoint")
        kill["restart_t"] = time.time()
        victim.proc.start()
        if not stack.wait_etcd(30, [victim]):
            res["notes"].append(f"etcd member {victim.name} did not come back within 30 s")
        kill["back_t"] = time.time()
        log(f"etcd {victim.name} back after {kill['back_t'] - kill['restart_t']:.1f} s")
        res["kills"].append(kill)
        time.sleep(2)
    marks["fault_end"] = time.time()


def _nats_node_kill(stack, args, res, marks, kv_cmd, w1):
    """SIGKILL the NATS node holdfastd is connected to and publish
    --kv-events KV events at once (during the failover); restart the node
    after --nats-outage; then the same with the node holdfastd moved to."""
    n = args.kv_events
    _kv_publish(kv_cmd, w1, 1, 10)  # control batch: the subscribers see events at all
    time.sleep(2)
    for base in (DURING_BASE, DURING2_BASE):
        st = stack.relay_status() or {}
        server = (st.get("nats") or {}).get("server")
        node = stack.nats_node_at(server)
        if node is None:
            res["notes"].append(f"holdfastd's nats.server {server!r} is no node of the cluster")
            node = next(nd for nd in stack.nats_nodes if nd.proc.alive())
        t = time.time()
        node.proc.kill9()
        kill = {"what": f"NATS node n{node.index} (in use)", "node": node.index,
                "server_before": server, "t": t}
        log(f"NATS node n{node.index} (127.0.0.1:{node.port}, holdfastd's) killed -9; publishing {n} "
            f"KV events at once; down for {args.nats_outage:.0f} s")
        _kv_publish(kv_cmd, w1, base, n)
        kill["kv_published_s"] = round(time.time() - t, 2)
        rest = args.nats_outage - (time.time() - t)
        if rest > 0:
            time.sleep(rest)
        st = stack.relay_status() or {}
        kill["server_during"] = (st.get("nats") or {}).get("server")
        kill["restart_t"] = time.time()
        if not stack.start_nats_node(node):
            res["notes"].append(f"NATS node n{node.index} did not come back")
        if not stack.wait_nats_routes(15):
            res["notes"].append(f"the NATS routes did not re-form after n{node.index} came back")
        kill["back_t"] = time.time()
        res["kills"].append(kill)
        time.sleep(2)
    marks["fault_end"] = time.time()


def scan_secrets(secrets, outdir):
    """Which secret appears in holdfastd's stdout, stderr or /status samples."""
    found = []
    for name in ("holdfastd.err", "holdfastd.out", "status.jsonl"):
        try:
            with open(os.path.join(outdir, name), errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        for what, secret in secrets:
            if secret and secret in text:
                found.append({"file": name, "secret": what})
    return found


def write_command(path, text):
    """Leaves `text` in a command file a worker or router polls, whole:
    written beside it, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def write_results(results, table_text, all_res):
    """table.md and summary.json in the results directory."""
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(table_text + "\n")
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump([v for v in all_res.values()], f, indent=2, default=str)


def _kv_publish(cmd_path, worker, first, count):
    write_command(cmd_path, f"{first} {count}")
    # Wait (bounded) for the worker to report the batch.
    wait_for(lambda: any(r.get("ev") == "kv_published" and r.get("first") == first
                         for r in read_jsonl(worker.stdout_path)), 10 + count * 0.05)


def analyse(res, outdir, kvsubs, args):
    marks = res["marks"]
    t0 = marks.get("fault_start")
    calls = [r for r in read_jsonl(os.path.join(outdir, "client.out")) if r.get("ev") == "call"]
    # A call started after the end mark was cut short by the teardown's
    # SIGTERM, not by a fault: outside the window.
    if marks.get("end"):
        res["calls_after_end"] = sum(1 for r in calls if r.get("start", 0) >= marks["end"])
        calls = [r for r in calls if r.get("start", 0) < marks["end"]]
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
    if res["fault"] in KV_FAULTS:
        pubs = [r for r in read_jsonl(os.path.join(outdir, "worker1.out")) if r.get("ev") == "kv_published"]
        res["kv_publish_reports"] = pubs
        if any(r.get("ev") == "kv_publisher_error" for r in read_jsonl(os.path.join(outdir, "worker1.out"))):
            res["kv_lost"] = "n/a (publisher unavailable)"
        elif not kvsubs:
            res["kv_lost"] = None
        else:
            seen = set()
            for sub in kvsubs:
                seen |= sub.seen
            n = args.kv_events
            bases = (DURING_BASE,) if res["fault"] == "kv_events" else (DURING_BASE, DURING2_BASE)
            during_seen = sum(1 for b in bases for h in range(b, b + n) if h in seen)
            res["kv_control_before_seen"] = sum(1 for h in range(1, 11) if h in seen)
            res["kv_control_after_seen"] = sum(1 for h in range(AFTER_BASE, AFTER_BASE + 10) if h in seen)
            res["kv_published_during"] = n * len(bases)
            res["kv_seen_during"] = during_seen
            res["kv_lost"] = n * len(bases) - during_seen
            res["kv_subscriber_reconnects"] = {sub.name: [round(t - t0, 2) for t in sub.connects if t >= t0]
                                               for sub in kvsubs}
            if res["kv_control_before_seen"] == 0:
                res["notes"].append("the subscriber saw no control event before the outage: KV counts unreliable")
                res["kv_lost"] = f"{res['kv_lost']}?"
    samples = res.get("status_samples")
    if samples and t0:
        window = [r for r in samples if t0 <= r["t"] <= marks.get("end", time.time())]
        res["status_samples_in_fault"] = len(window)
        res["status_unanswered"] = sum(1 for r in window if r.get("error"))
        if res["fault"] == "etcd_member_kill" or res.get("cluster"):
            bad = [r for r in window if r.get("etcd") != "up"]
            res["etcd_not_up"] = len(bad)
            res["etcd_not_up_samples"] = bad[:30]
            res["etcd_outages_counted"] = (window[-1].get("etcd_outages") if window else None)
        if res["fault"] == "nats_node_kill" or res.get("cluster"):
            bad = [r for r in window if r.get("nats") != "up"]
            res["nats_not_up"] = len(bad)
            res["nats_not_up_samples"] = bad[:30]
        for kill in res.get("kills") or []:
            later = [r for r in samples if r["t"] >= kill["t"]]
            if "server_before" in kill:
                moved = next((r for r in later if r.get("nats") == "up" and r.get("nats_server")
                              and r["nats_server"] != kill["server_before"]), None)
                kill["moved_to"] = moved["nats_server"] if moved else None
                kill["moved_after_s"] = round(moved["t"] - kill["t"], 2) if moved else None
            if "member" in kill:
                moved = next((r for r in later if r.get("etcd_endpoint")
                              and port_of(r["etcd_endpoint"]) != port_of(kill["url"])), None)
                kill["relay_on_after_kill"] = moved["etcd_endpoint"] if moved else None
                kill["relay_moved_after_s"] = (round(moved["t"] - kill["t"], 2)
                                               if moved and kill.get("relay_was_on_it") else None)
                # When /status shows the restarted member serving again.
                health = [(r["t"], (r.get("etcd_members") or {}).get(kill["url"])) for r in later]
                seen_down = next((t for t, h in health if h and h != "serving"), None)
                back = next((t for t, h in health if h == "serving" and kill.get("back_t")
                             and t >= kill["back_t"]), None)
                kill["status_saw_member_down_s"] = round(seen_down - kill["t"], 2) if seen_down else None
                kill["status_shows_member_serving_s_after_back"] = (
                    round(back - kill["back_t"], 2) if back else None)
                kill["member_health_in_last_sample"] = health[-1][1] if health else None
        if res["fault"] == "nats_node_kill":
            res["nats_moved_s"] = [k.get("moved_after_s") for k in res.get("kills") or []]
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
    # Columns of the cluster/secured runs, only when there are such runs.
    upstream = any(r.get("cluster") for r in all_res.values())
    if upstream:
        cols += ["etcd not up (samples)", "NATS moved s", "secret in log"]
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
            if isinstance(r.get("kv_published_during"), int) and isinstance(r.get("kv_lost"), int):
                kv = f"{r['kv_lost']} of {r['kv_published_during']}" + kv[len(str(r["kv_lost"])):]
            row = [fc, ex, fmt(r.get("dead_routed_s")), kv,
                   fmt(r.get("hung")), "yes" if r.get("ok_at_end") else "NO"]
            if upstream:
                if r.get("cluster") and r.get("etcd_not_up") is not None:
                    row.append(f"{r['etcd_not_up']} of {r.get('status_samples_in_fault')}")
                else:
                    row.append("-")
                moved = r.get("nats_moved_s")
                row.append(", ".join(fmt(v) for v in moved) if moved else "-")
                found = r.get("secrets_found")
                row.append("-" if found is None else ("none" if not found else
                           "FOUND: " + "; ".join(f"{x['secret']} in {x['file']}" for x in found)))
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
    deps_nats = os.path.join(REPO, ".deps", "bin", "nats-server")  # deploy/install-deps.sh: 2.15.1
    ap.add_argument("--nats-server", default=deps_nats if os.access(deps_nats, os.X_OK)
                    else shutil.which("nats-server") or "/usr/sbin/nats-server")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "etcd")
    ap.add_argument("--lease-ttl", type=parse_duration, default=None,
                    help="ETCD_LEASE_TTL for the Dynamo processes (runtime default 30 s)")
    ap.add_argument("--interval", type=float, default=0.2, help="client call interval, seconds")
    ap.add_argument("--kv-events", type=int, default=100, help="KV events published during the NATS outage")
    ap.add_argument("--results", default=None, help="results dir (default benches/dynamo/results/<timestamp>)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep etcd/relay data dirs")
    ap.add_argument("--secured", action="store_true",
                    help="holdfast mode: 3-node NATS cluster with TLS + JWT auth and 3-member etcd "
                         "cluster with TLS + client certificates (needs PyPI nkeys)")
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
    if args.secured and "holdfast" in modes:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            ap.error("--secured needs the PyPI package nkeys (run.sh installs it into the venv)")
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
                if mode == "direct" and fault in CLUSTER_FAULTS:
                    # ai-dynamo-runtime 1.6.1 does not start with several
                    # servers in NATS_SERVER ("Failed to connect to NATS").
                    log(f"=== direct / {fault}: skipped (cluster faults run in holdfast mode only)")
                    continue
                all_res[(mode, fault)] = run_one(mode, fault, args, results)
                with open(os.path.join(results, "table.md"), "w") as f:
                    f.write(table(all_res, modes, faults) + "\n")
    except KeyboardInterrupt:
        log("interrupted")
    t = table(all_res, modes, faults)
    print(f"\nDynamo real check ({params['started']}; {'secured clusters in holdfast mode; ' if args.secured else ''}"
          f"etcd outage {args.etcd_outage:.0f} s, "
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
        for k in r.get("kills") or []:
            if "member" in k:
                print(f"    {k['what']}: holdfastd's etcd calls on {k.get('relay_on_before')} before, "
                      f"{k.get('relay_on_during')} during; new leader {k.get('new_leader')} "
                      f"after {k.get('new_leader_after_s')} s; restarted member healthy in "
                      f"{round(k['back_t'] - k['restart_t'], 1) if k.get('back_t') else '?'} s; "
                      f"/status shows it serving {k.get('status_shows_member_serving_s_after_back')} s "
                      f"after that (last sample: {k.get('member_health_in_last_sample')})")
            else:
                print(f"    {k['what']}: holdfastd on {k.get('server_before')} -> {k.get('moved_to')} "
                      f"after {k.get('moved_after_s')} s (status sampled every {STATUS_EVERY} s)")
        if r.get("etcd_not_up") is not None:
            print(f"    etcd not up in {r['etcd_not_up']} of {r.get('status_samples_in_fault')} /status "
                  f"samples from the fault to the end ({r.get('status_unanswered')} unanswered)")
            for smp in r.get("etcd_not_up_samples") or []:
                print(f"      {json.dumps(smp)}")
        if r.get("nats_not_up"):
            print(f"    NATS not up in {r['nats_not_up']} of {r.get('status_samples_in_fault')} samples")
            for smp in r.get("nats_not_up_samples") or []:
                print(f"      {json.dumps(smp)}")
        if r.get("secrets_found") is not None:
            print(f"    secrets searched in holdfastd's log and /status: {r.get('secrets_checked')}; "
                  f"found: {r['secrets_found'] or 'none'}")
        if fault in KV_FAULTS:
            print(f"    kv events: control before {r.get('kv_control_before_seen')}/10, during "
                  f"{r.get('kv_seen_during')}/{r.get('kv_published_during')}, control after "
                  f"{r.get('kv_control_after_seen')}/10")
        for note in r.get("notes") or []:
            print(f"    note: {note}")
    print(f"\nraw JSON lines and summaries: {results}")
    write_results(results, t, all_res)


if __name__ == "__main__":
    main()
