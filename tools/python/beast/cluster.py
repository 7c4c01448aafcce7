"""A cluster-aware beast client: the Rust `beast::client::Cluster` rules
(docs/CLIENT.md) in Python.

- Nodes: "host:port" or "host:port:admin_port", comma-separated (or a list);
  a host name with several addresses gives one node per address.
- Routing: rendezvous hashing on the target and the xxh3 digest of the
  input bytes as sent, exactly the Rust rule (src/client/route.rs), so
  Rust and Python clients send identical inputs to the same node.
- Health: a node whose connection failed is skipped and retried after a
  backoff (doubling from 0.1 s to 5 s); with an admin port, its /readyz is
  asked at most every `readyz_interval` seconds and a non-200 answer
  skips it while other nodes are available.
- Retries: a request whose node fails (closed, timed out, unreadable) or
  answers OVERLOADED goes to the next node in its order, at most
  `attempts` nodes, never once its `deadline_us` is spent (a retry carries
  what is left of it). No hedging here (the Rust client has it).
- Not thread-safe, like `Client`: one Cluster per thread.

Needs the `xxhash` package (`pip install xxhash`).
"""

import http.client
import socket
import struct
import time

import xxhash

from beast.client import (Client, ConnectionClosed, NotFound, Overloaded, ProtocolError,
                          Timeout, _rows_of)

__all__ = ["Cluster", "request_key", "node_seed", "score", "route_order", "parse_nodes"]

_M64 = (1 << 64) - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def input_bytes(inputs, f16=False):
    """The input vector's bytes as `encode_request` sends them."""
    _, _, flat = _rows_of(inputs)
    return struct.pack("<%d%s" % (len(flat), "e" if f16 else "f"), *flat)


def request_key(target, inputs, f16=False):
    """The routing key: xxh3_64 of the target, seeded with xxh3_64 of the input bytes."""
    digest = xxhash.xxh3_64_intdigest(input_bytes(inputs, f16))
    return xxhash.xxh3_64_intdigest(target.encode(), seed=digest)


def node_seed(name):
    """A node's seed from its name, "ip:port" ("[v6]:port")."""
    return xxhash.xxh3_64_intdigest(name.encode())


def score(key, seed):
    return _mix64(key ^ seed)


def route_order(key, names):
    """Indexes of `names` in the order a request with `key` tries them."""
    seeds = [node_seed(n) for n in names]
    # Stable sort: equal scores keep list order, as in Rust.
    return sorted(range(len(names)), key=lambda i: -score(key, seeds[i]))


def _name(ip, port):
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def _has_port(x):
    if ":" not in x:
        return False
    h, p = x.rsplit(":", 1)
    return bool(h) and p.isdigit() and (":" not in h or (h.startswith("[") and h.endswith("]")))


def parse_nodes(nodes):
    """[(name, ip, port, admin_port or None)] from "a:1,b:2:9464" or a list of such items."""
    items = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        admin = None
        if ":" in item and _has_port(item.rsplit(":", 1)[0]):
            item, a = item.rsplit(":", 1)
            if not a.isdigit():
                raise ValueError("node %r: admin port is not a number" % item)
            admin = int(a)
        if not _has_port(item):
            raise ValueError("node %r: want host:port or host:port:admin_port" % item)
        host, port = item.rsplit(":", 1)
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        for info in infos:
            ip, p = info[4][0], info[4][1]
            name = _name(ip, p)
            if all(n[0] != name for n in out):
                out.append((name, ip, p, admin))
    if not out:
        raise ValueError("no node in %r" % (nodes,))
    return out


class _Node:
    def __init__(self, name, ip, port, admin):
        self.name, self.ip, self.port, self.admin = name, ip, port, admin
        self.client = None
        self.failures = 0
        self.retry_at = 0.0
        self.ready = True
        self.polled_at = 0.0


class Cluster:
    def __init__(self, nodes, timeout=10.0, connect_timeout=1.0, attempts=3,
                 readyz_interval=1.0, backoff=(0.1, 5.0)):
        self.nodes = [_Node(*n) for n in parse_nodes(nodes)]
        self.names = [n.name for n in self.nodes]
        self.seeds = [node_seed(n) for n in self.names]
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.attempts = max(1, attempts)
        self.readyz_interval = readyz_interval
        self.backoff = backoff

    def route(self, target, inputs, f16=False):
        """Node names in the order a request tries them (all healthy)."""
        key = request_key(target, inputs, f16)
        return [self.names[i] for i in route_order(key, self.names)]

    # -- health

    def _poll(self, node, now):
        if node.admin is None or now - node.polled_at < self.readyz_interval:
            return
        node.polled_at = now
        try:
            c = http.client.HTTPConnection(node.ip, node.admin, timeout=0.5)
            c.request("GET", "/readyz")
            node.ready = c.getresponse().status == 200
            c.close()
        except OSError:
            node.ready = False

    def _failed(self, node):
        if node.client is not None:
            node.client.close()
            node.client = None
        node.failures += 1
        node.retry_at = time.monotonic() + min(self.backoff[0] * 2 ** (node.failures - 1),
                                               self.backoff[1])

    def _conn(self, node):
        if node.client is None:
            if time.monotonic() < node.retry_at:
                return None
            try:
                node.client = Client((node.ip, node.port), timeout=self.timeout,
                                     connect_timeout=self.connect_timeout)
                node.failures = 0
            except OSError:
                self._failed(node)
                return None
        return node.client

    def _order(self, key):
        now = time.monotonic()
        order = sorted(range(len(self.nodes)), key=lambda i: -score(key, self.seeds[i]))
        for i in order:
            self._poll(self.nodes[i], now)
        # Ready nodes first (each group keeps rendezvous order).
        return [i for i in order if self.nodes[i].ready] + \
            [i for i in order if not self.nodes[i].ready]

    # -- requests

    def predict(self, target, inputs, deadline_us=None, timeout=None, **kw):
        """Answer from the first node in rendezvous order that gives one; the
        Prediction's `node` says which. Retries as the module doc says."""
        start = time.monotonic()
        key = request_key(target, inputs, kw.get("f16", False))
        last, tried = None, 0
        for i in self._order(key):
            if tried >= self.attempts:
                break
            node = self.nodes[i]
            left = None
            if deadline_us:
                left = deadline_us - int((time.monotonic() - start) * 1e6)
                if left <= 0:
                    break
            c = self._conn(node)
            if c is None:
                continue
            tried += 1
            try:
                p = c.predict(target, inputs, timeout=timeout, deadline_us=left or deadline_us,
                              **kw)
                p.node = node.name
                return p
            except Overloaded as e:
                last = e
            except (ConnectionClosed, Timeout, ProtocolError, OSError) as e:
                self._failed(node)
                last = e
        if last is None:
            last = ConnectionClosed("no node available (%d tried)" % tried)
        raise last

    def feedback(self, prediction, label, timeout=None):
        """Feedback for an answer goes to the node (and connection) that gave it."""
        for node in self.nodes:
            if node.name == prediction.node:
                if node.client is None:
                    raise NotFound("the connection that answered is gone: its ticket is spent")
                return node.client.feedback(prediction.ticket, label, timeout)
        raise NotFound("no node %s in this cluster" % prediction.node)

    def close(self):
        for n in self.nodes:
            if n.client is not None:
                n.client.close()
                n.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
