"""The finance console in real Chromium (Playwright driving Debian's ``chromium``), served by
the real ``stripe-sage console`` command, over a business with a dead letter: a charge names
an ERP order Sage does not have, under a mapping that holds such sales (``reject``).

A person logs in, finds the exception, reads its reason and likely fix, fixes the cause in
Sage (creates the order), replays from the page, and sees the documents in Sage (read back
over HTTP) and the exception gone. An auditor sees no buttons and a forged change is refused;
a POST without the CSRF token is refused; wrong passwords are throttled. A screenshot of each
page is kept under ``tests/artifacts/console/``.
"""

from __future__ import annotations

import ast
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from devkit.sandbox.runner import free_port
from stripe_sage.console import reads
from tests.helpers import loopback
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    is_plain,
    make_env,
    product_env,
    run_flow,
    sage_all,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
ORDER = "SO7777777"
ADMIN, AUDITOR = ("finance", "finance-pass-1234"), ("auditor", "auditor-pass-1234")


@dataclass
class Console:
    env: Env
    url: str
    charge: dict[str, Any]
    sage_customer: str
    store: Path


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "stripe-sage"), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Console]:
    from stripe_sage.mapping import default_mapping_text

    tmp = tmp_path_factory.mktemp("console")
    mp = pytest.MonkeyPatch()
    env = make_env(tmp, charges=60, seed=23, monkeypatch=mp)
    strict = tmp / "strict.yaml"
    strict.write_text(
        default_mapping_text().replace("unknown_erp_order: on_account", "unknown_erp_order: reject")
    )
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        mp.setenv("MAPPING_FILE", str(strict))
        store = tmp / "console.sqlite3"
        mp.setenv("CONSOLE_STORE", str(store))  # the runs in this process copy its records
        w = env.pair.world
        good = next(k for k in range(w.count("customers")) if is_plain(w.render("customers", k)))
        cus = w.make_id("customers", good)
        with env.stripe() as s:
            made = s.post(
                "/_sandbox/activity",
                json={
                    "action": "charge",
                    "customer": cus,
                    "amount": 4200,
                    "metadata": {"erp_order_id": ORDER},
                },
            ).json()
            charge = s.get(f"/v1/charges/{made['id']}").json()
        run_flow(trigger="test")  # publishes the snapshot the console reads
        with duckdb.connect(str(env.db), read_only=True) as con:
            sage_customer = con.execute(
                "SELECT sage_id FROM sage.xref WHERE stripe_id = ? AND doc_type = 'customer'",
                [cus],
            ).fetchall()[0][0]
        child_env = {
            **os.environ,
            **product_env(env, QUALITY_ENGINE=ACCOUNTING_QUALITY),
            "MAPPING_FILE": str(strict),
            "CONSOLE_STORE": str(store),
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        # The session's Prefect server, which serves no deployment: the console finds no
        # replay-dead-letters deployment there and replays in a subprocess (whose flow run
        # reports to that server rather than starting an ephemeral one on a busy machine).
        from prefect.settings import PREFECT_API_URL

        child_env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        for (user, password), role in ((ADMIN, "admin"), (AUDITOR, "auditor")):
            done = _cli(
                ["console", "set-password", user, "--role", role, "--password-from-env"],
                {**child_env, "CONSOLE_PASSWORD": password},
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert password not in done.stdout
        port = free_port()
        log = open(tmp / "console.log", "wb")  # noqa: SIM115 - the child writes to it
        proc = subprocess.Popen(
            [str(BIN / "stripe-sage"), "console", "--port", str(port)],
            env=child_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if loopback.get(url + "/login", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (tmp / "console.log").read_text()
                assert time.monotonic() < deadline, "the console did not come up"
                time.sleep(0.3)
            yield Console(env, url, charge, sage_customer, store)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    mp.undo()


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Debian's chromium is needed: `make browser` installs it"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # Debian's browser, never one Playwright downloads.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def _shot(page: Any, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _login(browser: Any, url: str, user: str, password: str) -> Any:
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.goto(url + "/")
    assert "/login" in page.url  # nothing without a login
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    return page


def _dead_letters(env: Env) -> dict[str, str]:
    with duckdb.connect(str(env.db), read_only=True) as con:
        return dict(
            con.execute(
                "SELECT doc_key, status FROM sage.outbox WHERE status <> 'posted'"
            ).fetchall()
        )


def test_an_auditor_reads_everything_and_changes_nothing(console: Console, browser: Any) -> None:
    key = f"invoice:{console.charge['id']}"
    page = _login(browser, console.url, *AUDITOR)
    page.goto(f"{console.url}/exceptions/{key}")
    assert ORDER in page.inner_text(".reason")
    # No button that changes anything...
    assert page.locator("form[action='/actions/replay']").count() == 0
    assert page.locator("form[action='/actions/resolve']").count() == 0
    _shot(page, "auditor-exception")
    csrf = page.locator("form[action='/logout'] input[name=csrf]").input_value()
    # ...and a forged change, with the auditor's own valid CSRF token, is refused.
    before = _dead_letters(console.env)
    for path, form in (
        ("/actions/replay", {"csrf": csrf, "doc_key": key}),
        ("/actions/resolve", {"csrf": csrf, "doc_key": key, "note": "forged"}),
    ):
        r = page.request.post(console.url + path, form=form, max_redirects=0)
        assert r.status == 403, (path, r.status)
    assert _dead_letters(console.env) == before
    page.goto(console.url + "/actions")
    assert "Nothing yet." in page.inner_text("main")


def test_a_post_without_the_csrf_token_is_refused(console: Console, browser: Any) -> None:
    key = f"invoice:{console.charge['id']}"
    page = _login(browser, console.url, *ADMIN)
    forms = ({"doc_key": key}, {"doc_key": key, "csrf": "not-the-token"}, {"csrf": "jeton-forgé"})
    for form in forms:
        r = page.request.post(console.url + "/actions/replay", form=form, max_redirects=0)
        assert r.status == 403
    # The same request from another site's page carries no cookie (SameSite=Strict) and no
    # session: refused before anything else.
    r = loopback.post(console.url + "/actions/replay", data={"doc_key": key})
    assert r.status_code == 401
    page.goto(console.url + "/actions")
    assert "Nothing yet." in page.inner_text("main")


def test_repeated_wrong_passwords_are_throttled(console: Console, browser: Any) -> None:
    from stripe_sage.console.store import ConsoleStore

    ConsoleStore(console.store).set_password("temp", "temp-pass-12345", role="auditor")
    page = browser.new_context().new_page()
    for attempt in range(6):
        page.goto(console.url + "/login")
        page.fill("input[name=user]", "temp")
        # The sixth try has the right password: still refused while the lock holds.
        page.fill("input[name=password]", "temp-pass-12345" if attempt == 5 else "wrong")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        expected = 429 if attempt == 5 else 401
        assert answer.value.status == expected, attempt
    assert "Too many wrong passwords" in page.inner_text("[role=alert]")
    assert "/login" in page.url
    _shot(page, "login-throttled")


def test_find_fix_and_replay_a_dead_letter(console: Console, browser: Any) -> None:
    charge = console.charge["id"]
    keys = {f"invoice:{charge}", f"cash_receipt:{charge}"}
    with console.env.sage() as c:  # Sage has neither document before the fix
        assert not c.get("/api/v1/invoices", params={"reference": charge}).json()["data"]
    page = _login(browser, console.url, *ADMIN)
    # Overview: the dead count is what the outbox holds dead (the held sale's two documents).
    dead = [k for k, s in _dead_letters(console.env).items() if s == "dead"]
    assert keys <= set(dead)
    assert page.inner_text("a.card[href='/exceptions?state=dead'] .n") == str(len(dead))
    assert "Create sales order SO" in page.inner_text("main")
    # The AR tie-out total: the held sale's invoice and receipt are both dead, so it ties out.
    assert "ties out" in page.inner_text("#ar-tie-out")
    _shot(page, "overview")

    page.click("a[href='/exceptions']")
    page.click(f"a:text-is('invoice:{charge}')")
    assert ORDER in page.inner_text(".reason")
    assert "Create sales order SO7777777 in Sage" in page.inner_text(".fix")
    # The Stripe object and the Sage payload side by side.
    stripe_side, sage_side = page.locator(".side-by-side pre").all_inner_texts()
    assert f'"id": "{charge}"' in stripe_side and ORDER in stripe_side
    assert f'"reference": "{charge}"' in sage_side and f'"sales_order_no": "{ORDER}"' in sage_side
    _shot(page, "exception")
    # Secrets are never rendered, on any page seen so far.
    for secret in console.env.secrets:
        assert secret not in page.content()

    # The cause, fixed where it lives: finance creates the order in Sage.
    with console.env.sage() as c:
        c.post(
            "/_sandbox/seed",
            json={
                "sales_orders": [
                    {
                        "order_no": ORDER,
                        "customer_id": console.sage_customer,
                        "order_date": "2026-01-05",
                        "currency": console.charge["currency"].upper(),
                        "lines": [
                            {
                                "item": "WEB-ORDER",
                                "quantity": "1",
                                "unit_price_minor": console.charge["amount"],
                            }
                        ],
                    }
                ]
            },
        ).raise_for_status()
    page.fill("input[name=note]", f"created {ORDER} in Sage")
    page.click("text=Resolve with this note")
    assert f"created {ORDER} in Sage" in page.inner_text(".facts")
    # "The same reason" is every sale held for a missing order, ours and the business's own.
    page.click("text=Replay all dead with the same reason")
    page.wait_for_url(re.compile(r"/actions"))
    row_id = page.url.rsplit("#", 1)[1]  # the action just recorded, newest first
    row = page.locator(f"#{row_id}")
    assert "replay" in row.inner_text() and "documents)" in row.inner_text()
    # htmx polls the row until the replay's subprocess ends.
    page.wait_for_selector(
        f"#{row_id} :is(.action-done, .action-failed, .action-dead-again)", timeout=240_000
    )
    outcome = row.inner_text()
    _shot(page, "actions")
    # Only the sales whose order Sage still lacks are dead again: read from Stripe and Sage.
    with console.env.stripe() as s, console.env.sage() as c:
        orders = {o["order_no"] for o in sage_all(c, "salesorders")}
        held = sorted(
            ch["id"]
            for ch in stripe_all(s, "/v1/charges")
            if ch["status"] == "succeeded"
            and ch["captured"]
            and ch["metadata"].get("erp_order_id")
            and ch["metadata"]["erp_order_id"] not in orders
        )
    assert held and charge not in held
    expected_again = sorted(f"{t}:{h}" for h in held for t in ("cash_receipt", "invoice"))
    summary = re.search(r"released (\d+) dead letters; dead again: (\[.*\])", outcome)
    assert summary, outcome
    assert sorted(ast.literal_eval(summary.group(2))) == expected_again
    assert int(summary.group(1)) >= len(expected_again) + 2
    assert "dead again" in page.inner_text(".state.action-dead-again")

    with console.env.sage() as c:
        invoices = [d for d in sage_all(c, "invoices") if d["reference"] == charge]
        receipts = [d for d in sage_all(c, "cashreceipts") if d["reference"] == charge]
    assert len(invoices) == 1 and len(receipts) == 1
    assert not keys & set(_dead_letters(console.env))
    # The replay published a snapshot: the exception is gone from the console too.
    page.goto(f"{console.url}/exceptions/invoice:{charge}")
    assert "Not an exception" in page.inner_text("main")
    assert re.search(r"replay.*released \d+ dead letters", page.inner_text("table.actions-log"))
    page.goto(console.url + "/exceptions?state=dead")
    listed = page.inner_text("main")
    assert charge not in listed and all(h in listed for h in held)
    _shot(page, "exceptions-after-replay")

    # The next run copies the console's records into ops.* for analysts (no password hash).
    run_flow(trigger="test")
    snapshot = console.env.db.parent / "snapshot" / "analytics.duckdb"
    with duckdb.connect(str(snapshot), read_only=True) as con:
        copied = con.sql(
            'SELECT "user", action, status, note, doc_keys FROM ops.console_actions ORDER BY id'
        ).fetchall()
        users = dict(con.sql("SELECT name, role FROM ops.console_users").fetchall())
        columns = {r[0] for r in con.sql("DESCRIBE ops.console_users").fetchall()}
    assert len(copied) == 2  # the resolution and the replay: the refused POSTs left none
    resolution = ("finance", "resolve", "done", f"created {ORDER} in Sage", [f"invoice:{charge}"])
    assert copied[0] == resolution
    assert copied[1][:3] == ("finance", "replay", "dead again")
    assert set(copied[1][4]) == keys | set(expected_again)
    assert users["finance"] == "admin" and users["auditor"] == "auditor"
    assert not any("hash" in c or "password" in c for c in columns)


def test_reconciliation_drills_down_from_a_payout_to_its_transactions(
    console: Console, browser: Any
) -> None:
    with console.env.stripe() as s:
        payouts = stripe_all(s, "/v1/payouts")
        paid = next(p for p in payouts if p["automatic"] and p["status"] == "paid")
        items = stripe_all(s, "/v1/balance_transactions", payout=paid["id"])
    page = _login(browser, console.url, *AUDITOR)  # reading needs no admin
    page.click("a[href='/reconciliation']")
    listed = page.locator("main table#payouts tbody tr")
    assert listed.count() == len(payouts)  # every payout Stripe lists, read from the snapshot
    # The AR tie-out per customer: Stripe's side is the open amount of the customer's open
    # invoices in the settlement currency (this business may have none open), and whatever
    # differs is explained by documents not posted yet (the dead letters this module made).
    with console.env.stripe() as s:
        open_usd: dict[str, int] = {}
        for i in stripe_all(s, "/v1/invoices"):
            if i["status"] == "open" and i["currency"] == "usd" and i["amount_remaining"]:
                open_usd[i["customer"]] = open_usd.get(i["customer"], 0) + i["amount_remaining"]
    got = page.request.get(f"{console.url}/ar-tie-out.csv").text()
    assert got.splitlines()[0] == ",".join(reads.AR_COLUMNS)
    ar_csv = list(csv.DictReader(io.StringIO(got)))
    stripe_side = {
        r["customer"]: int(r["stripe_open"])
        for r in ar_csv
        if r["currency"] == "USD" and int(r["stripe_open"])
    }
    assert stripe_side == open_usd
    assert all(int(r["unexplained"]) == 0 for r in ar_csv)
    if ar_csv:
        assert page.locator("main table#ar-customers tbody tr").count() == len(ar_csv)
    else:
        assert "No open AR on either side" in page.inner_text("main")
    assert "ties out" in page.inner_text("#ar-tie-out")
    _shot(page, "reconciliation")
    page.click(f"a:text-is('{paid['id']}')")
    rows = page.locator("main table tbody tr")
    assert rows.count() == len(items)
    text = page.inner_text("main table")
    # Each charge in the payout shows the Sage documents behind it, with their Sage numbers.
    charges = [i["source"] for i in items if i["type"] == "charge"]
    assert charges and all(c in text for c in charges)
    assert "cash_receipt " in text
    _shot(page, "payout")
    csv_text = page.request.get(f"{console.url}/reconciliation/{paid['id']}.csv").text()
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("id,created,type") and len(lines) == len(items) + 1
    # The CSV needs a login too.
    unauthenticated = loopback.get(f"{console.url}/reconciliation.csv", follow_redirects=False)
    assert unauthenticated.status_code == 303


def _preview_shows(page: Any, *texts: str) -> str:
    """The preview panel once htmx has swapped in the answer to the form as it now is
    (Playwright's expect retries until the texts are there, or fails after its timeout)."""
    from playwright.sync_api import expect

    for text in texts:
        expect(page.locator("#preview")).to_contain_text(text, timeout=20_000)
    return str(page.inner_text("#preview"))


def test_the_mapping_editor_previews_saves_replays_and_rolls_back(
    console: Console, browser: Any
) -> None:
    """Last in the module: it changes the mapping the replays use, and rolls it back."""
    from stripe_sage.console.store import ConsoleStore

    mapping_file = Path(console.store.parent / "strict.yaml")
    original = mapping_file.read_bytes()
    with console.env.stripe() as s, console.env.sage() as c:
        refund = next(r for r in stripe_all(s, "/v1/refunds") if r["reason"] == "duplicate")
        # A payout with fees and no dispute: its journal then has no chargeback line the
        # fees could merge into when they move to the chargebacks account below.
        for paid in stripe_all(s, "/v1/payouts"):
            if not (paid["automatic"] and paid["status"] == "paid"):
                continue
            moved = stripe_all(s, "/v1/balance_transactions", payout=paid["id"])
            fees = [b for b in moved if b["fee"] or b["reporting_category"] == "fee"]
            if fees and not any(b["reporting_category"].startswith("dispute") for b in moved):
                break
        else:
            raise AssertionError("no paid automatic payout with fees and no dispute")
        chart = {a["account"] for a in sage_all(c, "glaccounts")}
    # Another expense account of Sage's chart (the chargebacks account, 6110).
    new_fees_account = sorted(a for a in chart - {"6100"} if a.startswith("6"))[0]

    # An auditor reads the mapping and changes nothing, not even with a forged POST.
    auditor = _login(browser, console.url, *AUDITOR)
    auditor.goto(console.url + "/mapping")
    assert auditor.locator("button:text('Review the change')").count() == 0
    assert auditor.locator("[name='/accounts/merchant_fees']").is_disabled()
    csrf = auditor.locator("form[action='/logout'] input[name=csrf]").input_value()
    for path, form in (
        ("/mapping/review", {"csrf": csrf, "/source_code": "ZZ"}),
        ("/mapping/save", {"csrf": csrf, "draft": "1"}),
        ("/mapping/rollback", {"csrf": csrf, "version": "1"}),
    ):
        r = auditor.request.post(console.url + path, form=form, max_redirects=0)
        assert r.status == 403, (path, r.status)
    assert mapping_file.read_bytes() == original

    page = _login(browser, console.url, *ADMIN)
    r = page.request.post(console.url + "/mapping/review", form={"/source_code": "ZZ"})
    assert r.status == 403  # no CSRF token
    page.click("a[href='/mapping']")
    # The fees account is chosen from Sage's own chart.
    offered = page.locator("select[name='/accounts/merchant_fees'] option").evaluate_all(
        "os => os.map(o => o.value)"
    )
    assert set(offered) == chart

    # Live preview: a refund's credit memo, then a payout's journal, as the form changes.
    page.select_option("select[name=_stream]", "refunds")
    page.fill("input[name=_ids]", refund["id"])
    _preview_shows(page, refund["id"], "Duplicate charge")
    page.click("summary:text('Refunds')")  # sections open on demand (General, GL accounts are)
    page.click("summary:text('Charges')")
    page.fill("[name='/refunds/credit_memo/reason/value_map/duplicate']", "Charged twice")
    _preview_shows(page, "Charged twice", "changed")
    assert "Duplicate charge" in page.inner_text("#preview .doc-changes")
    assert "→ Charged twice" in page.inner_text("#preview .doc-changes")
    page.select_option("select[name='/accounts/merchant_fees']", new_fees_account)
    page.select_option("select[name=_stream]", "payouts")
    page.fill("input[name=_ids]", paid["id"])
    _preview_shows(page, paid["id"], f"6100 → {new_fees_account}")
    # The held sales' policy: post such receipts on account instead of dead-lettering them.
    page.select_option("select[name='/charges/unknown_erp_order']", "on_account")
    _shot(page, "mapping-preview")

    # A value the file cannot hold is refused at its field, the other changes kept.
    page.fill("[name='/source_code']", "STR")
    page.click("button:text('Review the change')")
    error = page.locator("[data-for='/source_code']")
    assert "source_code" in error.inner_text() and "pattern" in error.inner_text()
    assert page.input_value("[name='/refunds/credit_memo/reason/value_map/duplicate']") == (
        "Charged twice"
    )
    assert page.input_value("input[name=_ids]") == paid["id"]  # the preview's rows kept too
    _shot(page, "mapping-error")
    assert mapping_file.read_bytes() == original
    page.fill("[name='/source_code']", "ST")
    page.click("button:text('Review the change')")
    diff = page.inner_text("pre.diff")
    assert '-  merchant_fees: "6100"' in diff and f'+  merchant_fees: "{new_fees_account}"' in diff
    assert "+        duplicate: Charged twice" in diff
    assert "+  unknown_erp_order: on_account" in diff
    _shot(page, "mapping-review")
    assert mapping_file.read_bytes() == original  # nothing saved before the save
    page.click("button:text('Save this version')")
    page.wait_for_url(re.compile(r"/mapping\?saved=\d+"))
    saved = mapping_file.read_bytes()
    store = ConsoleStore(console.store)
    versions = store.mapping_versions(str(mapping_file))
    assert [v["user"] for v in versions] == ["finance", "(file)"]
    # Byte for byte the version recorded, and what `mapping preview` validates...
    newest, found = (store.mapping_version(v["id"]) for v in versions)
    assert newest is not None and found is not None
    assert saved == newest["text"].encode() and found["text"].encode() == original
    env = {**product_env(console.env), "PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    done = _cli(
        [
            "mapping",
            "preview",
            "--mapping",
            str(mapping_file),
            "--stream",
            "refunds",
            "--id",
            refund["id"],
            "--html",
            str(console.store.parent / "preview.html"),
        ],
        env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mapping {mapping_file}: valid" in done.stdout and "Charged twice" in done.stdout
    # ...with every comment of the file kept.
    comments = [ln.strip() for ln in original.decode().splitlines() if "#" in ln]
    assert all(any(c in ln for ln in saved.decode().splitlines()) for c in comments[:5])
    assert sum("#" in ln for ln in saved.decode().splitlines()) == len(comments)
    page.goto(console.url + "/actions")
    log = page.inner_text("table.actions-log")
    assert "mapping save" in log and "merchant_fees" in log

    # The held sales, replayed under the saved mapping, post on account.
    dead = [k for k, s in _dead_letters(console.env).items() if s == "dead"]
    held = sorted({k.split(":", 1)[1] for k in dead if k.startswith("cash_receipt:")})
    assert held
    page.goto(f"{console.url}/exceptions/cash_receipt:{held[0]}")
    assert "Sage has no such sales order" in page.inner_text(".reason")
    page.click("text=Replay all dead with the same reason")
    page.wait_for_url(re.compile(r"/actions"))
    row_id = page.url.rsplit("#", 1)[1]
    page.wait_for_selector(
        f"#{row_id} :is(.action-done, .action-failed, .action-dead-again)", timeout=240_000
    )
    assert "done" in page.inner_text(f"#{row_id} .state"), page.inner_text(f"#{row_id}")
    with console.env.sage() as c:
        receipts = {d["reference"]: d for d in sage_all(c, "cashreceipts")}
    assert all(h in receipts for h in held)
    assert not {f"cash_receipt:{h}" for h in held} & set(_dead_letters(console.env))

    # Roll back: the file is the one found before the first save again, byte for byte.
    page.goto(console.url + "/mapping#versions")
    page.click(f"#version-{versions[1]['id']} button:text('Roll back to this')")
    page.wait_for_url(re.compile(r"/mapping\?saved=\d+"))
    assert mapping_file.read_bytes() == original
    assert page.input_value("[name='/refunds/credit_memo/reason/value_map/duplicate']") == (
        "Duplicate charge"
    )
    _shot(page, "mapping-versions")
    page.goto(console.url + "/actions")
    assert "mapping roll back" in page.inner_text("table.actions-log")
