import { test } from "node:test";
import assert from "node:assert/strict";
import type { SubscribedContext } from "wsgate";
import { harness } from "./fake.js";

function recorder() {
  const log: any[] = [];
  const handlers = {
    message: (data: unknown, ctx: { offset?: number }) => log.push(["message", data, ctx.offset]),
    subscribed: (ctx: SubscribedContext) => log.push(["subscribed", ctx]),
    reset: (pos: { epoch: string; offset: number }) => log.push(["reset", pos]),
    join: (info: unknown) => log.push(["join", info]),
    leave: (info: unknown) => log.push(["leave", info]),
    error: (err: { code: string }) => log.push(["error", err.code]),
  };
  return { log, handlers };
}

test("states: subscribing → subscribed → subscribing on a drop → subscribed again → unsubscribed", async () => {
  const { gw, clock, client } = harness();
  const { log, handlers } = recorder();
  const sub = client.subscribe("plain", handlers);
  assert.equal(sub.state, "subscribing");
  client.connect();
  await clock.advance(0);
  assert.equal(sub.state, "subscribed");
  assert.deepEqual(log.shift(), ["subscribed", { recovered: false, first: true }]);
  gw.publish("plain", "hi");
  await clock.advance(0);
  assert.deepEqual(log.shift(), ["message", "hi", undefined]);
  gw.last.serverClose(1006);
  await clock.advance(0);
  assert.equal(sub.state, "subscribing");
  await clock.advance(500);
  assert.equal(sub.state, "subscribed");
  // No history: nothing could be recovered, the app must reload.
  assert.deepEqual(log.shift(), ["subscribed", { recovered: false, first: false }]);
  await sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
  assert.deepEqual(gw.last.ops("unsubscribe"), [{ id: 3, op: "unsubscribe", channel: "plain" }]);
  gw.publish("plain", "after");
  await clock.advance(0);
  assert.deepEqual(log, []);
  assert.equal(client.subscription("plain"), undefined);
  // The channel can be subscribed again; twice at once is an error.
  const again = client.subscribe("plain");
  assert.throws(() => client.subscribe("plain"), { code: "already_subscribed" });
  await clock.advance(0);
  assert.equal(again.state, "subscribed");
  client.close();
});

test("subscriptions are made again after a reconnect in the order they were made", async () => {
  const { gw, clock, client } = harness();
  client.connect();
  await clock.advance(0);
  for (const c of ["c", "a", "b"]) client.subscribe(c);
  client.subscribe("d");
  await client.unsubscribe("a");
  gw.last.serverClose(1012);
  await clock.advance(1000);
  assert.deepEqual(
    gw.last.ops("subscribe").map((r) => r.channel),
    ["c", "b", "d"],
  );
  client.close();
});

test("forbidden ends the subscription; unavailable is retried with backoff", async () => {
  const { gw, clock, client } = harness();
  let unavailable = 2;
  gw.override = (s, req) => {
    if (req.op !== "subscribe") return false;
    if (req.channel === "secret") {
      s.push({ id: req.id, op: "error", code: "forbidden", message: "subscribe to secret denied" });
      return true;
    }
    if (req.channel === "busy" && unavailable > 0) {
      unavailable--;
      s.push({ id: req.id, op: "error", code: "unavailable", message: "broker unavailable" });
      return true;
    }
    return false;
  };
  const denied = recorder();
  const busy = recorder();
  client.connect();
  const s1 = client.subscribe("secret", denied.handlers);
  const s2 = client.subscribe("busy", busy.handlers);
  await clock.advance(0);
  assert.equal(s1.state, "unsubscribed");
  assert.deepEqual(denied.log, [["error", "forbidden"]]);
  assert.equal(client.subscription("secret"), undefined);
  assert.equal(s2.state, "subscribing");
  assert.deepEqual(busy.log, [["error", "unavailable"]]);
  await clock.advance(10_000);
  assert.equal(s2.state, "subscribed");
  assert.equal(gw.last.ops("subscribe").filter((r) => r.channel === "busy").length, 3);
  assert.deepEqual(busy.log.at(-1), ["subscribed", { recovered: false, first: true }]);
  // After a reconnect the denied channel is not asked for again.
  gw.last.serverClose(1006);
  await clock.advance(1000);
  assert.deepEqual(
    gw.last.ops("subscribe").map((r) => r.channel),
    ["busy"],
  );
  client.close();
});

test("recovery: resubscribe with since, replayed before live, exactly once, recovered surfaced", async () => {
  const { gw, clock, client } = harness();
  gw.withHistory("room");
  gw.publish("room", "m1");
  const { log, handlers } = recorder();
  const sub = client.subscribe("room", handlers);
  client.connect();
  await clock.advance(0);
  assert.deepEqual(log.shift(), ["subscribed", { recovered: false, epoch: "e1", offset: 1, first: true }]);
  gw.publish("room", "m2");
  gw.publish("room", "m3");
  await clock.advance(0);
  assert.deepEqual(log.splice(0), [
    ["message", "m2", 2],
    ["message", "m3", 3],
  ]);
  assert.deepEqual(sub.position, { epoch: "e1", offset: 3 });
  gw.last.serverClose(1006);
  gw.publish("room", "m4");
  gw.publish("room", "m5");
  // The gateway replays from one earlier than asked and repeats a live message: both are dropped.
  const replayFrom = (s: any, req: any) => {
    if (req.op !== "subscribe") return false;
    gw.override = undefined;
    gw.handle(s, { ...req, since: { ...req.since, offset: req.since.offset - 1 } });
    gw.publish("room", "m6");
    s.push({ op: "message", channel: "room", data: "m6", offset: 6 });
    return true;
  };
  gw.override = replayFrom;
  await clock.advance(500);
  assert.deepEqual(gw.last.ops("subscribe")[0].since, { epoch: "e1", offset: 3 });
  assert.deepEqual(log.splice(0), [
    ["subscribed", { recovered: true, epoch: "e1", offset: 5, first: false }],
    ["message", "m4", 4],
    ["message", "m5", 5],
    ["message", "m6", 6],
  ]);
  assert.deepEqual(sub.position, { epoch: "e1", offset: 6 });
  client.close();
});

test("recovery fails when the history was lost: recovered false, the position moves to the new epoch", async () => {
  const { gw, clock, client } = harness();
  gw.withHistory("room");
  const { log, handlers } = recorder();
  const sub = client.subscribe("room", handlers);
  client.connect();
  await clock.advance(0);
  gw.publish("room", "m1");
  await clock.advance(0);
  gw.last.serverClose(1001);
  gw.newEpoch("room", "e2");
  gw.publish("room", "n1");
  gw.publish("room", "n2");
  log.length = 0;
  await clock.advance(500);
  assert.deepEqual(gw.last.ops("subscribe")[0].since, { epoch: "e1", offset: 1 });
  assert.deepEqual(log.splice(0), [["subscribed", { recovered: false, epoch: "e2", offset: 2, first: false }]]);
  assert.deepEqual(sub.position, { epoch: "e2", offset: 2 });
  // Offset 1 of the new epoch is not taken for the old epoch's 1: live messages continue from 2.
  gw.publish("room", "n3");
  await clock.advance(0);
  assert.deepEqual(log.splice(0), [["message", "n3", 3]]);
  client.close();
});

test("reset: the app is told, and the position moves to where the gateway says", async () => {
  const { gw, clock, client } = harness();
  gw.withHistory("room");
  const { log, handlers } = recorder();
  const sub = client.subscribe("room", handlers);
  client.connect();
  await clock.advance(0);
  gw.publish("room", "m1");
  await clock.advance(0);
  gw.last.push({ op: "reset", channel: "room", epoch: "e9", offset: 12 });
  gw.last.push({ op: "message", channel: "room", data: "old", offset: 12 });
  gw.last.push({ op: "message", channel: "room", data: "m13", offset: 13 });
  await clock.advance(0);
  assert.deepEqual(log.slice(1), [
    ["message", "m1", 1],
    ["reset", { epoch: "e9", offset: 12 }],
    ["message", "m13", 13],
  ]);
  assert.deepEqual(sub.position, { epoch: "e9", offset: 13 });
  client.close();
});

test("subscribe with a known position (since option); a channel without history drops it", async () => {
  const { gw, clock, client } = harness();
  const ch = gw.withHistory("room", "e5");
  for (let i = 1; i <= 5; i++) gw.publish("room", `m${i}`);
  const { log, handlers } = recorder();
  client.subscribe("room", handlers, { since: { epoch: "e5", offset: 3 } });
  const plain = recorder();
  const p = client.subscribe("plain", plain.handlers, { since: { epoch: "x", offset: 1 } });
  client.connect();
  await clock.advance(0);
  assert.deepEqual(log, [
    ["subscribed", { recovered: true, epoch: "e5", offset: 5, first: true }],
    ["message", "m4", 4],
    ["message", "m5", 5],
  ]);
  assert.deepEqual(plain.log, [["error", "not_found"], ["subscribed", { recovered: false, first: true }]]);
  assert.equal(p.state, "subscribed");
  assert.equal(p.position, undefined);
  assert.equal(ch.subscribers.size, 1);
  client.close();
});

test("join and leave reach the channel's handlers; messages of other channels do not", async () => {
  const { gw, clock, client } = harness();
  const { log, handlers } = recorder();
  client.subscribe("room", handlers);
  client.connect();
  await clock.advance(0);
  log.length = 0;
  gw.last.push({ op: "join", channel: "room", conn: "c1", subject: "u-7", claims: { name: "Ada" } });
  gw.last.push({ op: "leave", channel: "room", conn: "c1", subject: "u-7" });
  gw.last.push({ op: "message", channel: "elsewhere", data: 1 });
  gw.last.push("not json");
  await clock.advance(0);
  assert.deepEqual(log, [
    ["join", { conn: "c1", subject: "u-7", claims: { name: "Ada" } }],
    ["leave", { conn: "c1", subject: "u-7" }],
  ]);
  assert.equal(client.state, "connected");
  client.close();
});
