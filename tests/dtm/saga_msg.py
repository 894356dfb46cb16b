#!/usr/bin/env python3
"""DTM saga and two-phase message scenarios run with the unmodified PyPI client ``dtmcli==1.7.7.0``.

Usage: saga_msg.py DTM_URL BUSI_URL

BUSI_URL serves, for SVC in ``a``, ``b`` and ``c``:
  POST BUSI_URL/SVC/action      refusing with 409 FAILURE when the body has "action_fail": true
  POST BUSI_URL/SVC/compensate
and the back-checks GET BUSI_URL/committed/query (SUCCESS), BUSI_URL/rolledback/query (409 FAILURE).
tcc-http/tests/dtm.rs starts such a participant and a coordinator, runs this script and then checks
what the participant was called with.

Scenarios (each prints one JSON line {"scenario": ..., "gid": ...}; a failed check exits non-zero):
- saga_success: Saga with two steps, wait_result: both actions run in order;
- saga_refused: the second action refuses: submit with wait_result raises DTMFailureError, the saga
  ends failed, both steps compensated in reverse order;
- saga_concurrent: a concurrent saga sent raw as DTM's Go client sends it (custom_data with orders;
  dtmcli's Saga.add_branch_order is broken), c after a and b;
- msg_submit: Msg prepare + submit: every action runs;
- msg_do_and_submit: Msg.do_and_submit with a local transaction that succeeds: submitted;
- msg_do_and_abort: Msg.do_and_submit whose local transaction raises DTMFailureError: aborted, no
  action called;
- msg_backcheck_committed / msg_backcheck_rolledback: prepared and left so (the initiator "crashed"),
  timeout_to_fail 1: the coordinator asks query_prepared and submits or aborts.
"""

import json
import sys

import requests
from dtmcli import msg, saga, utils
from harness import HTTP_TIMEOUT, check, fail, query, report, settle


def saga_success(dtm, busi):
    gid = utils.gen_gid(dtm)
    s = saga.Saga(dtm, gid)
    s.add({"amount": 30}, busi + "/a/action", busi + "/a/compensate")
    s.add({"amount": 30}, busi + "/b/action", busi + "/b/compensate")
    s.trans_base.wait_result = True
    s.submit()
    q = settle(dtm, gid, "succeed")
    check(q["transaction"]["trans_type"] == "saga", "trans_type: %s" % q["transaction"])
    ops = [(b["branch_id"], b["op"], b["status"]) for b in q["branches"]]
    check(ops == [("01", "compensate", "prepared"), ("01", "action", "succeed"),
                  ("02", "compensate", "prepared"), ("02", "action", "succeed")], "branches: %s" % ops)
    report("saga_success", gid)


def saga_refused(dtm, busi):
    gid = utils.gen_gid(dtm)
    s = saga.Saga(dtm, gid)
    s.add({"amount": 30}, busi + "/a/action", busi + "/a/compensate")
    s.add({"amount": 30, "action_fail": True}, busi + "/b/action", busi + "/b/compensate")
    s.add({"amount": 30}, busi + "/c/action", busi + "/c/compensate")
    s.trans_base.wait_result = True
    try:
        s.submit()
        fail("a saga whose action refused was answered as a success")
    except utils.DTMFailureError:
        pass
    settle(dtm, gid, "failed")
    report("saga_refused", gid)


def saga_concurrent(dtm, busi):
    gid = utils.gen_gid(dtm)
    body = {
        "gid": gid,
        "trans_type": "saga",
        "steps": [{"action": busi + "/%s/action" % s, "compensate": busi + "/%s/compensate" % s}
                  for s in ["a", "b", "c"]],
        "payloads": [json.dumps({"amount": 30})] * 3,
        "custom_data": json.dumps({"orders": {"2": [0, 1]}, "concurrent": True}),
        "wait_result": True,
    }
    r = requests.post(dtm + "/submit", json=body, timeout=HTTP_TIMEOUT)
    utils.check_result(r)
    q = settle(dtm, gid, "succeed")
    check(q["transaction"]["concurrent"] is True, "concurrent: %s" % q["transaction"])
    report("saga_concurrent", gid)


def msg_submit(dtm, busi):
    gid = utils.gen_gid(dtm)
    m = msg.Msg(dtm, gid)
    m.add({"amount": 30}, busi + "/a/action")
    m.add({"amount": 30}, busi + "/b/action")
    m.prepare(busi + "/committed/query")
    check(query(dtm, gid)["transaction"]["status"] == "prepared", "not prepared")
    m.submit()
    settle(dtm, gid, "succeed")
    report("msg_submit", gid)


def msg_do_and_submit(dtm, busi):
    gid = utils.gen_gid(dtm)
    m = msg.Msg(dtm, gid)
    m.add({"amount": 30}, busi + "/a/action")
    ran = []
    m.do_and_submit(busi + "/committed/query", lambda bb: ran.append(bb.gid))
    check(ran == [gid], "the local transaction did not run")
    settle(dtm, gid, "succeed")
    report("msg_do_and_submit", gid)


def msg_do_and_abort(dtm, busi):
    gid = utils.gen_gid(dtm)
    m = msg.Msg(dtm, gid)
    m.add({"amount": 30}, busi + "/a/action")

    def local(_bb):
        raise utils.DTMFailureError("insufficient balance")

    try:
        m.do_and_submit(busi + "/rolledback/query", local)
        fail("do_and_submit did not raise the local transaction's failure")
    except utils.DTMFailureError:
        pass
    settle(dtm, gid, "failed")
    report("msg_do_and_abort", gid)


def msg_backcheck(dtm, busi, outcome, want, scenario):
    gid = utils.gen_gid(dtm)
    m = msg.Msg(dtm, gid)
    m.add({"amount": 30}, busi + "/a/action")
    m.trans_base.timeout_to_fail = 1
    m.prepare(busi + "/%s/query" % outcome)
    # The initiator never submits: the coordinator asks query_prepared at the deadline.
    settle(dtm, gid, want)
    report(scenario, gid)


def main():
    dtm, busi = sys.argv[1], sys.argv[2]
    saga_success(dtm, busi)
    saga_refused(dtm, busi)
    saga_concurrent(dtm, busi)
    msg_submit(dtm, busi)
    msg_do_and_submit(dtm, busi)
    msg_do_and_abort(dtm, busi)
    msg_backcheck(dtm, busi, "committed", "succeed", "msg_backcheck_committed")
    msg_backcheck(dtm, busi, "rolledback", "failed", "msg_backcheck_rolledback")


if __name__ == "__main__":
    main()
