#!/usr/bin/env python3
"""Half-sent request bodies: how much memory one client can make a keybroker hold.

    half_sent.py HOST:PORT CONNECTIONS STREAMS DECLARED_BYTES [TOKEN|-] [PIDFILE]

Opens CONNECTIONS HTTP/2 connections with STREAMS Encrypt requests each, whose gRPC message
declares DECLARED_BYTES, and sends as much of each message as the server's flow control allows
but never the last byte (so the server never gets to decode it). TOKEN is sent as a bearer token
(`-`: none, i.e. anonymous). Prints how many streams the server answered and how many bytes it
accepted; with PIDFILE, also the server's VmRSS/VmHWM from /proc. Standard library only, raw
HTTP/2 frames, loopback only, bounded to 60 s. docs/security.md shows the measured results."""
import asyncio, struct, sys, time

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def lit(idx, value):  # literal without indexing, indexed name (4-bit prefix)
    v = value.encode()
    out = bytes([idx]) if idx < 15 else bytes([15, idx - 15])
    return out + bytes([len(v)]) + v

def headers(token):
    block = bytes([0x83, 0x86]) + lit(4, "/keybroker.v1.KeyBroker/Encrypt") + lit(1, "localhost")
    block += lit(31, "application/grpc") + b"\x00\x02te\x08trailers"
    if token:
        block += lit(23, "Bearer " + token)
    return block

class Conn:
    def __init__(self, r, w, streams, declared):
        self.r, self.w = r, w
        self.conn_window = 65535
        self.init_stream_window = 65535
        self.windows = {}
        self.sent = {s: 0 for s in streams}
        self.declared = declared
        self.answered = set()
        self.changed = asyncio.Event()
        self.goaway = None

    async def reader(self):
        try:
            while True:
                head = await self.r.readexactly(9)
                n = int.from_bytes(head[:3], "big"); kind, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & 0x7fffffff
                payload = await self.r.readexactly(n)
                if kind == 4 and not flags & 1:  # SETTINGS
                    for i in range(0, len(payload), 6):
                        k, v = struct.unpack(">HI", payload[i:i+6])
                        if k == 4:
                            delta = v - self.init_stream_window
                            self.init_stream_window = v
                            for s in self.windows: self.windows[s] += delta
                    self.w.write(frame(4, 1, 0))
                elif kind == 8:  # WINDOW_UPDATE
                    inc = int.from_bytes(payload[:4], "big") & 0x7fffffff
                    if sid == 0: self.conn_window += inc
                    elif sid in self.windows: self.windows[sid] += inc
                elif kind in (1, 3):  # HEADERS (an answer) or RST_STREAM: this stream is done
                    self.answered.add(sid)
                elif kind == 6 and not flags & 1:  # PING
                    self.w.write(frame(6, 1, 0, payload))
                elif kind == 7:
                    self.goaway = int.from_bytes(payload[4:8], "big")
                self.changed.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.changed.set()

async def run(addr, conns, streams, declared, token, hold):
    host, port = addr.rsplit(":", 1)
    cs = []
    for _ in range(conns):
        r, w = await asyncio.open_connection(host, int(port))
        sids = [2 * i + 1 for i in range(streams)]
        c = Conn(r, w, sids, declared)
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
        asyncio.ensure_future(c.reader())
        block = headers(token)
        for s in sids:
            c.windows[s] = c.init_stream_window
            w.write(frame(1, 4, s, block))  # END_HEADERS, no END_STREAM
            w.write(frame(0, 0, s, b"\x00" + struct.pack(">I", declared)))
            c.sent[s] = 5
            c.windows[s] -= 5
            c.conn_window -= 5
        await w.drain()
        cs.append(c)
    deadline = time.monotonic() + hold
    target = declared + 5 - 1  # never the last byte
    while time.monotonic() < deadline:
        progress = False
        for c in cs:
            for s in c.sent:
                if s in c.answered or c.sent[s] >= target: continue
                n = min(16384, c.windows[s], c.conn_window, target - c.sent[s])
                if n <= 0: continue
                c.w.write(frame(0, 0, s, bytes(n)))
                c.windows[s] -= n; c.conn_window -= n; c.sent[s] += n
                progress = True
            await c.w.drain()
        if not progress:
            c0 = cs[0]; c0.changed.clear()
            try:
                await asyncio.wait_for(asyncio.gather(*[c.changed.wait() for c in cs]), 0.2)
            except asyncio.TimeoutError:
                pass
            if all(all(s in c.answered or c.sent[s] >= target for s in c.sent) for c in cs):
                break
    total = sum(sum(c.sent.values()) for c in cs)
    answered = sum(len(c.answered) for c in cs)
    print(f"streams={conns*streams} answered={answered} sent_total_MiB={total/2**20:.1f} goaway={[c.goaway for c in cs]}", flush=True)
    return cs

async def main():
    addr, conns, streams, declared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    token = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    pidfile = sys.argv[6] if len(sys.argv) > 6 else None
    cs = await run(addr, conns, streams, declared, token, hold=60)
    if pidfile:
        pid = open(pidfile).read().strip()
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("VmRSS", "VmHWM")): print(line.strip(), flush=True)
    for c in cs: c.w.close()

asyncio.run(main())
