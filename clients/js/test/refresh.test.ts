import { test } from "node:test";
import assert from "node:assert/strict";
import { tokenExpiry } from "wsgate";
import { harness, jwt } from "./fake.js";

test("tokenExpiry reads exp without verifying, and tolerates what is not a JWT", () => {
  assert.equal(tokenExpiry(jwt(1_700_000_120)), 1_700_000_120_000);
  assert.equal(tokenExpiry("opaque-token"), undefined);
  assert.equal(tokenExpiry("a.!!!.c"), undefined);
  assert.equal(tokenExpiry(`x.${Buffer.from('{"sub":"u"}').toString("base64url")}.y`), undefined);
});

test("refresh is sent refreshBefore ahead of exp, with a token from token(), then again for the new token", async () => {
  const tokens: string[] = [];
  const h = harness((clock) => ({
    livenessInterval: 1e9,
    token: async () => {
      tokens.push(jwt(Math.floor(clock.now() / 1000) + 120, `u${tokens.length}`));
      return tokens[tokens.length - 1];
    },
  }));
  h.client.connect();
  await h.clock.advance(0);
  assert.equal(tokens.length, 1);
  await h.clock.advance(89_999);
  assert.equal(h.gw.last.ops("refresh").length, 0);
  await h.clock.advance(1);
  assert.equal(tokens.length, 2);
  assert.deepEqual(
    h.gw.last.ops("refresh").map((r) => r.token),
    [tokens[1]],
  );
  // The second token was minted at +90 s with 120 s to live: next refresh at +180 s.
  await h.clock.advance(89_999);
  assert.equal(h.gw.last.ops("refresh").length, 1);
  await h.clock.advance(1);
  assert.equal(h.gw.last.ops("refresh").length, 2);
  assert.equal(h.gw.sockets.length, 1, "refreshing does not reconnect");
  h.client.close();
  assert.equal(h.clock.armed, 0);
});

test("a short-lived token is refreshed halfway", async () => {
  const h = harness((clock) => ({ token: () => jwt(Math.floor(clock.now() / 1000) + 20), livenessInterval: 1e9 }));
  h.client.connect();
  await h.clock.advance(0);
  const [delay] = h.clock.delays();
  assert.equal(delay, 10_000);
  h.client.close();
});

test("a refused refresh reconnects with a fresh token", async () => {
  let n = 0;
  const h = harness((clock) => ({ token: () => jwt(Math.floor(clock.now() / 1000) + 60, `u${++n}`), livenessInterval: 1e9 }));
  h.gw.override = (s, req) => {
    if (req.op !== "refresh") return false;
    s.push({ id: req.id, op: "error", code: "forbidden", message: "token expired" });
    return true;
  };
  h.client.connect();
  await h.clock.advance(0);
  const first = h.gw.last;
  await h.clock.advance(30_000);
  assert.equal(first.ops("refresh").length, 1);
  assert.deepEqual(first.closedByClient, { code: 4002, reason: "token refresh failed" });
  assert.equal(h.client.state, "disconnected");
  assert.ok(h.events.some((e) => e.type === "error" && e.ev.code === "forbidden"));
  await h.clock.advance(h.clock.delays()[0]);
  assert.equal(h.client.state, "connected");
  assert.equal(h.gw.sockets.length, 2);
  assert.notEqual(h.gw.last.token, first.token);
  assert.equal(n, 3, "token() for the first connection, the refresh and the reconnect");
  h.client.close();
});

test("close 1008 token expired: reconnect with a new token; a token without exp is never refreshed", async () => {
  let n = 0;
  const h = harness({ token: () => `opaque${++n}`, livenessInterval: 1e9 });
  h.client.connect();
  await h.clock.advance(0);
  assert.deepEqual(h.clock.delays(), [1e9], "only the liveness timer: no refresh for a token without exp");
  h.gw.last.serverClose(1008, "token expired");
  await h.clock.advance(500);
  assert.equal(h.client.state, "connected");
  assert.equal(h.gw.last.token, "opaque2");
  h.client.close();
});

test("a token that lives longer than a timer can wait (30 days) is refreshed once, refreshBefore ahead of exp", async () => {
  const day = 86_400_000;
  const tokens: string[] = [];
  const h = harness((clock) => ({
    livenessInterval: 1e9,
    token: () => {
      tokens.push(jwt(Math.floor(clock.now() / 1000) + 30 * 86_400, `u${tokens.length}`));
      return tokens[tokens.length - 1];
    },
  }));
  h.client.connect();
  await h.clock.advance(1000);
  assert.equal(h.gw.last.ops("refresh").length, 0, "no refresh right after connecting");
  assert.ok(Math.max(...h.clock.delays()) <= 2 ** 31 - 1);
  await h.clock.advance(30 * day - 30_000 - 1000 - 1);
  assert.equal(h.gw.last.ops("refresh").length, 0);
  assert.equal(tokens.length, 1);
  await h.clock.advance(1);
  assert.deepEqual(
    h.gw.last.ops("refresh").map((r) => r.token),
    [tokens[1]],
  );
  await h.clock.advance(1000);
  assert.equal(h.gw.last.ops("refresh").length, 1, "the new token's refresh is 30 days away again");
  assert.deepEqual(h.clock.overlong, [], "no timer asked for more than 2^31−1 ms");
  h.client.close();
  assert.equal(h.clock.armed, 0);
});
