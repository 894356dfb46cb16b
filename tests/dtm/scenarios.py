#!/usr/bin/env python3
"""DTM TCC scenarios run with the unmodified PyPI client ``dtmcli==1.7.7.0`` against tcc.

Usage: scenarios.py DTM_URL BUSI_URL [SCENARIO...]
  (or the environment variables TCC_DTM_URL and TCC_BUSI_URL)

DTM_URL is the coordinator's DTM-compatible API, e.g. http://127.0.0.1:36789/api/dtmsvr.
BUSI_URL is a participant serving, for SVC in ``a`` and ``b``:
  POST BUSI_URL/SVC/try      (called by dtmcli itself) refusing with 409 when the body has "try_fail": true
  POST BUSI_URL/SVC/confirm  (called by the coordinator)
  POST BUSI_URL/SVC/cancel   (called by the coordinator)
and a service ``flaky`` whose confirm answers 503 {"dtm_result": "FAILURE"} for a while (as the test
sets it up).
tcc-http/tests/dtm.rs starts such participants and a coordinator, runs this script, and then checks
what the participants were called with.

Scenarios: success (both branches confirmed), try_failure (every registered branch cancelled),
query (the shape of GET query), flaky_confirm (a and flaky; flaky's confirm fails twice and is
retried until the transaction succeeds) and, only when named, failing_confirm (the same, but it only
submits: the test decides when flaky recovers, and kills the coordinator meanwhile). Without
SCENARIO arguments the first four run. Each prints one JSON line {"scenario": ..., "gid": ...} on stdout;
any failed check exits non-zero.
"""

import base64
import json
import os
import sys

from dtmcli import tcc, utils
from harness import check, fail, query, report, settle


def rows(q):
    """{(branch_id, op): status} of a query answer."""
    return {(b["branch_id"], b["op"]): b["status"] for b in q["branches"]}


def success(dtm, busi):
    gid = utils.gen_gid(dtm)
    bodies = {"a": {"scenario": "success", "amount": 30}, "b": {"scenario": "success", "amount": 30}}

    def branches(t):
        for svc in ("a", "b"):
            r = t.call_branch(bodies[svc], busi + "/%s/try" % svc, busi + "/%s/confirm" % svc, busi + "/%s/cancel" % svc)
            check(r.status_code == 200, "try of %s answered %d" % (svc, r.status_code))

    ret = tcc.tcc_global_transaction(dtm, gid, branches)
    check(ret == gid, "tcc_global_transaction returned %r, expected the gid %r" % (ret, gid))
    q = settle(dtm, gid, "succeed")
    want = {("01", "cancel"): "prepared", ("01", "confirm"): "succeed",
            ("02", "cancel"): "prepared", ("02", "confirm"): "succeed"}
    check(rows(q) == want, "branch statuses %s, expected %s" % (rows(q), want))
    report("success", gid)


def try_failure(dtm, busi):
    gid = utils.gen_gid(dtm)

    reached = {}

    def branches(t):
        t.call_branch({"scenario": "try_failure"}, busi + "/a/try", busi + "/a/confirm", busi + "/a/cancel")
        # b refuses its try: dtmcli raises, and tcc_global_transaction aborts. (Checks cannot fail in
        # here: tcc_global_transaction catches everything, SystemExit included.)
        t.call_branch({"scenario": "try_failure", "try_fail": True}, busi + "/b/try", busi + "/b/confirm", busi + "/b/cancel")
        reached["after_refused_try"] = True

    print("(a traceback of DTMFailureError is expected next: dtmcli prints it before aborting)", file=sys.stderr)
    ret = tcc.tcc_global_transaction(dtm, gid, branches)
    check(not reached, "the refused try did not raise")
    check(ret == "", "tcc_global_transaction returned %r after a refused try, expected ''" % ret)
    q = settle(dtm, gid, "failed")
    want = {("01", "cancel"): "succeed", ("01", "confirm"): "prepared",
            ("02", "cancel"): "succeed", ("02", "confirm"): "prepared"}
    check(rows(q) == want, "branch statuses %s, expected %s" % (rows(q), want))
    report("try_failure", gid)


def query_shape(dtm, busi):
    gid = utils.gen_gid(dtm)
    body = {"scenario": "query", "note": "seat 1A"}
    seen = {}

    def branches(t):
        t.call_branch(body, busi + "/a/try", busi + "/a/confirm", busi + "/a/cancel")
        # Between registration and submit the transaction is prepared.
        q = query(dtm, gid)
        seen["prepared"] = q["transaction"]["status"]

    check(tcc.tcc_global_transaction(dtm, gid, branches) == gid, "the query transaction did not succeed")
    check(seen.get("prepared") == "prepared", "status before submit: %r" % seen.get("prepared"))
    q = settle(dtm, gid, "succeed")
    t = q["transaction"]
    check(t["gid"] == gid and t["trans_type"] == "tcc", "transaction: %s" % t)
    check([(b["branch_id"], b["op"]) for b in q["branches"]] == [("01", "cancel"), ("01", "confirm")],
          "branches: %s" % q["branches"])
    for b in q["branches"]:
        check(b["gid"] == gid, "branch gid: %s" % b)
        check(b["url"] == busi + "/a/" + b["op"], "branch url: %s" % b)
        data = base64.b64decode(b["bin_data"]).decode()
        check(json.loads(data) == body, "branch data %r, registered %r" % (data, body))
    # An unknown gid is answered as DTM answers it.
    missing = query(dtm, "no-such-gid")
    check(missing["transaction"] is None and missing["branches"] == [], "unknown gid: %s" % missing)
    check(utils.gen_gid(dtm) != utils.gen_gid(dtm), "newGid repeats itself")
    report("query", gid)


def confirm_retried(dtm, busi, settled):
    gid = utils.gen_gid(dtm)

    def branches(t):
        for svc in ("a", "flaky"):
            body = {"scenario": "flaky_confirm", "svc": svc}
            r = t.call_branch(body, busi + "/%s/try" % svc, busi + "/%s/confirm" % svc, busi + "/%s/cancel" % svc)
            check(r.status_code == 200, "try of %s answered %d" % (svc, r.status_code))

    # Submit answers once the decision is stored, whatever flaky's confirm answers.
    ret = tcc.tcc_global_transaction(dtm, gid, branches)
    check(ret == gid, "tcc_global_transaction returned %r, expected the gid %r" % (ret, gid))
    if settled:
        q = settle(dtm, gid, "succeed")
        check(not q["transaction"]["tcc"]["flagged"], "flagged: %s" % q)
        report("flaky_confirm", gid)
    else:
        q = query(dtm, gid)
        check(q["transaction"]["status"] == "submitted", "after submit: %s" % q)
        report("failing_confirm", gid)


def flaky_confirm(dtm, busi):
    confirm_retried(dtm, busi, True)


def failing_confirm(dtm, busi):
    confirm_retried(dtm, busi, False)


SCENARIOS = {f.__name__: f for f in (success, try_failure, query_shape, flaky_confirm, failing_confirm)}


def main():
    args = sys.argv[1:]
    dtm = args[0] if len(args) > 0 else os.environ.get("TCC_DTM_URL")
    busi = args[1] if len(args) > 1 else os.environ.get("TCC_BUSI_URL")
    if not dtm or not busi:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    dtm, busi = dtm.rstrip("/"), busi.rstrip("/")
    names = args[2:] or ["success", "try_failure", "query_shape", "flaky_confirm"]
    for name in names:
        if name not in SCENARIOS:
            fail("unknown scenario %r (known: %s)" % (name, ", ".join(SCENARIOS)))
        SCENARIOS[name](dtm, busi)
    print("all DTM scenarios passed", file=sys.stderr)


if __name__ == "__main__":
    main()
