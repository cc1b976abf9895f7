#!/usr/bin/env python3
"""Starts `tollgate serve`, opens N connections that each send part of the
HTTP/2 preface, holds them HOLD seconds, and reports the gateway's CPU
(utime+stime from /proc/<pid>/stat) over that time as % of one core, and
how long /healthz then takes on a fresh connection.

    python3 benches/load/halfopen.py target/debug/tollgate config/tollgate.toml [N] [HOLD]

HOLD stays under the 30 s head timeout, after which the gateway drops the
connections."""
import os, resource, socket, subprocess, sys, time

binary, config = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
hold = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
env = dict(os.environ, RUST_LOG="warn", NO_COLOR="1")
def free_port():
    """A port nothing listens on, below the ephemeral range."""
    while True:
        candidate = 20000 + int.from_bytes(os.urandom(2), "big") % 12000
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", candidate)) != 0:
                return candidate

port = free_port()
gw = subprocess.Popen([binary, "serve", "--config", config, "--listen", f"127.0.0.1:{port}"],
                      env=env, stderr=subprocess.DEVNULL,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{gw.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError:
        time.sleep(0.1)
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"PRI * HTTP/2.0\r\n")  # 16 of the preface's 24 bytes
    socks.append(s)
time.sleep(1)
c0, t0 = cpu(), time.time()
time.sleep(hold)
c1, t1 = cpu(), time.time()
# Still served: a request on a fresh connection answers.
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
started = time.time(); answer = s.recv(100); latency = time.time() - started
status = answer.split(b"\r\n")[0].decode()
print(f"{n} half-preface connections held {t1-t0:.1f} s: gateway CPU {100*(c1-c0)/(t1-t0):.1f}% of a core;"
      f" /healthz answered in {latency*1000:.1f} ms ({status})")
for s in socks: s.close()
gw.terminate(); gw.wait()
