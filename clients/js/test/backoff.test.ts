import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay } from "wsgate";
import { harness, seeded } from "./fake.js";

test("backoff: 1,000 draws stay within [0, cap) and spread over the whole range", () => {
  const random = seeded(42);
  for (const [attempt, cap] of [
    [0, 500],
    [1, 1000],
    [3, 4000],
    [5, 16000],
    [6, 20000],
    [40, 20000],
  ] as const) {
    const buckets = new Array(10).fill(0);
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < 1000; i++) {
      const d = backoffDelay(attempt, 500, 20000, random);
      assert.ok(d >= 0 && d < cap, `attempt ${attempt}: ${d} outside [0, ${cap})`);
      buckets[Math.floor((d / cap) * 10)]++;
      lo = Math.min(lo, d);
      hi = Math.max(hi, d);
    }
    // Full jitter: uniform over [0, cap). Each tenth expects 100; a lopsided
    // distribution (e.g. "equal jitter", cap/2 + random) fails here.
    for (const [i, n] of buckets.entries()) assert.ok(n >= 60 && n <= 140, `attempt ${attempt}: tenth ${i} got ${n} of 1000`);
    assert.ok(lo < cap * 0.01 && hi > cap * 0.99, `attempt ${attempt}: range ${lo}..${hi} of ${cap}`);
  }
});

test("backoff: the bounds are configurable and the extremes of random map to [0, cap)", () => {
  assert.equal(backoffDelay(0, 100, 1000, () => 0), 0);
  assert.equal(backoffDelay(0, 100, 1000, () => 0.999999), 99);
  assert.equal(backoffDelay(2, 100, 1000, () => 0.999999), 399);
  assert.equal(backoffDelay(4, 100, 1000, () => 0.999999), 999);
  assert.equal(backoffDelay(1000, 100, 1000, () => 0.5), 500);
});

test("reconnect storm: first attempts of 1,000 clients spread uniformly over [0, minReconnectDelay)", () => {
  const random = seeded(7);
  const perTenth = new Array(10).fill(0);
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(0, 500, 20000, random);
    assert.ok(d < 500);
    perTenth[Math.floor(d / 50)]++;
  }
  // At most about N / minReconnectDelay handshakes per unit of time.
  assert.ok(Math.max(...perTenth) <= 140, `busiest 50 ms window: ${Math.max(...perTenth)} of 1000`);
});

test("client: delays between failed attempts grow by doubling up to maxReconnectDelay", async () => {
  const { gw, clock, client, events } = harness({ random: () => 0.999999, minReconnectDelay: 100, maxReconnectDelay: 1000 });
  gw.handshake = () => ({ code: 1006 });
  client.connect();
  const delays: number[] = [];
  for (let i = 0; i < 7; i++) {
    await clock.advance(0);
    assert.equal(client.state, "disconnected");
    assert.deepEqual(clock.delays().length, 1, "one reconnect timer armed");
    delays.push(clock.delays()[0]);
    await clock.advance(clock.delays()[0]);
  }
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999]);
  assert.equal(gw.sockets.length, 8, "a client that never connected keeps retrying");
  assert.ok(events.filter((e) => e.type === "disconnected").every((e) => e.ev.willReconnect && e.ev.code === 1006));
  client.close();
  assert.equal(clock.armed, 0);
});

test("client: the backoff starts again after a connection that stayed up, not after one that dropped at once", async () => {
  const { gw, clock, client, events } = harness({ random: () => 0.999999, minReconnectDelay: 100, maxReconnectDelay: 1000, livenessInterval: 1e9 });
  client.connect();
  await clock.advance(0);
  assert.equal(client.state, "connected");
  // Drops right after opening keep the backoff growing.
  gw.last.serverClose(1011, "upstream went away");
  await clock.advance(0);
  assert.deepEqual(clock.delays(), [99]);
  await clock.advance(99);
  assert.equal(client.state, "connected");
  gw.last.serverClose(1011, "upstream went away");
  await clock.advance(0);
  assert.deepEqual(clock.delays(), [199]);
  await clock.advance(199);
  // This one lives for maxReconnectDelay: the next drop starts from the first window.
  await clock.advance(1000);
  gw.last.serverClose(1001, "server shutting down");
  await clock.advance(0);
  assert.deepEqual(clock.delays(), [99]);
  await clock.advance(99);
  assert.deepEqual(
    events.filter((e) => e.type === "connecting").map((e) => e.ev.attempt),
    [0, 0, 1, 0],
    "attempt is the n of the delay before it, as in the README",
  );
  client.close();
});
