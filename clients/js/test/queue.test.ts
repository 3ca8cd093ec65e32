import { test } from "node:test";
import assert from "node:assert/strict";
import { harness } from "./fake.js";

test("publishes made while offline are held, bounded by queueSize, and flushed in order after the subscriptions", async () => {
  const { gw, clock, client } = harness({ queueSize: 3 });
  client.subscribe("room");
  const settled: string[] = [];
  const ps = [1, 2, 3].map((n) => client.publish("room", n).then(() => settled.push(`ok${n}`)));
  // The fourth does not wait: it fails at once.
  await assert.rejects(client.publish("room", 4), { name: "WsgateError", code: "queue_full" });
  assert.equal(gw.sockets.length, 0, "nothing sent before connect()");
  client.connect();
  await clock.advance(0);
  await Promise.all(ps);
  assert.deepEqual(settled, ["ok1", "ok2", "ok3"]);
  const sent = gw.last.sent;
  assert.deepEqual(
    sent.map((r) => [r.op, r.data]),
    [
      ["subscribe", undefined],
      ["publish", 1],
      ["publish", 2],
      ["publish", 3],
    ],
  );
  assert.deepEqual(
    sent.map((r) => r.id),
    [1, 2, 3, 4],
    "ids follow the order of sending",
  );
  client.close();
});

test("the queue fills again while reconnecting and frees as it is flushed", async () => {
  const { gw, clock, client } = harness({ queueSize: 2 });
  client.connect();
  await clock.advance(0);
  gw.last.serverClose(1001, "server shutting down");
  await clock.advance(0);
  const a = client.publish("c", "a");
  const b = assert.rejects(client.history("c"), { code: "not_found" }); // other requests share the queue
  await assert.rejects(client.presenceCount("c"), { code: "queue_full" });
  await clock.advance(clock.delays()[0]);
  assert.equal(client.state, "connected");
  await a;
  await b;
  assert.deepEqual(
    gw.last.sent.map((r) => r.op),
    ["publish", "history"],
  );
  // Connected: nothing is held, so the queue size no longer limits.
  await Promise.all([1, 2, 3, 4].map((n) => client.publish("c", n)));
  client.close();
});

test("a publish sent but not answered when the connection drops fails with disconnected (not resent)", async () => {
  const { gw, clock, client } = harness();
  client.connect();
  await clock.advance(0);
  gw.override = (_s, req) => req.op === "publish"; // swallowed: no reply
  const p = client.publish("c", 1);
  await clock.advance(0);
  gw.last.serverClose(1006);
  await assert.rejects(p, { code: "disconnected" });
  gw.override = undefined;
  await clock.advance(1000);
  assert.equal(client.state, "connected");
  assert.equal(gw.last.ops("publish").length, 0, "an unanswered publish is not repeated");
  client.close();
});

test("replies settle publish, presence, presenceCount and history; errors reject with the gateway's code", async () => {
  const { gw, clock, client } = harness();
  gw.withHistory("h");
  client.connect();
  client.subscribe("h");
  await clock.advance(0);
  await client.publish("h", { text: "a" });
  await client.publish("h", { text: "b" });
  assert.equal(await client.presenceCount("h"), 1);
  assert.deepEqual(await client.presence("h"), [{ conn: "c0" }]);
  assert.deepEqual(await client.history("h", 1), { epoch: "e1", offset: 2, publications: [{ offset: 2, data: { text: "b" } }] });
  assert.equal(gw.last.ops("history")[0].limit, 1);
  gw.override = (s, req) => {
    if (req.op !== "publish") return false;
    s.push({ id: req.id, op: "error", code: "rate_limited", message: "more than 50 publishes/s (burst 100): not delivered" });
    return true;
  };
  const err = await client.publish("h", 1).then(
    () => assert.fail("resolved"),
    (e) => e,
  );
  assert.equal(err.code, "rate_limited");
  assert.match(err.message, /not delivered/);
  client.close();
});
