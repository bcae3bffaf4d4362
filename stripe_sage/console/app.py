"""The console's ASGI app: server-rendered pages (Jinja2), htmx for the few live parts.

Security, in one place: every page but the login needs a session (a random token in an
HttpOnly, SameSite=Strict cookie; only its hash is stored; it expires after
``CONSOLE_SESSION_MINUTES`` without use); every POST carries the session's CSRF token (the
login form a double-submit one); repeated wrong passwords lock the user out for a while; an
auditor's session is refused every change; no page renders a setting's secret.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from stripe_sage.console import mapping_editor as editor
from stripe_sage.console import reads
from stripe_sage.console.mapping_file import MappingFile
from stripe_sage.console.replay import Replayer
from stripe_sage.console.store import ConsoleStore, Session, Throttled
from stripe_sage.money import to_decimal_string

HERE = Path(__file__).parent
SESSION_COOKIE = "stripe_sage_console"
LOGIN_COOKIE = "stripe_sage_console_login"
SECURITY_HEADERS = {
    # Only our own files: no inline script, nothing from elsewhere, never in a frame.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class ConsoleConfig:
    store: ConsoleStore
    snapshot: Path
    # The environment a replay subprocess runs with (the product's settings).
    env: Mapping[str, str]
    prefect_api_url: str | None = None
    secrets: tuple[str, ...] = ()
    # The mapping file the runs use (None: the built-in default; the console's first save
    # then writes ``mapping_target`` and points ``env_file``'s MAPPING_FILE at it).
    mapping_file: Path | None = None
    mapping_target: Path = Path("mapping.yaml")
    env_file: Path | None = Path(".env")
    # Sage's chart of accounts (GET /api/v1/glaccounts), for the account choices.
    chart: Callable[[], list[dict[str, Any]]] | None = None


class LoginRequired(Exception):
    pass


def create_console(config: ConsoleConfig) -> FastAPI:
    store = config.store
    # A replay a stopped console was running has no outcome and never will: say so.
    store.interrupt_orphans()
    snapshot = reads.Snapshot(config.snapshot)
    replayer = Replayer(
        store,
        env=config.env,
        prefect_api_url=config.prefect_api_url,
        secrets=list(config.secrets),
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["money"] = _money
    mapping_file = MappingFile(
        config.mapping_file, config.mapping_target, config.env_file, replayer.env, config.chart
    )
    prefect_ui = config.prefect_api_url.removesuffix("/api") if config.prefect_api_url else None
    app = FastAPI(title="stripe-sage console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.replayer = replayer
    app.state.store = store
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _exc: LoginRequired) -> Response:
        if request.method != "GET":
            return HTMLResponse("login required", status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    def session_of(request: Request) -> Session:
        session = store.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise LoginRequired()
        return session

    async def change_allowed(request: Request) -> Session:
        """The session of a POST that may change something: CSRF token checked, admin only."""
        session = session_of(request)
        form = await request.form()
        sent = str(form.get("csrf") or request.headers.get("X-CSRF-Token") or "")
        if not _same(sent, session.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        if session.role != "admin":
            raise HTTPException(403, "an auditor's login can read everything and change nothing")
        return session

    def page(
        request: Request, name: str, session: Session | None, status_code: int = 200, **context: Any
    ) -> Response:
        return templates.TemplateResponse(
            request,
            name,
            {
                "session": session,
                "can_change": session is not None and session.role == "admin",
                "prefect_ui": prefect_ui,
                **context,
            },
            status_code=status_code,
        )

    # -- login ------------------------------------------------------------------------------
    def login_page(request: Request, message: str | None, status: int, next_: str) -> Response:
        token = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request,
            "login.html",
            {"session": None, "login_csrf": token, "message": message, "next": next_},
            status_code=status,
        )
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:
        return login_page(request, None, 200, next)

    @app.post("/login")
    def login(
        request: Request,
        user: str = Form(""),
        password: str = Form(""),
        csrf: str = Form(""),
        next: str = Form("/"),
    ) -> Response:
        expected = request.cookies.get(LOGIN_COOKIE) or ""
        if not expected or not _same(csrf, expected):
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
        try:
            token = store.login(user, password)
        except Throttled:
            return login_page(
                request,
                "Too many wrong passwords for this user: try again in 15 minutes.",
                429,
                next,
            )
        if token is None:
            return login_page(request, "Wrong user name or password.", 401, next)
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict")
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = session_of(request)
        form = await request.form()
        if not _same(str(form.get("csrf") or ""), session.csrf):
            raise HTTPException(403, "missing or wrong CSRF token")
        store.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- pages ------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        session = session_of(request)
        with snapshot.open() as con:
            if con is None:
                return page(request, "empty.html", session, title="Overview")
            needs = reads.needs_a_person(con)
            context: dict[str, Any] = {
                "meta": reads.meta(con),
                "runs": reads.last_runs(con),
                "posted_today": reads.posted_today(con, dt.datetime.now(dt.UTC).date()),
                "needs": needs,
                "states": reads.state_counts(needs),
                "tie_outs": reads.tie_outs(con),
            }
        return page(request, "overview.html", session, title="Overview", **context)

    @app.get("/exceptions", response_class=HTMLResponse)
    def exceptions(
        request: Request, state: str | None = None, reason: str | None = None, page_no: int = 1
    ) -> Response:
        session = session_of(request)
        page_no = max(page_no, 1)
        with snapshot.open() as con:
            if con is None:
                return page(request, "empty.html", session, title="Exceptions")
            rows, total = reads.exceptions(
                con,
                state=state or None,
                reason_class=reason or None,
                offset=(page_no - 1) * reads.PAGE_ROWS,
            )
            meta = reads.meta(con)
        resolved = store.resolved()
        for r in rows:
            r["resolution"] = resolved.get(r["doc_key"])
        return page(
            request,
            "exceptions.html",
            session,
            title="Exceptions",
            rows=rows,
            state=state,
            reason=reason,
            meta=meta,
            states=reads.UNPOSTED_STATES,
            paging=_paging(request, page_no, total),
        )

    @app.get("/exceptions/{doc_key:path}", response_class=HTMLResponse)
    def exception(request: Request, doc_key: str) -> Response:
        session = session_of(request)
        with snapshot.open() as con:
            doc = reads.exception(con, doc_key) if con is not None else None
            meta = reads.meta(con) if con is not None else {}
        if doc is None:
            return page(
                request,
                "gone.html",
                session,
                title="Not an exception",
                doc_key=doc_key,
                actions=store.actions(doc_key=doc_key),
                meta=meta,
                status_code=404,
            )
        return page(
            request,
            "exception.html",
            session,
            title=doc_key,
            doc=doc,
            actions=store.actions(doc_key=doc_key),
            resolution=store.resolved().get(doc_key),
            meta=meta,
        )

    @app.get("/reconciliation", response_class=HTMLResponse)
    def reconciliation(request: Request) -> Response:
        session = session_of(request)
        with snapshot.open() as con:
            if con is None:
                return page(request, "empty.html", session, title="Reconciliation")
            rows, meta = reads.payouts(con), reads.meta(con)
            tie_outs, ar_customers = reads.tie_outs(con), reads.ar_customers(con)
        return page(
            request,
            "reconciliation.html",
            session,
            title="Reconciliation",
            payouts=rows,
            meta=meta,
            tie_outs=tie_outs,
            ar_customers=ar_customers,
        )

    @app.get("/ar-tie-out.csv")
    def ar_tie_out_csv(request: Request) -> Response:
        session_of(request)
        with snapshot.open() as con:
            rows = reads.ar_customers(con) if con is not None else []
        return _csv("ar-tie-out.csv", reads.AR_COLUMNS, rows)

    @app.get("/reconciliation.csv")
    def reconciliation_csv(request: Request) -> Response:
        session_of(request)
        with snapshot.open() as con:
            rows = reads.payouts(con) if con is not None else []
        return _csv("reconciliation.csv", reads.PAYOUT_COLUMNS, rows)

    @app.get("/reconciliation/{payout}.csv")
    def payout_csv(request: Request, payout: str) -> Response:
        session_of(request)
        with snapshot.open() as con:
            rows = reads.payout_transactions(con, payout) if con is not None else []
        return _csv(f"{payout}.csv", reads.TRANSACTION_COLUMNS, rows)

    @app.get("/reconciliation/{payout}", response_class=HTMLResponse)
    def payout(request: Request, payout: str, page_no: int = 1) -> Response:
        session = session_of(request)
        page_no = max(page_no, 1)
        with snapshot.open() as con:
            if con is None:
                return page(request, "empty.html", session, title="Reconciliation")
            found = reads.payouts(con, payout=payout)
            if not found:
                raise HTTPException(404, f"no reconciled payout {payout}")
            transactions = reads.payout_transactions(
                con, payout, limit=reads.PAGE_ROWS, offset=(page_no - 1) * reads.PAGE_ROWS
            )
            meta = reads.meta(con)
        return page(
            request,
            "payout.html",
            session,
            title="Reconciliation",
            payout=found[0],
            transactions=transactions,
            meta=meta,
            paging=_paging(request, page_no, transactions[0]["total"] if transactions else 0),
        )

    @app.get("/actions", response_class=HTMLResponse)
    def actions(request: Request) -> Response:
        session = session_of(request)
        return page(request, "actions.html", session, title="Actions", actions=store.actions())

    @app.get("/actions/{action_id}", response_class=HTMLResponse)
    def action(request: Request, action_id: int) -> Response:
        """One action's row (htmx polls it while a replay runs)."""
        session = session_of(request)
        found = store.action(action_id)
        if found is None:
            raise HTTPException(404, "no such action")
        return page(request, "action_row.html", session, a=found)

    # -- changes ----------------------------------------------------------------------------
    @app.post("/actions/replay")
    async def replay(request: Request) -> Response:
        session = await change_allowed(request)
        form = await request.form()
        doc_key, reason = str(form.get("doc_key") or ""), str(form.get("reason") or "")
        if reason:
            with snapshot.open() as con:
                keys = reads.keys_with_reason(con, reason) if con is not None else []
            target = f"all dead with reason: {reason}"
        elif doc_key:
            keys, target = [doc_key], doc_key
        else:
            raise HTTPException(400, "say which document (doc_key) or which reason to replay")
        if not keys:
            raise HTTPException(409, "nothing dead to replay for that reason")
        action_id = store.record(session.user, "replay", target, keys)
        replayer.start(action_id, keys)
        return RedirectResponse(f"/actions#action-{action_id}", status_code=303)

    @app.post("/actions/resolve")
    async def resolve(request: Request) -> Response:
        session = await change_allowed(request)
        form = await request.form()
        doc_key, note = str(form.get("doc_key") or ""), str(form.get("note") or "").strip()
        if not doc_key or not note:
            raise HTTPException(400, "a resolution needs the document and a note saying why")
        store.record(session.user, "resolve", doc_key, [doc_key], note=note, status="done")
        return RedirectResponse(f"/exceptions/{quote(doc_key)}", status_code=303)

    # -- mapping ----------------------------------------------------------------------------
    def mapping_page(
        request: Request,
        session: Session,
        sections: list[editor.Section],
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        chart, chart_problem = mapping_file.chart()
        return page(
            request,
            "mapping.html",
            session,
            status_code=status_code,
            title="Mapping",
            sections=sections,
            chart=chart,
            chart_problem=chart_problem,
            file_name=mapping_file.name,
            versions=store.mapping_versions(mapping_file.name),
            streams=PREVIEW_STREAMS,
            account_names=editor.ACCOUNT_NAMES,
            **context,
        )

    def form_values(form: Any) -> dict[str, str]:
        return {k: str(v) for k, v in form.items() if k.startswith(("/", "+/"))}

    @app.get("/mapping", response_class=HTMLResponse)
    def mapping(request: Request, saved: int | None = None) -> Response:
        session = session_of(request)
        text = mapping_file.read()
        return mapping_page(request, session, editor.sections(editor.load_tree(text)), saved=saved)

    @app.post("/mapping/preview", response_class=HTMLResponse)
    async def mapping_preview(request: Request) -> Response:
        """The Sage documents chosen staged rows become under the form's mapping, beside
        what the saved mapping makes of them (nothing is saved or posted)."""
        session = session_of(request)
        form = await request.form()
        if not _same(str(form.get("csrf") or ""), session.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        stream = str(form.get("_stream") or "charges")
        if stream not in PREVIEW_STREAMS:
            raise HTTPException(400, f"no preview for {stream!r}")
        ids = [i for i in re.split(r"[\s,]+", str(form.get("_ids") or "")) if i]
        saved = mapping_file.read()
        change = editor.apply_form(saved, form_values(form))
        context: dict[str, Any] = {"change": change, "stream": stream, "items": []}
        if not change.errors and snapshot.path.exists():
            from stripe_sage.plan.preview import preview
            from stripe_sage.store.staging import Staging

            with Staging(snapshot.path, read_only=True) as st:
                before = preview(st, editor.parse(saved), stream, 5, ids or None)
                after = (
                    preview(st, editor.parse(change.text), stream, 5, ids or None)
                    if change.changed
                    else before
                )
            context["items"] = editor.compare_previews(before, after)
        return page(request, "mapping_preview.html", session, **context)

    @app.post("/mapping/review", response_class=HTMLResponse)
    async def mapping_review(request: Request) -> Response:
        """The diff of the file a save would write, or the form again with its errors."""
        session = await change_allowed(request)
        form = await request.form()
        saved = mapping_file.read()
        change = editor.apply_form(saved, form_values(form))
        if change.errors or not change.changed:
            return mapping_page(
                request,
                session,
                editor.with_form(change),
                status_code=400 if change.errors else 200,
                form_error=change.errors.get(""),
                add_errors={k: v for k, v in change.errors.items() if k.startswith("+")},
                nothing_changed=not change.changed and not change.errors,
                preview_stream=str(form.get("_stream") or ""),
                preview_ids=str(form.get("_ids") or ""),
            )
        note = "; ".join(change.changed)
        draft = store.add_mapping_draft(session.user, editor.sha(saved), change.text, note)
        return page(
            request,
            "mapping_review.html",
            session,
            title="Mapping",
            draft=draft,
            changed=change.changed,
            diff=editor.unified_diff(saved, change.text, mapping_file.name),
            file_name=mapping_file.name,
        )

    @app.post("/mapping/save")
    async def mapping_save(request: Request) -> Response:
        session = await change_allowed(request)
        form = await request.form()
        try:
            draft_id = int(str(form.get("draft") or ""))
        except ValueError:
            raise HTTPException(400, "say which reviewed change to save (draft)") from None
        draft = store.mapping_draft(draft_id, session.user)
        if draft is None:
            raise HTTPException(404, "no such reviewed change of yours: review it again")
        if editor.sha(mapping_file.read()) != draft["base_sha256"]:
            raise HTTPException(
                409,
                "the mapping file changed since this review (another save, or an engineer's "
                "edit): open the mapping page and make the change again",
            )
        if problems := editor.validate(draft["text"]):
            raise HTTPException(400, f"the mapping is not valid: {problems}")
        version = mapping_file.save(store, session.user, draft["text"], draft["note"])
        store.drop_mapping_draft(draft_id)
        store.record(
            session.user,
            "mapping save",
            mapping_file.name,
            [],
            note=draft["note"],
            status="done",
        )
        return RedirectResponse(f"/mapping?saved={version}#versions", status_code=303)

    @app.post("/mapping/rollback")
    async def mapping_rollback(request: Request) -> Response:
        session = await change_allowed(request)
        form = await request.form()
        try:
            found = store.mapping_version(int(str(form.get("version") or "")))
        except ValueError:
            found = None
        if found is None or found["path"] != mapping_file.name:
            raise HTTPException(404, "no such version of this mapping file")
        note = f"roll back to version {found['id']} ({found['at'][:16]}, {found['user']})"
        version = mapping_file.save(store, session.user, found["text"], note)
        store.record(
            session.user, "mapping roll back", mapping_file.name, [], note=note, status="done"
        )
        return RedirectResponse(f"/mapping?saved={version}#versions", status_code=303)

    return app


PREVIEW_STREAMS = ("charges", "refunds", "customers", "invoices", "products", "payouts")


def _paging(request: Request, page_no: int, total: int) -> dict[str, Any]:
    """Where this page of a long table is, and the links to its neighbours (the query
    string kept, ``page_no`` replaced)."""
    pages = max(1, -(-total // reads.PAGE_ROWS))

    def link(n: int) -> str:
        return str(request.url.include_query_params(page_no=n))

    first = (page_no - 1) * reads.PAGE_ROWS + 1
    return {
        "total": total,
        "page": page_no,
        "pages": pages,
        "first": min(first, total),
        "last": min(page_no * reads.PAGE_ROWS, total),
        "prev": link(page_no - 1) if page_no > 1 else None,
        "next": link(page_no + 1) if page_no < pages else None,
    }


def _money(minor: int | None, currency: str) -> str:
    """Minor units as the currency's decimal string (what finance reads in Sage)."""
    return "" if minor is None else to_decimal_string(int(minor), currency)


def _csv(name: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> Response:
    """A table as CSV (amounts in minor units, as in the snapshot), downloaded as ``name``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _same(sent: str, expected: str) -> bool:
    """Constant-time comparison of a token a client sent (bytes: any text, never a 500)."""
    return secrets.compare_digest(sent.encode(), expected.encode())
