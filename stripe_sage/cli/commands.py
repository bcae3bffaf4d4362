"""The product's commands: ``sync``, ``serve``, ``webhooks``, ``reconcile``, ``backfill``,
``replay``, ``dead-letters``, ``alerts``, ``mapping`` — the one edge that starts flows."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def prefect_defaults() -> None:
    """A project-local Prefect home, so the UI command below shows the same runs."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def print_run(title: str, result: dict[str, Any]) -> None:
    load = result.get("load", {})
    extracted = {s: r.get("listed", 0) for s, r in result.get("extract", {}).items()}
    events = result.get("events", {})
    print(f"\n== {title}: {result.get('status')} (run {result.get('run_id')})")
    print("  extracted   " + ", ".join(f"{s} {n}" for s, n in extracted.items() if n) or "-")
    if events.get("events"):
        print(f"  events      {events['events']} read, re-fetched {events.get('changed')}")
    if served := result.get("events_served_during_sync"):
        print(
            f"  served      {served['events']} webhook events in {served['batches']} "
            f"batches while the sync held the writer ({served['failed_batches']} failed)"
        )
    quarantined = {k: v for k, v in (result.get("quarantined") or {}).items() if v}
    print(f"  quarantined {quarantined or 'none'}")
    print(f"  planned     {result.get('planned') or {}}")
    print(f"  posted      {load.get('posted') or {}}")
    print(f"  dead-letter {load.get('dead') or {}}")
    for state in ("waiting", "blocked"):
        if any(load.get(state, {}).values()):
            print(f"  {state:<11} {load.get(state)}")
    if any(load.get("deferred", {}).values()):
        print(
            f"  deferred    {load.get('deferred')} (retry budget spent after "
            f"{load.get('rounds')} rounds; the next run retries them)"
        )
    for c in (result.get("reconciliation") or {}).get("clearing", []):
        # Sage's Stripe Clearing against Stripe's own side, minor units: what finance ties out.
        unposted = sum((c.get("unposted_by_state") or {}).values())
        print(
            f"  clearing    {c['currency']} {c['account']}: difference {c['difference']}, "
            f"unexplained {c['unexplained']}, unposted {unposted}"
        )
    for f in (result.get("reconciliation") or {}).get("realized_fx", []):
        from stripe_sage.reconcile.report import describe_fx

        # Realized FX gain/loss posted (refunds of foreign sales, later foreign payments).
        print(f"  realized FX {describe_fx(f)}")
    t = result.get("timings", {})
    print("  seconds     " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))


def cmd_sync(args: argparse.Namespace) -> int:
    prefect_defaults()
    from flows.stages import observed
    from flows.stripe_to_sage import stripe_to_sage
    from stripe_sage.cli.progress import TerminalProgress

    with observed(TerminalProgress()):
        result = stripe_to_sage(
            streams=args.streams,
            full_refresh=args.full_refresh,
            dry_run=args.dry_run,
            trigger="cli",
        )
    print_run("sync", result)
    # Dead letters are reported (ops.dead_letters), not a failed sync; deferred work is.
    return (
        0 if result.get("status") in ("completed", "completed_with_dead_letters", "dry_run") else 1
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from stripe_sage.cli.serve import serve

    # The sandboxes deliver their webhooks to the receiver, as Stripe would.
    hook = f"http://127.0.0.1:{args.webhook_port or 8787}/stripe/webhook"
    sandbox_args = ["--sage-db", args.sage_db, "--webhook-url", hook]
    return serve(
        prefect_port=args.port,
        webhook_port=args.webhook_port,
        with_sandboxes=args.with_sandboxes,
        sandbox_args=sandbox_args,
        open_browser=args.open,
        run_for=args.run_for,
    )


def cmd_alerts_install(args: argparse.Namespace) -> int:
    from stripe_sage.settings import Settings
    from tasks.alerts import install_alerts

    url = args.webhook_url
    if url is None and (secret := Settings().alert_webhook_url) is not None:
        url = secret.get_secret_value()
    names = install_alerts(url)
    target = "the configured webhook" if url else "nobody (no ALERT_WEBHOOK_URL: UI only)"
    for name in names:
        print(f"automation: {name} → notifies {target}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    prefect_defaults()
    import contextlib

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.backfill import backfill
    from flows.stages import observed
    from stripe_sage.cli.progress import TerminalProgress

    with contextlib.ExitStack() as stack:
        stack.enter_context(observed(TerminalProgress()))
        if not os.environ.get("PREFECT_API_URL"):
            # Without a server, each Dask worker process would start an ephemeral Prefect of
            # its own: one local server for the command, named to the workers too.
            server = SubprocessASGIServer()
            server.start()
            stack.callback(server.stop)
            os.environ["PREFECT_API_URL"] = server.api_url
            stack.enter_context(temporary_settings({PREFECT_API_URL: server.api_url}))
        result = backfill(
            days=args.days,
            window_days=args.window_days,
            fan_out=args.fan_out,
            workers=args.workers,
            dask_address=args.dask_address,
            then_sync=not args.no_sync,
            trigger="cli",
        )
    print(
        f"backfill: {result['windows']} windows by {result['fan_out']} "
        f"({len(result['processes'])} processes), merged {result['merged']}, "
        f"seconds {result['timings']}"
    )
    if "sync" in result:
        print_run("then sync", result["sync"])
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    prefect_defaults()
    from flows.replay_dead_letters import replay_dead_letters
    from flows.stages import observed
    from stripe_sage.cli.progress import TerminalProgress

    with observed(TerminalProgress()):
        result = replay_dead_letters(
            doc_keys=args.doc_key,
            doc_type=args.doc_type,
            error_code=args.error_code,
            trigger="cli",
        )
    print(f"released {len(result['released'])} dead letters; dead again: {result['dead_again']}")
    return 1 if result["dead_again"] else 0


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    """Every document not in Sage, with its state and the reason a person reads."""
    import duckdb

    from stripe_sage.settings import Settings
    from stripe_sage.store.staging import Staging

    path = Path(args.db or Settings().staging_db)
    if not path.exists():
        print(f"no staging database at {path}: nothing has run yet")
        return 0
    with Staging(path, read_only=True) as st:
        try:
            rows = st.unposted(args.state)
            counts = st.state_counts()
        except duckdb.BinderException:
            print(f"{path} predates document states: run `stripe-sage sync` once first")
            return 1
    for row in rows[: args.limit] if args.limit else rows:
        since = row["since"].strftime("%Y-%m-%d %H:%M") if row["since"] else "-"
        print(f"{row['status']:<8} {row['doc_key']:<40} {since:<16} {row['reason']}")
    shown = f"{min(len(rows), args.limit or len(rows))} of {len(rows)}"
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"\n{shown} shown; unposted by state: {summary}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """The reconciliation report on demand, from the staging DB (optionally after a sync)."""
    import datetime as dt

    from stripe_sage.mapping import load_mapping
    from stripe_sage.money import to_decimal_string
    from stripe_sage.reconcile import report as reconcile
    from stripe_sage.settings import Settings
    from stripe_sage.store.staging import Staging

    settings = Settings()
    if args.sync:
        prefect_defaults()
        from flows.reconcile_payouts import reconcile_payouts

        reconcile_payouts(trigger="cli")
    mapping = load_mapping(settings.mapping_file)
    with Staging(settings.staging_db) as st:
        html = Path(args.html or Path(settings.staging_db).parent / "reconciliation.html")
        rep, clearing, ar = reconcile.build_report(
            st,
            mapping,
            html_path=html,
            payout=args.payout,
            date_from=dt.date.fromisoformat(args.date_from) if args.date_from else None,
            date_to=dt.date.fromisoformat(args.date_to) if args.date_to else None,
        )
        fx = reconcile.realized_fx(st, mapping)
    cols = reconcile.REPORT_COLUMNS
    money = {"amount", "gross", "fees", "refunds", "disputes", "net", "bank_line", "difference"}
    table = [
        [
            ("" if r[c] is None else to_decimal_string(int(r[c]), r["currency"]))
            if c in money
            else str(r[c] if r[c] is not None else "")
            for c in cols
        ]
        for r in rep.iter_rows(named=True)
    ]
    widths = [
        max(len(c), *(len(row[i]) for row in table)) if table else len(c)
        for i, c in enumerate(cols)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in table:
        print(
            "  ".join(
                v.rjust(w) if cols[i] in money else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    counts = rep.group_by("recon_status").len().sort("recon_status").iter_rows()
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts) + f"   report: {html}")
    for c in clearing:
        print(
            f"Stripe Clearing {c['currency']} ({c['account']}): Sage "
            f"{to_decimal_string(c['sage_clearing'], c['currency'])}, Stripe unpaid gross "
            f"{to_decimal_string(c['stripe_unpaid_gross'], c['currency'])}, difference "
            f"{to_decimal_string(c['difference'], c['currency'])} (unexplained "
            f"{to_decimal_string(c['unexplained'], c['currency'])}; "
            f"{len(c['unposted_documents'])} unposted documents explain the rest)"
        )
    from stripe_sage.reconcile.ar import unexplained_messages

    for t in ar:
        cur = t["currency"]
        print(
            f"AR tie-out {cur}: Sage open {to_decimal_string(t['sage_open'], cur)}, Stripe open "
            f"{to_decimal_string(t['stripe_open'], cur)}, difference "
            f"{to_decimal_string(t['difference'], cur)} (unexplained "
            f"{to_decimal_string(t['unexplained'], cur)}; {t['customers']} customers, "
            f"{t['customers_with_difference']} with a difference)"
        )
    ar_problems = unexplained_messages(ar)
    for line in ar_problems:
        print(line)
    for f in fx:
        print(f"Realized FX gain/loss {reconcile.describe_fx(f)}")
    bad = rep.filter(rep["recon_status"] == "mismatch").height
    return 1 if bad or ar_problems or any(c["unexplained"] for c in clearing) else 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Serve the webhook receiver (and its Prefect notifier) until Ctrl-C."""
    import uvicorn

    from stripe_sage.settings import Settings
    from stripe_sage.store.inbox import Inbox
    from stripe_sage.stripe.webhooks import Notifier, create_receiver

    settings = Settings()
    inbox = Inbox(settings.webhook_inbox)
    secrets = [settings.stripe_webhook_secret.get_secret_value(), *(args.previous_secret or [])]
    api = settings.prefect_api_url or os.environ.get("PREFECT_API_URL")
    notifier = Notifier(inbox, api)
    app = create_receiver(inbox, secrets, notifier=notifier)
    notifier.start()
    host, port = args.host or settings.webhook_host, args.port or settings.webhook_port
    print(
        f"Webhook receiver http://{host}:{port}/stripe/webhook  inbox {settings.webhook_inbox}"
        f"  Prefect {api or '(none: the scheduled sync drains the inbox)'}",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        notifier.stop()
    return 0


def cmd_processor(args: argparse.Namespace) -> int:
    """Run the real-time processor (one long-lived flow run) until Ctrl-C or SIGTERM. When
    Prefect cannot be reached (down, restarting) it tries again with backoff: events wait in
    the inbox meanwhile, and are processed once the flow run starts."""
    import time

    prefect_defaults()
    from flows.realtime_processor import STOP, realtime_processor, stop_on_signals
    from stripe_sage.realtime import Backoff

    stop_on_signals()  # also while Prefect is unreachable and the command waits to retry

    backoff = Backoff(initial=1.0, cap=10.0)
    started = time.monotonic()
    while not STOP.is_set():
        left = None if args.run_for is None else args.run_for - (time.monotonic() - started)
        if left is not None and left <= 0:
            return 0
        try:
            stats = realtime_processor(run_for=left)
        except Exception as exc:  # Prefect unreachable, or the run failed: start again
            wait = backoff.failed(time.monotonic())
            print(
                f"real-time processor stopped ({type(exc).__name__}: {str(exc)[:200]}); "
                f"starting again in {wait:.0f} s",
                flush=True,
            )
            STOP.wait(wait)
            continue
        print(f"real-time processor: {stats}", flush=True)
        return 0
    return 0


def console_app(settings: Any) -> Any:
    """The console's app for these settings (also mounted by ``stripe-sage serve``'s child)."""
    from stripe_sage.console.app import ConsoleConfig, create_console
    from stripe_sage.console.store import ConsoleStore

    return create_console(
        ConsoleConfig(
            store=ConsoleStore(
                settings.console_store, session_minutes=settings.console_session_minutes
            ),
            snapshot=Path(settings.staging_db).parent / "snapshot" / "analytics.duckdb",
            env=dict(os.environ),
            prefect_api_url=settings.prefect_api_url or os.environ.get("PREFECT_API_URL"),
            secrets=tuple(settings.secrets()),
            mapping_file=settings.mapping_file,
            chart=lambda: _sage_chart(settings),
        )
    )


def _sage_chart(settings: Any) -> list[dict[str, Any]]:
    """Sage's chart of accounts, for the console's account choices (few attempts: a page
    waits on it)."""
    from stripe_sage.sage.client import SageProClient

    with SageProClient(
        settings.sagepro_base_url, settings.sagepro_api_key, max_attempts=2, timeout=5
    ) as client:
        return client.gl_accounts()


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the finance console until Ctrl-C."""
    import uvicorn

    from stripe_sage.settings import Settings

    prefect_defaults()  # a replay subprocess then uses the same Prefect home as the CLI
    settings = Settings()
    app = console_app(settings)
    host, port = args.host or settings.console_host, args.port or settings.console_port
    if not app.state.store.users():
        print("no console user yet: `stripe-sage console set-password USER` creates one")
    print(f"Finance console http://{host}:{port}/  store {settings.console_store}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def cmd_console_set_password(args: argparse.Namespace) -> int:
    import getpass

    from stripe_sage.console.store import ConsoleStore
    from stripe_sage.settings import Settings

    password = os.environ.get("CONSOLE_PASSWORD") if args.password_from_env else None
    if password is None:
        password = getpass.getpass(f"password for {args.user}: ")
        if password != getpass.getpass("again: "):
            print("the two passwords differ; nothing changed")
            return 2
    if len(password) < 10:
        print("a console password has at least 10 characters; nothing changed")
        return 2
    store = ConsoleStore(Settings().console_store)
    store.set_password(args.user, password, role=args.role)
    print(f"console user {args.user} ({args.role}) set in {store.path}")
    return 0


def cmd_mapping_preview(args: argparse.Namespace) -> int:
    from stripe_sage.errors import ConfigurationError
    from stripe_sage.mapping import load_mapping
    from stripe_sage.plan.preview import preview, render_html, render_terminal, write_html
    from stripe_sage.settings import Settings
    from stripe_sage.store.staging import Staging

    settings = Settings()
    path = Path(args.mapping) if args.mapping else settings.mapping_file
    try:
        mapping = load_mapping(path)
    except ConfigurationError as exc:
        print(exc)
        return 2
    print(f"mapping {path or 'default'}: valid")
    with Staging(settings.staging_db, read_only=True) as st:
        items = preview(st, mapping, args.stream, args.limit, args.id)
    print(render_terminal(items))
    out = write_html(
        Path(args.html or Path(settings.staging_db).parent / f"mapping_preview_{args.stream}.html"),
        render_html(items, args.stream, str(path or "default")),
    )
    print(f"\nHTML: {out}")
    return 0


def register(sub: Any) -> None:

    p = sub.add_parser(
        "sync",
        help="run the main flow once against the configured systems",
        description="Run stripe_to_sage once with settings from the "
        "environment / .env (see the README's configuration table).",
    )
    p.add_argument("--streams", nargs="*", help="only these streams")
    p.add_argument("--full-refresh", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="plan documents, post nothing")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser(
        "reconcile",
        help="payout reconciliation report (terminal + HTML)",
        description="Per payout: amount, Σ gross, fees, refunds, disputes, "
        "net, the Sage journal and its bank line, and matched / mismatch / "
        "pending / manual. Exit status 1 on a mismatch.",
    )
    p.add_argument("--payout", help="only this payout (po_...)")
    p.add_argument("--from", dest="date_from", help="arrival date from, YYYY-MM-DD")
    p.add_argument("--to", dest="date_to", help="arrival date to (inclusive), YYYY-MM-DD")
    p.add_argument("--html", help="where to write the HTML report")
    p.add_argument(
        "--sync",
        action="store_true",
        help="run the reconcile_payouts flow first (new payouts, journals)",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser(
        "webhooks",
        help="serve the Stripe webhook receiver",
        description="Verify Stripe-Signature, store events durably in the "
        "inbox (SQLite), answer 2xx, and post a Prefect event that triggers "
        "process_stripe_events (PREFECT_API_URL).",
    )
    p.add_argument("--host", default=None, help="default WEBHOOK_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default WEBHOOK_PORT (8787)")
    p.add_argument(
        "--previous-secret",
        action="append",
        help="also accept this signing secret (while a secret rotates)",
    )
    p.set_defaults(func=cmd_webhooks)

    p = sub.add_parser(
        "processor",
        help="run the real-time event processor (webhook inbox → Sage in seconds)",
        description="One long-lived Prefect flow run (realtime_processor) that turns the "
        "events the webhook receiver stores into Sage documents in micro-batches, holding "
        "the DuckDB writer and handing it to a scheduled sync between batches.",
    )
    p.add_argument("--run-for", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=cmd_processor)

    p = sub.add_parser(
        "serve",
        help="Prefect server + UI, every deployment, the webhook receiver, alerts",
        description="The embedded default for day-to-day use on one machine: a Prefect "
        "server (SQLite under .prefect, or PREFECT_API_URL if set) with its UI, every "
        "deployment with its schedule and trigger, the webhook receiver and the alert "
        "automations. Ctrl-C stops everything.",
    )
    p.add_argument("--port", type=int, default=4200, help="Prefect server port (4200)")
    p.add_argument("--webhook-port", type=int, default=None, help="default WEBHOOK_PORT")
    p.add_argument(
        "--with-sandboxes",
        action="store_true",
        help="also serve the Stripe and Sage Pro sandboxes (a demo on embedded defaults)",
    )
    p.add_argument("--sage-db", default="data/sage_sandbox.sqlite3", help=argparse.SUPPRESS)
    p.add_argument("--open", action="store_true", help="open the Prefect UI in a browser")
    p.add_argument("--run-for", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "alerts",
        help="alert automations (install)",
        description="Prefect automations: failed run, authentication failure, dead "
        "letters above DEAD_LETTER_ALERT_THRESHOLD, documents waiting longer than "
        "WAITING_ALERT_HOURS.",
    )
    asub = p.add_subparsers(dest="alerts_command", required=True, metavar="COMMAND")
    q = asub.add_parser(
        "install",
        help="create or replace the automations on PREFECT_API_URL's server",
        description="Create (or replace) the four automations and the notification "
        "block on the Prefect server at PREFECT_API_URL.",
    )
    q.add_argument("--webhook-url", help="notify this URL (default ALERT_WEBHOOK_URL)")
    q.set_defaults(func=cmd_alerts_install)

    p = sub.add_parser(
        "backfill",
        help="a large first load, fanned out by time window",
        description="Read every stream's history in windows in parallel (Dask, Prefect "
        "workers, or threads) into Parquet, merge into DuckDB with one writer, stage, "
        "validate, then run the main flow to post to Sage.",
    )
    p.add_argument("--days", type=int, default=3 * 365, help="history to read (default 3 y)")
    p.add_argument("--window-days", type=int, default=7)
    p.add_argument("--fan-out", choices=("dask", "deployments", "threads"), default="dask")
    p.add_argument("--workers", type=int, default=2, help="Dask workers / worker runs")
    p.add_argument("--dask-address", help="an existing Dask scheduler (tcp://host:8786)")
    p.add_argument("--no-sync", action="store_true", help="stop after staging and quality")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser(
        "replay",
        help="replay dead letters after their cause was fixed",
        description="Release the chosen dead letters (all when no filter is given) with "
        "their blocked dependents, plan them again and post them. Exit 1 if any is "
        "rejected again.",
    )
    p.add_argument("--doc-key", action="append", help="e.g. invoice:ch_… (repeatable)")
    p.add_argument("--doc-type", help="only this document type")
    p.add_argument("--error-code", help="only dead letters with this Sage error code")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "dead-letters",
        help="documents not in Sage: dead, waiting, blocked, pending, with reasons",
        description="What did not reach Sage and why: dead (Sage rejected it or it could "
        "not be planned), waiting (for Stripe data, e.g. a balance transaction), blocked "
        "(by a dead, quarantined or missing document it needs), pending (deferred by Sage "
        "failures; the next run retries it).",
    )
    dsub = p.add_subparsers(dest="dead_letters_command", required=True, metavar="COMMAND")
    q = dsub.add_parser(
        "list",
        help="list them with their state and reason, oldest first",
        description="One line per document: state, doc key, since when, reason.",
    )
    q.add_argument("--state", choices=("dead", "waiting", "blocked", "pending"))
    q.add_argument("--limit", type=int, default=0, help="at most this many lines (0: all)")
    q.add_argument("--db", help="staging DuckDB file (default STAGING_DB)")
    q.set_defaults(func=cmd_dead_letters_list)

    p = sub.add_parser(
        "console",
        help="the finance console: overview, exceptions, replays (web, login required)",
        description="Serve the finance console (default http://127.0.0.1:8788/): the last "
        "runs, what needs a person and why, replay or resolve with a note. It reads the "
        "published snapshot and keeps its users and actions in CONSOLE_STORE.",
    )
    p.add_argument("--host", default=None, help="default CONSOLE_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default CONSOLE_PORT (8788)")
    p.set_defaults(func=cmd_console)
    csub = p.add_subparsers(dest="console_command", metavar="COMMAND")
    q = csub.add_parser(
        "set-password",
        help="create a console user or change its password and role",
        description="Store USER's password (scrypt-hashed) and role in CONSOLE_STORE; "
        "the user's open sessions end. Asks for the password twice.",
    )
    q.add_argument("user")
    q.add_argument("--role", choices=("admin", "auditor"), default="admin")
    q.add_argument(
        "--password-from-env",
        action="store_true",
        help="read the password from CONSOLE_PASSWORD (scripts, tests) instead of asking",
    )
    q.set_defaults(func=cmd_console_set_password)

    p = sub.add_parser(
        "mapping",
        help="mapping file tools (preview)",
        description="Validate a mapping file and preview its effect.",
    )
    msub = p.add_subparsers(dest="mapping_command", required=True, metavar="COMMAND")
    q = msub.add_parser(
        "preview",
        help="staged Stripe rows beside the Sage payloads",
        description="Validate the mapping (errors name the line), then show "
        "sample staged rows and the Sage payloads they would become. Posts "
        "nothing.",
    )
    q.add_argument(
        "--stream",
        default="charges",
        choices=(
            "charges",
            "refunds",
            "customers",
            "invoices",
            "products",
            "payouts",
            "checkout_sessions",
        ),
    )
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--id", action="append", help="preview these Stripe ids")
    q.add_argument("--mapping", help="mapping file (default MAPPING_FILE or the built-in one)")
    q.add_argument("--html", help="where to write the HTML page")
    q.set_defaults(func=cmd_mapping_preview)
