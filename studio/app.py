"""The Gradio Blocks app: one module per tab under studio/ui, assembled and launched here."""
from __future__ import annotations

import secrets
import sys

import gradio as gr

from .auth import Accounts, ClientAddress, role_of
from .ui import generate as generate_tab
from .ui import history as history_tab
from .ui.common import blind_view, md_text

# Requests waiting beyond this many are refused at once: the browser shows Gradio's "This application is currently
# busy. Please try again." and API clients get HTTP 503 "Queue is full" (gradio_client: QueueError), instead of
# waiting behind a backlog with no end in sight. Running events do not count, only waiting ones.
DEFAULT_MAX_QUEUE = 64

CSS = """
.rlhf-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; }
.rlhf-card.rlhf-selected { outline: 3px solid var(--color-accent); }
"""

# Keyboard shortcuts for fast rating. Ignored while typing in a text field.
#   g generate · n next prompt · ←/→ or j/k select a completion · 1-5 stars for the selected one
#   u / d thumbs up / down · a / b / t / x pairwise choice (A wins, B wins, tie, both bad) and save
#   z undo my last label
SHORTCUTS_JS = """
<script>
(() => {
  let sel = 0;
  const q = (s) => document.querySelector(s);
  // Cards are the Columns with elem_id card-<i>; a card counts as shown when its text box is on screen.
  const shown = () => [...Array(8).keys()].filter(i => { const t = q(`#comp-${i}`); return t && t.getClientRects().length > 0; });
  const mark = () => document.querySelectorAll('[id^="card-"]').forEach(c => c.classList.toggle('rlhf-selected', c.id === `card-${sel}`));
  document.addEventListener('click', (e) => {
    const card = e.target.closest && e.target.closest('[id^="card-"]');
    if (card) { sel = parseInt(card.id.slice(5)) || 0; mark(); }
  }, true);
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio' && t.type !== 'checkbox') || t.isContentEditable)) return;
    const cards = shown();
    const k = e.key;
    // fewer cards than before (n=4, card D picked, then n=2): the selection moves to the last card shown
    if (cards.length && !cards.includes(sel)) { sel = Math.max(0, Math.min(sel, cards.length - 1)); mark(); }
    const click = (s) => { const el = q(s); if (el) { el.click(); e.preventDefault(); } };
    if (k === 'g') click('#generate-btn');
    else if (k === 'n') click('#next-prompt-btn');
    else if (k === 'z') click('#undo-btn');
    else if (k === 'ArrowRight' || k === 'k') { sel = Math.max(0, Math.min(sel + 1, cards.length - 1)); mark(); }
    else if (k === 'ArrowLeft' || k === 'j') { sel = Math.max(sel - 1, 0); mark(); }
    else if ('12345'.includes(k) && k.length === 1) click(`#stars-${sel} input[value="${k}"]`);
    else if (k === 'u') click(`#up-${sel}`);
    else if (k === 'd') click(`#down-${sel}`);
    else if ('abtx'.includes(k) && k.length === 1) {
      const v = {a: 'a', b: 'b', t: 'tie', x: 'both_bad'}[k];
      const r = q(`#winner input[value="${v}"]`);
      if (r) { r.click(); setTimeout(() => q('#compare-btn') && q('#compare-btn').click(), 150); e.preventDefault(); }
    }
  });
})();
</script>
"""


def hidden_value(block) -> bool | str:
    """What hides `block` in an update: a Tab ignores visible=False ("hidden" hides it and its button), while a
    Row in a tab not yet opened ignores "hidden" (the Reward tab's owner-only buttons stayed on screen)."""
    return "hidden" if isinstance(block, gr.Tab) else False


def build_app(studio, role: str = "owner", max_queue: int | None = DEFAULT_MAX_QUEUE) -> gr.Blocks:
    """The Blocks app; max_queue bounds the waiting requests (None: unbounded, for tests of the layout only)."""
    # delete_cache: Gradio's copies of served downloads go after an hour and when the server stops
    with gr.Blocks(title="RLHF Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# RLHF Studio\nModel **{md_text(studio.model_id)}** · database {md_text(studio.db_path)}",
                    elem_id="header")
        if studio.storage_warnings:
            gr.Markdown("\n\n".join("**Warning:** " + md_text(w) for w in studio.storage_warnings),
                        elem_id="storage-warnings")
        lockouts = gr.Markdown("", elem_id="login-lockouts", visible=False)   # owners: who is locked out
        with gr.Tab("Generate & Rate", id="generate") as gen_tab_:
            gen = generate_tab.build(studio, role)
        with gr.Tab("Reward model", id="reward"):
            from .ui import reward as reward_tab
            rew = reward_tab.build(studio, role)
        with gr.Tab("Train (PPO)", id="train") as train_tab_:
            from .ui import train as train_tab
            trn = train_tab.build(studio, role, pinned=rew.get("pinned"))   # the Reward tab's pin, per session
        with gr.Tab("Blind compare", id="compare") as cmp_tab_:
            from .ui import compare as compare_tab
            cmp = compare_tab.build(studio, role)
        with gr.Tab("Evaluate", id="evaluate") as eval_tab_:
            from .ui import evaluate as evaluate_tab
            evl = evaluate_tab.build(studio, role)
        with gr.Tab("History", id="history"):
            hist = history_tab.build(studio, role)
        with gr.Tab("Dashboard", id="dashboard") as dash_tab:
            from .ui import dashboard as dashboard_tab
            dash = dashboard_tab.build(studio, role)
        fn, out = gen["on_load"]
        demo.load(fn, None, out)
        fn, outs = gen["criteria"]
        demo.load(fn, None, outs)
        for extra in (rew, trn, cmp):
            if extra and "on_load" in extra:
                f, i, o = extra["on_load"]
                demo.load(f, i, o)
        if trn and "adapters" in trn:
            f, o = trn["adapters"]
            demo.load(f, None, [gen["adapter"]])
            # a new adapter (a PPO run completed) joins the policy lists without a page reload: when the Train
            # tab's refresh sees it, and on opening the Generate and Blind compare tabs
            quiet = dict(show_progress="hidden", api_visibility="private")
            gen_tab_.select(f, None, [gen["adapter"]], **quiet)
            if "adapter_ids" in trn:
                ev = trn["adapter_ids"].change(f, None, [gen["adapter"]], **quiet)
                if "refresh" in cmp:
                    fc, ic, oc = cmp["refresh"]
                    ev.then(fc, ic, oc, **quiet)
        if "refresh" in cmp:
            fc, ic, oc = cmp["refresh"]
            cmp_tab_.select(fc, ic, oc, show_progress="hidden", api_visibility="private")   # win rates too
        f, i, o = evl["on_load"]
        eval_tab_.select(f, i, o, show_progress="hidden", api_visibility="private")   # lists, results, next pair
        f, i, o = hist["on_load"]
        demo.load(f, i, o)
        f, i, o = dash["on_load"]
        dash_tab.select(f, i, o)      # on opening the tab: the aggregates take a second at a million labels

        # What a role may not do is hidden on page load (the handlers refuse it on the server as well).
        owner_only = [c for part in (gen, rew, trn, dash, evl) for c in part.get("owner_only", [])] + [train_tab_]
        if getattr(studio, "accounts", None) is not None:
            owner_only.append(lockouts)
            demo.load(lambda: lockout_line(studio), None, lockouts, api_visibility="private")
        # ... and in blind mode, what names a policy or shows a reward score, unless an owner logged in
        blind_hidden = [c for part in (gen, rew, cmp, dash, evl) for c in part.get("blind_hidden", [])]

        def apply_role(request: gr.Request):
            is_owner = role_of(studio, request) == "owner"
            blind = blind_view(studio, request)
            return [gr.update(visible=True if is_owner else hidden_value(c)) for c in owner_only] + \
                [gr.update(visible=hidden_value(c) if blind else True) for c in blind_hidden]
        apply_role.blind_hidden = blind_hidden        # which of its outputs are hidden in blind mode only
        demo.load(apply_role, None, owner_only + blind_hidden, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=max_queue)
    return demo


def lockout_line(studio) -> str:
    """One line for owners: which client addresses are locked out of the login now (see studio/auth.py)."""
    df = studio.login_lockouts()
    if df.empty:
        return "Logins: no address is locked out."
    who = ", ".join(f"`{'everyone' if r.address == '*' else r.address}` ({r.failures} failures, "
                    f"{max(1, round(r.seconds_left / 60))} min left)" for r in df.itertuples())
    return f"**Logins locked out:** {who}. `Studio.clear_login_lockouts()` lets them try again."


def strong_password() -> str:
    return secrets.token_urlsafe(18)


def launch_app(studio, share: bool = False, auth=None, host: str = "127.0.0.1", port: int | None = None,
               inline: bool | None = None, open_browser: bool = False, prevent_thread_lock: bool = True,
               quiet: bool = False, auth_file: str | None = None, blind: bool = False,
               max_queue: int | None = DEFAULT_MAX_QUEUE):
    """Launch the app; with share=True never without a password (one is generated and printed if missing).

    auth: "USER:PASS" or (user, pass) for one owner; auth_file: several accounts with roles (studio/auth.py).
    blind: hide model/adapter identity and reward-model scores while labelling.
    max_queue: requests allowed to wait; more are answered at once with "busy, please try again".
    """
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1):
        raise ValueError(f"max_queue must be a whole number of at least 1, got {max_queue!r}")
    accounts = None
    if auth_file:
        accounts = Accounts.from_file(auth_file)
    elif auth:
        if isinstance(auth, str):
            user, _, pw = auth.partition(":")
            if not user or not pw:
                raise ValueError("--auth must look like USER:PASSWORD")
            auth = (user, pw)
        accounts = Accounts.single(*auth)
    if share and accounts is None:
        pw = strong_password()
        accounts = Accounts.single("studio", pw)
        print(f"Sharing needs a login. Generated one: user 'studio', password '{pw}'", flush=True)
    if blind and accounts is None:
        # blind mode without logins: nobody has proved to be the owner, so every visitor is an annotator (labels
        # only; sees no policy names or scores); the owner starts it with --auth-file, or works in the notebook
        accounts = Accounts()
    studio.accounts = accounts
    studio.blind = bool(blind)
    demo = build_app(studio, max_queue=max_queue)
    from starlette.middleware import Middleware
    login = accounts.acheck if accounts is not None and accounts.users else None
    demo.launch(share=share, auth=login, server_name=host, server_port=port, inline=inline, inbrowser=open_browser,
                app_kwargs={"middleware": [Middleware(ClientAddress)]},   # the login's client address
                prevent_thread_lock=prevent_thread_lock, run_history=False, ssr_mode=False, quiet=quiet,
                show_error=True, css=CSS, head=SHORTCUTS_JS, footer_links=["api"],
                theme=gr.themes.Soft(), strict_cors=True)
    print(f"RLHF Studio running at {demo.local_url}", flush=True)
    if share:
        if getattr(demo, "share_url", None):
            print(f"Public link (temporary): {demo.share_url}", flush=True)
        else:
            print("Could not create a public share link (no internet connection to the share server?). "
                  f"The studio keeps serving locally at {demo.local_url}", file=sys.stderr, flush=True)
    return demo
