"""Batch mode: a stage's new calls through a provider's batch API, at its batch rate.

The layout OpenAI, Together and vLLM's batch runner share: the requests are uploaded as one
JSONL file (`POST /v1/files`, purpose "batch"), one line each:

    {"custom_id": <call key>, "method": "POST", "url": "/v1/chat/completions", "body": {...}}

with the body an online call would send (`build_payload`), a batch is created from it
(`POST /v1/batches`, endpoint /v1/chat/completions, completion window 24h) and polled
(`GET /v1/batches/{id}`) until it is completed, failed, expired or cancelled; then its
output and error files are downloaded (`GET /v1/files/{id}/content`), one line per request:

    {"custom_id": ..., "response": {"status_code": 200, "body": {...chat.completion...}}, "error": null}

What this module guarantees:

* The custom id is the call key, so an answer lands in the call cache under the key the
  online call has: a call answered in batch mode is a hit in online mode and back.
* Every line's worst case is reserved on the ledger before the file is uploaded (at the
  batch rate), and each answer is settled at its real cost at the batch rate (its cached
  input at the cached rate). Lines that do not fit the cap wait for the next round, sent
  once the batch before has settled; when none fits, BudgetExceeded.
* A journal (charbuild.store.calls.BatchJournals) holding the batch id and the lines'
  call keys is written before the batch is polled (and one holding the uploaded file id
  before the batch is created), so a killed run's successor polls the same batch: the
  provider sees one upload and one batch.
* A line that failed (an error, a status other than 200, an unreadable body) or is missing
  from the output is handed back to be asked online, as are the unfinished lines of an
  expired or cancelled batch; the finished ones are kept. Online, not a new batch: those
  are few, and a new batch would add up to another 24 hours for them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Callable, Mapping

from charbuild.backends.base import GenRequest, GenResult, Interrupted
from charbuild.ledger import BudgetExceeded, Reservation

if TYPE_CHECKING:
    from charbuild.backends.openai_backend import OpenAIBackend
    from charbuild.ledger import Ledger
    from charbuild.store.calls import BatchJournals

log = logging.getLogger(__name__)

JOURNAL_SCHEMA = 1
MAX_LINES = 50_000  # OpenAI's limit on requests per batch
# Fewer new calls than this go online: a batch's wait (minutes to 24 h) is not worth the
# cents it saves on a handful of calls (prompt expansion asks one call per trait).
MIN_CALLS = 8
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
POLL_S = (5.0, 60.0)  # first and longest wait between polls (doubling); CHARBUILD_BATCH_POLL_S fixes it


def poll_schedule() -> tuple[float, float]:
    fixed = os.environ.get("CHARBUILD_BATCH_POLL_S")
    if fixed:
        try:
            v = max(0.0, float(fixed))
            return v, v
        except ValueError:
            log.warning("CHARBUILD_BATCH_POLL_S=%r is not a number; polling every %gs to %gs", fixed, *POLL_S)
    return POLL_S


def run_batches(client: "OpenAIBackend", items: Mapping[str, GenRequest], journals: "BatchJournals",
                store: Callable[[str, GenResult], None], ledger: "Ledger | None") -> list[str]:
    """Ask `items` (custom id = call key -> request) through the batch API; `store(id, result)`
    gets each answer as it is downloaded, in the calling thread (a journal is removed only
    after all its answers were stored). Batches left by a killed run that hold any of these
    ids are collected first (every line of them is stored: they are paid for). Returns the
    ids still unanswered, to be asked online."""
    want = dict(items)
    failed: list[str] = []
    active: list[_Sent] = []
    try:
        for jid, j in journals.open():
            if not want.keys() & j["lines"].keys():
                continue
            sent = _Sent(jid, j, _reserve_lines(ledger, j["lines"]))
            active.append(sent)
            if not j.get("batch_id"):  # killed after the upload: the batch may or may not exist
                b = client.batch_find(j["input_file_id"]) or client.batch_create(j["input_file_id"], {"charbuild": jid})
                j.update(batch_id=b["id"], state="created")
                journals.save(jid, j)
            log.info("batch %s: resuming a batch sent by an earlier run (%d lines)", j["batch_id"], len(j["lines"]))
        for s_ in active:
            for cid in s_.journal["lines"]:
                want.pop(cid, None)
        if not active and len(want) < MIN_CALLS:
            return list(want)
        while active or want:
            if want:
                fits, stopped = _reserve_what_fits(client, ledger, want, wait=not active)
                if stopped is not None and not fits:
                    if not active:
                        raise stopped
                    # else: the resumed batches settle first; then these lines may fit
                try:
                    for chunk in _chunks(list(fits), MAX_LINES):
                        active.append(_send(client, journals, {c: want[c] for c in chunk},
                                            {c: fits[c] for c in chunk}))
                except BaseException:
                    for r in fits.values():  # the chunks never sent
                        if r is not None and not r.settled:
                            r.release()
                    raise
                for c in fits:
                    del want[c]
            failed += _collect(client, journals, active, store, items)
            active = []
            # Lines that did not fit go in the next round: what this one really cost is
            # settled now, usually below what it held. A round where none fits raises.
        return failed + list(want)
    except BaseException:
        for s_ in active:  # not collected: hand the reservations back (the journal stays for the next run)
            s_.release()
        raise


class _Sent:
    """One batch sent: its journal and the reservation of each line."""

    def __init__(self, jid: str, journal: dict, reservations: dict[str, Reservation | None]):
        self.jid, self.journal, self.reservations = jid, journal, reservations

    def release(self) -> None:
        for r in self.reservations.values():
            if r is not None and not r.settled:
                r.release()


def _reserve_lines(ledger, lines: Mapping[str, dict]) -> dict[str, Reservation | None]:
    """A resumed batch is running at the provider whatever this run does: its lines are
    reserved at once, or the run stops (its journal stays, so a run with a higher cap
    collects it)."""
    out: dict[str, Reservation | None] = {}
    try:
        for cid, line in lines.items():
            out[cid] = ledger.reserve(float(line.get("usd", 0.0)), int(line.get("tokens", 0))) if ledger else None
    except BudgetExceeded:
        for r in out.values():
            if r is not None:
                r.release()
        raise
    return out


def _reserve_what_fits(client, ledger, want: Mapping[str, GenRequest],
                       wait: bool) -> tuple[dict[str, Reservation | None], BudgetExceeded | None]:
    """Reserve lines in request order until one would cross a cap: those go in this round,
    the rest in a later one, and the cap's BudgetExceeded comes back with them. When not even
    the first fits but would once other targets' calls in flight settle (`wait`), it waits."""
    fits: dict[str, Reservation | None] = {}
    if ledger is None:
        return {c: None for c in want}, None
    for cid, req in want.items():
        usd, tokens = client.worst_case(req, batch=True)
        while True:
            try:
                fits[cid] = ledger.reserve(usd, tokens)
                break
            except BudgetExceeded as e:
                if fits or not wait or not ledger.fits_once_settled(usd, tokens):
                    return fits, e
                if client.interrupted:
                    raise Interrupted("openai backend: interrupted while waiting for the budget") from None
                time.sleep(0.05)  # calls of other targets hold the budget: wait for them to settle
    return fits, None


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def batch_line(custom_id: str, model: str, req: GenRequest) -> dict:
    """One line of the uploaded file: the online call's body under the call key."""
    from charbuild.backends.openai_backend import build_payload

    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": build_payload(model, req)}


def _send(client, journals, reqs: Mapping[str, GenRequest], reservations: dict) -> _Sent:
    from charbuild.backends.openai_backend import prefix_order

    order = list(reqs)
    order = [order[i] for i in prefix_order([reqs[c] for c in order])]  # shared system prompts side by side
    jsonl = "".join(json.dumps(batch_line(c, client.cfg.model, reqs[c])) + "\n" for c in order)
    lines = {}
    for c in order:
        r = reservations.get(c)
        usd, tokens = (r.usd, r.tokens) if r is not None else client.worst_case(reqs[c], batch=True)
        lines[c] = {"stop": list(reqs[c].stop), "usd": usd, "tokens": tokens}
    sent = _Sent(uuid.uuid4().hex, {"schema": JOURNAL_SCHEMA, "model": client.cfg.model,
                                    "endpoint": client.cfg.base_url, "created": time.time(), "lines": lines},
                 reservations)
    try:
        j = sent.journal
        j["input_file_id"] = client.batch_upload(jsonl.encode("utf-8"))
        j["state"] = "uploaded"
        journals.save(sent.jid, j)  # before the batch exists: a kill from here on finds it by its file
        b = client.batch_create(j["input_file_id"], {"charbuild": sent.jid})
        j.update(batch_id=b["id"], state="created")
        journals.save(sent.jid, j)  # before polling: a rerun polls this batch instead of paying again
    except BaseException:
        sent.release()
        raise
    log.info("batch %s: %d calls sent to %s", j["batch_id"], len(lines), client.cfg.base_url)
    return sent


def _collect(client, journals, active: list[_Sent], store, items: Mapping[str, GenRequest]) -> list[str]:
    """Poll every batch until it ends, then store its answers; the ids of `items` that it
    did not answer."""
    first, longest = poll_schedule()
    wait = first
    left = list(active)
    failed: list[str] = []
    from charbuild.backends.openai_backend import NotFound

    while left:
        for s_ in list(left):
            try:
                b = client.batch_get(s_.journal["batch_id"])
            except NotFound:
                # Gone at the provider (or another account's): nothing will come of it, and
                # keeping its journal would stop every later run here.
                log.warning("batch %s: the provider does not know it; asking its calls online",
                            s_.journal["batch_id"])
                b = {"status": "unknown"}
            if b.get("status") in TERMINAL or b.get("status") == "unknown":
                failed += _take(client, journals, s_, b, store, items)
                left.remove(s_)
        if left:
            _sleep(client, wait)
            wait = min(longest, wait * 2)
    return failed


def _take(client, journals, sent: _Sent, b: dict, store, items) -> list[str]:
    from charbuild.backends.openai_backend import result_of

    j = sent.journal
    got: dict[str, GenResult] = {}
    why: dict[str, str] = {}
    for fid in (b.get("output_file_id"), b.get("error_file_id")):
        if not fid:
            continue
        for raw in client.batch_file(fid).decode("utf-8", "replace").splitlines():
            try:
                line = json.loads(raw)
                cid = line["custom_id"]
            except (ValueError, KeyError, TypeError):
                continue
            if cid not in j["lines"] or cid in got:
                continue
            resp = line.get("response") if isinstance(line.get("response"), dict) else {}
            if line.get("error") or resp.get("status_code") != 200:
                why[cid] = str(line.get("error") or f"status {resp.get('status_code')}")[:200]
                continue
            try:
                got[cid] = result_of(resp["body"], j["lines"][cid].get("stop") or ())
            except (KeyError, IndexError, TypeError, AttributeError):
                why[cid] = "unreadable body"
    for cid, res in got.items():
        usd = client.usd_of_result(res, batch=True)
        res.meta.update(usd=usd, batch_id=j["batch_id"])
        r = sent.reservations.get(cid)
        if r is not None:
            r.settle(usd, res.prompt_tokens, res.completion_tokens,
                     cached_in=int(res.meta.get("cached_prompt_tokens") or 0), batch=True)
        store(cid, res)
    sent.release()  # the lines that brought no answer
    missing = [c for c in j["lines"] if c not in got]
    if missing:
        log.warning("batch %s ended %s with %d of %d lines unanswered (%s); asking them online", j["batch_id"],
                    b.get("status"), len(missing), len(j["lines"]),
                    "; ".join(f"{why.get(c, 'missing from the output')}" for c in missing[:3]))
    journals.done(sent.jid)
    return [c for c in missing if c in items]


def _sleep(client, seconds: float) -> None:
    """Between polls; an interrupt ends it (the batch runs on, and the next run collects it)."""
    end = time.monotonic() + seconds
    while True:
        if client.interrupted:
            raise Interrupted("openai backend: interrupted while a batch was running; the next run collects it")
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))
