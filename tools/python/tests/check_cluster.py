"""beast.Cluster against real nodes; run by tests/python_client.rs.

    check_cluster.py LIVE0,LIVE1 DEAD

Prints `ROUTE <target> <f16> <values...> -> <node>,<node>,...` lines (the
Python rule's order over LIVE0,LIVE1,DEAD) for the Rust test to compare
with `beast::client::route`, then checks against the two live nodes and
one address where nothing listens: every answer comes from the first live
node in the input's order, an identical input is a cache hit on the same
node, and feedback reaches the node that answered. Ends with
`python cluster: ok`.
"""

import sys

from beast import Cluster
from beast.cluster import request_key, route_order

live, dead = sys.argv[1].split(","), sys.argv[2]
names = live + [dead]
WIDTH = 12


def row(i):
    return [i * 0.125 + ((j * 3) % 11) / 4.0 - 1.0 for j in range(WIDTH)]


# The rule alone, over fixed inputs, for the Rust side to recompute.
for i in range(40):
    for target, f16 in (("a", False), ("ens", False), ("a", True)):
        x = row(i)
        order = route_order(request_key(target, [x], f16), names)
        print("ROUTE %s %d %s -> %s" % (target, int(f16), " ".join(repr(v) for v in x),
                                        ",".join(names[k] for k in order)))

with Cluster(",".join(names), connect_timeout=0.5) as c:
    used = set()
    for i in range(40):
        x = row(i)
        want = [n for n in c.route("a", [x]) if n != dead][0]
        p = c.predict("a", [x])
        assert p.node == want, (i, p.node, want, c.route("a", [x]))
        q = c.predict("a", [x])
        assert q.node == p.node and q.cached and not p.cached, (i, p.cached, q.cached)
        used.add(p.node)
    assert used == set(live), used
    # An ensemble answer's ticket is good on the node and connection that gave it.
    for i in range(6):
        p = c.predict("ens", [row(100 + i)], cache="bypass")
        assert p.ticket != 0
        c.feedback(p, 1)
    # A deadline is respected: the budget travels with the request.
    p = c.predict("a", [row(200)], deadline_us=2_000_000)
    assert p.rows == 1
print("python cluster: ok")
