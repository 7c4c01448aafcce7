"""Checks the Python client against a real server (run by tests/python_client.rs,
which starts the server with tests/common's models: a, b, c, ens, m v1+v2, slow;
12 inputs, 5 classes). Plain asserts, no pytest.

    PYTHONPATH=tools/python python3 tools/python/tests/check_client.py HOST:PORT
"""

import json
import sys

import beast
from beast import BadRequest, Client, ConnectionClosed, NotFound, Timeout

WIDTH = 12


def row(k):
    return [((i * 7 + k * 3) % 11) / 11.0 - 0.5 for i in range(WIDTH)]


def main(addr):
    checks = 0
    c = Client(addr, timeout=10.0)

    # Ids start at 1 and increase.
    first = c.send("a", [row(0)])
    second = c.send("a", [row(1)])
    assert (first, second) == (1, 2), (first, second)
    p1, p2 = c.wait(first), c.wait(second)
    assert p1.id == 1 and p2.id == 2
    assert p1.rows == 1 and p1.cols == 5 and abs(sum(p1.outputs[0]) - 1.0) < 1e-3, p1
    assert p1.runs[0][:2] == ("a", 1), p1.runs
    checks += 1

    # Pipelining: 60 requests in flight, waited for in reverse order, each the
    # same answer as when asked alone.
    alone = {k: c.predict("b", [row(k)], cache="bypass").outputs for k in range(6)}
    ids = [(c.send("b", [row(k % 6)], cache="bypass"), k % 6) for k in range(60)]
    for rid, k in reversed(ids):
        got = c.wait(rid).outputs
        assert all(abs(x - y) < 1e-6 for x, y in zip(got[0], alone[k][0])), (rid, got, alone[k])
    many = c.predict_many([("c", [row(1), row(2)]), ("nope", [row(0)]), ("c", [row(3)])])
    assert many[0].rows == 2 and isinstance(many[1], NotFound) and many[2].rows == 1, many
    checks += 2

    # Typed errors; the connection stays usable after them.
    try:
        c.predict("nope", [row(0)])
        raise AssertionError("unknown target answered")
    except NotFound as e:
        assert "nope" in e.message and e.status == 2 and e.id > 0, (e.message, e.status, e.id)
    try:
        c.predict("a", [[0.0] * 3])
        raise AssertionError("wrong width answered")
    except BadRequest as e:
        assert "3" in e.message and isinstance(e, beast.BeastError), e.message
    try:
        c.predict("a", [row(0)], policy="sometimes")
        raise AssertionError("unknown policy sent")
    except BadRequest as e:
        assert "policy" in e.message
    assert c.predict("a", [row(0)]).rows == 1
    checks += 3

    # Versions.
    assert c.predict("m", [row(0)], version=2).runs[0][:2] == ("m", 2)
    assert c.predict("m", [row(0)]).runs[0][:2] == ("m", 2)  # latest
    assert c.predict("m", [row(0)], version=1).runs[0][:2] == ("m", 1)
    try:
        c.predict("m", [row(0)], version=9)
        raise AssertionError("version 9 answered")
    except NotFound:
        pass
    checks += 1

    # FP16 input, and a numpy array where numpy is installed.
    p16 = c.predict("a", [row(4)], f16=True, cache="bypass")
    p32 = c.predict("a", [row(4)], cache="bypass")
    assert max(abs(x - y) for x, y in zip(p16.outputs[0], p32.outputs[0])) < 5e-3
    try:
        import numpy as np
        pn = c.predict("a", np.array([row(4)], dtype=np.float32), cache="bypass")
        assert pn.outputs == p32.outputs
    except ImportError:
        print("numpy not installed: numpy input not checked")
    checks += 1

    # Feedback: an ensemble's answer carries a ticket; feedback is acknowledged
    # once, then NotFound (spent).
    pe = c.predict("ens", [row(5)], cache="bypass")
    assert pe.ticket != 0 and len(pe.runs) == 3, pe
    c.feedback(pe.ticket, 1)
    try:
        c.feedback(pe.ticket, 1)
        raise AssertionError("spent ticket accepted")
    except NotFound:
        pass
    checks += 1

    # Values for the Rust side to compare with the model computed directly.
    print("VALUES " + json.dumps({"a": c.predict("a", [row(7)], cache="bypass").outputs[0], "row": row(7)}))

    # Timeout: `slow` holds a request in its queue for its batching delay.
    try:
        c.predict("slow", [row(0)], timeout=0.05)
        raise AssertionError("slow answered within 50 ms")
    except Timeout as e:
        assert "in time" in e.message
    try:
        c.predict("a", [row(0)])
        raise AssertionError("a timed-out connection was reused")
    except ConnectionClosed:
        pass
    checks += 1
    c.close()

    with Client(addr) as c2:  # a new connection starts at id 1 again
        assert c2.send("a", [row(0)]) == 1 and c2.wait(1).rows == 1
    checks += 1
    print("python client: ok (%d checks)" % checks)


if __name__ == "__main__":
    main(sys.argv[1])
