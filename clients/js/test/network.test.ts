// The client over real sockets: the platform's WebSocket (Node 20 with
// --experimental-websocket, as in browsers) against a small RFC 6455 server
// written here on node:http, so the handshake, the subprotocol list and
// close frames are what a browser would see.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { Client, type ClientEvents, type WebSocketConstructor } from "wsgate";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

class ServerConn {
  private buf = Buffer.alloc(0);
  onText: (text: string) => void = () => {};
  constructor(
    readonly socket: Socket,
    readonly protocols: string[],
  ) {
    socket.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.parse();
    });
    socket.on("error", () => {});
  }

  private parse(): void {
    for (;;) {
      if (this.buf.length < 2) return;
      const opcode = this.buf[0] & 0x0f;
      let len = this.buf[1] & 0x7f;
      let pos = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        pos = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        len = Number(this.buf.readBigUInt64BE(2));
        pos = 10;
      }
      const masked = (this.buf[1] & 0x80) !== 0;
      if (!masked) throw new Error("client frame not masked");
      if (this.buf.length < pos + 4 + len) return;
      const mask = this.buf.subarray(pos, pos + 4);
      const payload = Buffer.from(this.buf.subarray(pos + 4, pos + 4 + len));
      for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
      this.buf = this.buf.subarray(pos + 4 + len);
      if (opcode === 1) this.onText(payload.toString("utf8"));
      else if (opcode === 8) this.socket.end(frame(8, payload));
      else if (opcode === 9) this.socket.write(frame(10, payload));
    }
  }

  send(msg: unknown): void {
    this.socket.write(frame(1, Buffer.from(JSON.stringify(msg))));
  }

  close(code: number, reason: string): void {
    const p = Buffer.alloc(2 + Buffer.byteLength(reason));
    p.writeUInt16BE(code, 0);
    p.write(reason, 2);
    this.socket.write(frame(8, p));
    this.socket.end();
  }
}

function frame(opcode: number, payload: Buffer): Buffer {
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, n]) : Buffer.from([0x80 | opcode, 126, n >> 8, n & 0xff]);
  return Buffer.concat([head, payload]);
}

async function listen(onConn: (c: ServerConn, req: IncomingMessage) => void, refuse?: () => boolean): Promise<{ server: Server; url: string }> {
  const server = createServer((_req, res) => res.writeHead(426).end());
  server.on("upgrade", (req: IncomingMessage, socket: Socket) => {
    if (refuse?.()) {
      socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 25\r\n\r\n{"error":"invalid token"}');
      return;
    }
    const protocols = String(req.headers["sec-websocket-protocol"] ?? "")
      .split(",")
      .map((s) => s.trim());
    const accept = createHash("sha1").update(`${req.headers["sec-websocket-key"]}${GUID}`).digest("base64");
    socket.write(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: wsgate.v1\r\n\r\n`,
    );
    onConn(new ServerConn(socket, protocols), req);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, url: `ws://127.0.0.1:${(server.address() as AddressInfo).port}/ws` };
}

function next<K extends keyof ClientEvents>(client: Client, event: K, timeoutMs = 5000): Promise<ClientEvents[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} event within ${timeoutMs} ms`)), timeoutMs);
    const off = client.on(event, (ev) => {
      clearTimeout(timer);
      off();
      resolve(ev);
    });
  });
}

function platformWebSocket(): WebSocketConstructor {
  const WS = (globalThis as any).WebSocket as WebSocketConstructor | undefined;
  assert.ok(WS, "no global WebSocket: run node with --experimental-websocket (Node 20) or Node 22+");
  return WS;
}

test("over a real socket: bearer token in the subprotocol list, requests, messages and a terminal close", async () => {
  const conns: ServerConn[] = [];
  const { server, url } = await listen((c) => {
    conns.push(c);
    c.onText = (text) => {
      const req = JSON.parse(text);
      if (req.op === "subscribe") c.send({ id: req.id, op: "ok", epoch: "e1", offset: 0 });
      if (req.op === "publish") {
        c.send({ op: "message", channel: req.channel, data: req.data, offset: 1 });
        c.send({ id: req.id, op: "ok" });
      }
    };
  });
  try {
    const client = new Client(url, { WebSocket: platformWebSocket(), token: async () => "header.payload.sig" });
    const got: unknown[] = [];
    const sub = client.subscribe("chat:acme:42", { message: (d, ctx) => got.push([d, ctx.offset]) });
    const connected = next(client, "connected");
    client.connect();
    await connected;
    assert.deepEqual(conns[0].protocols, ["wsgate.v1", "bearer", "header.payload.sig"]);
    await client.publish("chat:acme:42", { text: "hi ✓" });
    assert.deepEqual(got, [[{ text: "hi ✓" }, 1]]);
    assert.equal(sub.state, "subscribed");
    assert.deepEqual(sub.position, { epoch: "e1", offset: 1 });

    const disconnected = next(client, "disconnected");
    conns[0].close(1008, "forbidden");
    assert.deepEqual(await disconnected, { code: 1008, reason: "forbidden", willReconnect: false });
    assert.equal(client.state, "closed");
    assert.equal(conns.length, 1);
  } finally {
    server.close();
  }
});

test("over a real socket: a restart (1012) and refused handshakes are retried until the gateway is back", async () => {
  let refusing = 0;
  const conns: ServerConn[] = [];
  const { server, url } = await listen(
    (c) => {
      conns.push(c);
      c.onText = (text) => {
        const req = JSON.parse(text);
        if (req.id !== undefined) c.send({ id: req.id, op: "ok" });
      };
    },
    () => refusing-- > 0,
  );
  try {
    const client = new Client(url, { WebSocket: platformWebSocket(), minReconnectDelay: 5, maxReconnectDelay: 20 });
    client.subscribe("room");
    let connected = next(client, "connected");
    client.connect();
    await connected;
    refusing = 3;
    const closes: number[] = [];
    client.on("disconnected", (ev) => closes.push(ev.code));
    connected = next(client, "connected");
    conns[0].close(1012, "service restart");
    await connected;
    // The browser-visible outcome of an HTTP refusal is a 1006 close: retried.
    assert.deepEqual(closes, [1012, 1006, 1006, 1006]);
    assert.equal(conns.length, 2);
    const sent: string[] = [];
    conns[1].onText = (text) => {
      sent.push(text);
      const req = JSON.parse(text);
      if (req.id !== undefined) conns[1].send({ id: req.id, op: "ok" });
    };
    await client.publish("room", 1);
    assert.deepEqual(
      sent.map((t) => JSON.parse(t).op).filter((op) => op === "publish"),
      ["publish"],
    );
    client.close();
  } finally {
    server.close();
  }
});
