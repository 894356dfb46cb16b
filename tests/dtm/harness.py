"""What the DTM scenario scripts (scenarios.py, saga_msg.py) share: failing with a message, checking,
asking the coordinator's DTM query, waiting (bounded) for a status, and reporting a scenario's gid.
"""

import json
import sys
import time

import requests

# Every wait is bounded.
SETTLE_SECONDS = 30
HTTP_TIMEOUT = 10


def fail(message):
    print("FAILED: " + message, file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def query(dtm, gid):
    r = requests.get(dtm + "/query", params={"gid": gid}, timeout=HTTP_TIMEOUT)
    check(r.status_code == 200, "query answered %d: %s" % (r.status_code, r.text))
    return r.json()


def settle(dtm, gid, want):
    """Polls query until the transaction's status is `want` (bounded)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        q = query(dtm, gid)
        status = (q.get("transaction") or {}).get("status")
        if status == want:
            return q
        if time.monotonic() > deadline:
            fail("transaction %s is %r after %d s, expected %r: %s" % (gid, status, SETTLE_SECONDS, want, q))
        time.sleep(0.05)


def report(scenario, gid):
    print(json.dumps({"scenario": scenario, "gid": gid}), flush=True)
