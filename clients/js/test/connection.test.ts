import { test } from "node:test";
import assert from "node:assert/strict";
import { isTerminalClose } from "wsgate";
import { harness } from "./fake.js";

test("connects with the wsgate.v1 subprotocol and the bearer token, asking token() each time", async () => {
  let calls = 0;
  const { gw, clock, client, events } = harness({ token: async () => `tok${++calls}` });
  assert.equal(client.state, "disconnected");
  client.connect();
  assert.equal(client.state, "connecting");
  await clock.advance(0);
  assert.equal(client.state, "connected");
  assert.deepEqual(gw.last.protocols, ["wsgate.v1", "bearer", "tok1"]);
  gw.last.serverClose(1006);
  await clock.advance(0);
  assert.equal(client.state, "disconnected");
  await clock.advance(500);
  assert.equal(client.state, "connected");
  assert.deepEqual(gw.last.protocols, ["wsgate.v1", "bearer", "tok2"]);
  assert.deepEqual(
    events.map((e) => e.type),
    ["connecting", "connected", "disconnected", "connecting", "connected"],
  );
  client.close();
});

test("without a token function the client offers only wsgate.v1", async () => {
  const { gw, clock, client } = harness();
  client.connect();
  await clock.advance(0);
  assert.deepEqual(gw.last.protocols, ["wsgate.v1"]);
  client.close();
});

const terminal: [number, string][] = [
  [1002, "protocol error"],
  [1003, ""],
  [1007, "invalid UTF-8 in text message"],
  [1008, "forbidden"],
  [1008, "invalid token"],
  [1008, "rate limit exceeded"],
  [1009, "message too big"],
  [1010, ""],
];
const retryable: [number, string][] = [
  [1000, ""],
  [1001, "server shutting down"],
  [1006, ""],
  [1008, "token expired"],
  [1011, "upstream went away"],
  [1012, ""],
  [1013, "slow consumer"],
  [1014, ""],
];

for (const [code, reason] of terminal) {
  test(`close ${code} "${reason}" is terminal: state closed, no reconnect`, async () => {
    let tokens = 0;
    const { gw, clock, client, events } = harness({ token: () => `t${++tokens}` });
    client.connect();
    await clock.advance(0);
    const queued = client.subscribe("a");
    gw.last.serverClose(code, reason);
    await clock.advance(0);
    assert.equal(client.state, "closed");
    assert.equal(queued.state, "unsubscribed");
    assert.deepEqual(events.at(-1), { type: "disconnected", ev: { code, reason, willReconnect: false } });
    await clock.advance(60_000);
    assert.equal(gw.sockets.length, 1);
    assert.equal(tokens, 1);
    assert.equal(clock.armed, 0, "no timer left behind");
    await assert.rejects(client.publish("a", 1), { code: "closed" });
    assert.equal(isTerminalClose(code, reason), true);
  });
}

for (const [code, reason] of retryable) {
  test(`close ${code} "${reason}" reconnects with backoff and a fresh token`, async () => {
    let tokens = 0;
    const { gw, clock, client, events } = harness({ token: () => `t${++tokens}` });
    client.connect();
    await clock.advance(0);
    gw.last.serverClose(code, reason);
    await clock.advance(0);
    assert.equal(client.state, "disconnected");
    assert.deepEqual(events.at(-1), { type: "disconnected", ev: { code, reason, willReconnect: true } });
    const [delay] = clock.delays();
    assert.ok(delay >= 0 && delay < 500, `first retry within [0, minReconnectDelay): ${delay}`);
    await clock.advance(delay);
    assert.equal(client.state, "connected");
    assert.equal(gw.sockets.length, 2);
    assert.deepEqual(gw.last.protocols, ["wsgate.v1", "bearer", "t2"]);
    assert.equal(isTerminalClose(code, reason), false);
    client.close();
  });
}

test("a failed handshake and a failing token() both retry with backoff", async () => {
  let fail = true;
  const { gw, clock, client, events } = harness({
    token: () => {
      if (fail) throw new Error("login service down");
      return "t";
    },
  });
  client.connect();
  await clock.advance(0);
  assert.equal(client.state, "disconnected");
  assert.equal(gw.sockets.length, 0);
  assert.ok(events.some((e) => e.type === "error" && /login service down/.test(e.ev.message)));
  fail = false;
  gw.handshake = () => ({ code: 1006 });
  await clock.advance(clock.delays()[0]);
  assert.equal(gw.sockets.length, 1);
  assert.equal(client.state, "disconnected");
  gw.handshake = () => "accept";
  await clock.advance(clock.delays()[0]);
  assert.equal(client.state, "connected");
  client.close();
});

test("an error event followed by a close counts as one disconnection", async () => {
  const { gw, clock, client, events } = harness();
  client.connect();
  await clock.advance(0);
  gw.last.fail();
  await clock.advance(0);
  assert.deepEqual(
    events.filter((e) => e.type === "disconnected").map((e) => e.ev),
    [{ code: 1006, reason: "", willReconnect: true }],
  );
  assert.equal(clock.armed, 1, "one reconnect timer");
  await clock.advance(500);
  assert.equal(client.state, "connected");
  assert.equal(gw.sockets.length, 2);
  client.close();
});

test("a handshake that gets no answer is abandoned after connectTimeout and tried again with backoff", async () => {
  const { gw, clock, client, events } = harness({ livenessInterval: 1e9 });
  gw.handshake = () => "hold";
  client.connect();
  await clock.advance(9_999);
  assert.equal(client.state, "connecting");
  const first = gw.last;
  assert.equal(first.closedByClient, undefined);
  await clock.advance(1);
  assert.equal(client.state, "disconnected");
  assert.deepEqual(first.closedByClient, { code: 1000, reason: "" });
  assert.deepEqual(events.at(-1), { type: "disconnected", ev: { code: 1006, reason: "handshake timeout", willReconnect: true } });
  assert.equal(clock.armed, 1, "only the reconnect timer");
  // The next attempt is held too, and abandoned in turn; then the gateway answers.
  await clock.advance(clock.delays()[0]);
  assert.equal(gw.sockets.length, 2);
  gw.handshake = () => "accept";
  await clock.advance(10_000);
  assert.equal(client.state, "disconnected");
  await clock.advance(clock.delays()[0]);
  assert.equal(client.state, "connected");
  assert.equal(gw.sockets.length, 3);
  assert.deepEqual(clock.delays(), [1e9], "no connect timer left once connected");
  client.close();

  const short = harness({ connectTimeout: 2_000 });
  short.gw.handshake = () => "hold";
  short.client.connect();
  await short.clock.advance(2_000);
  assert.equal(short.client.state, "disconnected");
  short.client.close();
  assert.equal(short.clock.armed, 0);
  assert.throws(() => harness({ connectTimeout: 0 }), RangeError);
});

test("a server that does not answer wsgate.v1 is reported and retried", async () => {
  const { gw, clock, client, events } = harness();
  gw.handshake = () => "hold";
  client.connect();
  await clock.advance(0);
  const s = gw.last;
  s.readyState = 1;
  s.onopen?.({});
  assert.equal(client.state, "disconnected");
  assert.deepEqual(s.closedByClient, { code: 1000, reason: "" });
  assert.equal(s.readyState, 3, "the socket is closed, not left open without handlers");
  assert.ok(events.some((e) => e.type === "error" && /subprotocol/.test(e.ev.message)));
  assert.deepEqual(events.at(-1), {
    type: "disconnected",
    ev: { code: 1006, reason: "subprotocol not accepted", willReconnect: true },
  });
  gw.handshake = () => "accept";
  await clock.advance(clock.delays()[0]);
  assert.equal(client.state, "connected");
  assert.equal(gw.sockets.length, 2);
  client.close();
});

test("liveness: a ping after livenessInterval of silence, a reconnect when nothing answers within livenessTimeout", async () => {
  const { gw, clock, client, events } = harness();
  client.connect();
  await clock.advance(0);
  const s = gw.last;
  // Traffic keeps the connection quiet-free: no ping.
  await clock.advance(6000);
  s.push({ op: "message", channel: "x", data: 1 });
  await clock.advance(6000);
  assert.equal(s.ops("ping").length, 0, "no ping while messages arrive");
  await clock.advance(4000); // 10 s after the last message
  assert.equal(s.ops("ping").length, 1);
  assert.equal(s.ops("ping")[0].id, undefined);
  // The gateway answers: the connection stays.
  await clock.advance(10_000);
  assert.equal(s.ops("ping").length, 2);
  assert.equal(client.state, "connected");
  // Now it stops answering anything.
  gw.override = (_s, req) => req.op === "ping";
  await clock.advance(10_000);
  assert.equal(s.ops("ping").length, 3);
  await clock.advance(4999);
  assert.equal(client.state, "connected");
  await clock.advance(1);
  assert.equal(client.state, "disconnected");
  assert.deepEqual(s.closedByClient, { code: 4000, reason: "liveness timeout" });
  assert.deepEqual(events.at(-1), { type: "disconnected", ev: { code: 4000, reason: "liveness timeout", willReconnect: true } });
  gw.override = undefined;
  await clock.advance(500);
  assert.equal(client.state, "connected");
  assert.equal(gw.sockets.length, 2);
  client.close();
});

test("close() stops everything: no timer, no reconnect, waiting requests fail with closed", async () => {
  const { gw, clock, client, events } = harness({ token: () => "t" });
  client.connect();
  await clock.advance(0);
  const sub = client.subscribe("a");
  await clock.advance(0);
  gw.last.serverClose(1006);
  await clock.advance(0);
  const p = client.publish("a", 1);
  client.close();
  assert.equal(client.state, "closed");
  assert.equal(sub.state, "unsubscribed");
  await assert.rejects(p, { name: "WsgateError", code: "closed" });
  assert.equal(clock.armed, 0);
  await clock.advance(60_000);
  assert.equal(gw.sockets.length, 1);
  assert.throws(() => client.connect(), { code: "closed" });
  // Closing a live connection sends a normal close and reports it.
  const h = harness();
  h.client.connect();
  await h.clock.advance(0);
  h.client.close();
  assert.deepEqual(h.gw.last.closedByClient, { code: 1000, reason: "client closed" });
  assert.deepEqual(h.events.at(-1), { type: "disconnected", ev: { code: 1000, reason: "client closed", willReconnect: false } });
  assert.equal(h.clock.armed, 0);
  assert.ok(events.length > 0);
});

test("a throwing listener does not break the client; it is reported as an error event", async () => {
  const { clock, client, events } = harness();
  client.on("connected", () => {
    throw new Error("app bug");
  });
  client.connect();
  await clock.advance(0);
  assert.equal(client.state, "connected");
  assert.ok(events.some((e) => e.type === "error" && e.ev.message === "app bug"));
  client.close();
});
