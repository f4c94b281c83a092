"""Child process of the kill -9 and out-of-memory cases: opens `Studio(db)` on the embedded model as the app does.

1. Out of memory: the largest generation the API allows (8 completions, a ~3900-token prompt, 4096 new tokens)
   under an address-space cap (RLIMIT_AS) of 160 MB above what the fresh process uses, then the cap is lifted:
       OOM <exception type> <message on one line>          (or "OOM none")
       COUNTS <prompts> <completions> <feedback>
2. The next request (a generation) works; then labels through the Studio API (the calls the UI makes) in an
   endless loop, one line per acknowledged label, printed only after the call returned (committed, read back):
       READY <c1> <c2> <c3> <c4>
       ACK <kind> <feedback id> [<new completion id>]
"""
import resource
import sys

from rlhf_studio import Studio


def vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def out_of_memory(s: Studio) -> None:
    prompt = "Summarise this: " + "the cat sat on the mat. " * 560
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + 160 * 2**20, hard))
    try:
        s.generate(prompt, n=8, max_new_tokens=4096, seed=0)
        print("OOM none", flush=True)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        print("OOM", type(e).__name__, " ".join(str(e).split()), flush=True)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    st = s.store.stats()
    print("COUNTS", st["prompts"], st["completions"], st["feedback"], flush=True)


def main() -> None:
    db = sys.argv[1]
    s = Studio(db)
    s.reward.settings.deep_every = 0          # no background LoRA training: keep the 2 shared CPUs for the test
    out_of_memory(s)
    cs = s.generate("Name a fruit", n=4, max_new_tokens=4, seed=1)
    a, b, c, d = (x.id for x in cs)
    print("READY", a, b, c, d, flush=True)
    i = 0
    while True:
        k = i % 6
        if k == 0:
            print("ACK stars", s.rate(cs[i % 4].id, 1 + i % 5, idempotency_key=f"kill-{i}"), flush=True)
        elif k == 1:
            print("ACK thumbs", s.thumbs(cs[i % 4].id, up=False, tags=["incorrect", f"t{i}"]), flush=True)
        elif k == 2:
            print("ACK pairwise", s.compare(a, b, winner="ab"[i % 2]), flush=True)
        elif k == 3:
            print("ACK ranking", s.rank([d, c, b, a] if i % 2 else [a, b, c, d]), flush=True)
        elif k == 4:
            out = s.critique(c, f"critique {i}", rewrite=f"rewrite {i}")
            print("ACK critique", out["critique_id"], flush=True)
            print("ACK rewrite", out["rewrite_id"], out["rewrite_completion_id"], flush=True)
        else:
            print("ACK stars", s.rate(d, 5, criterion="overall"), flush=True)
        i += 1


if __name__ == "__main__":
    main()
