// Client for wsgate's rooms protocol, wsgate.v1.
//
// One self-contained ES module with no imports, so that a browser can load
// the built file directly (<script type="module">) and Node 20 can use it with
// any WebSocket implementation passed in the options.

/** The WebSocket subprotocol of the rooms protocol. */
export const PROTOCOL = "wsgate.v1";

/** Connection states: disconnected → connecting → connected → (disconnected | closed). */
export type ClientState = "disconnected" | "connecting" | "connected" | "closed";

/** Subscription states: subscribing → subscribed → unsubscribed. */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

/** A place in a channel's history: the offset within one epoch. */
export interface Position {
  epoch: string;
  offset: number;
}

/** The part of the WebSocket API the client uses (the browser's, Node's, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
}

/** A WebSocket constructor, such as the browser's global `WebSocket`. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Opaque handle of a timer of a {@link Clock}. */
export type TimerHandle = unknown;

/** Time as the client sees it; replaced in tests so that nothing waits on real time. */
export interface Clock {
  /** Milliseconds since the Unix epoch. */
  now(): number;
  setTimeout(fn: () => void, ms: number): TimerHandle;
  clearTimeout(handle: TimerHandle): void;
}

export interface ClientOptions {
  /**
   * Returns the bearer token (may be async). Called before the first connection, before every
   * reconnect, and for the in-band refresh before the token's `exp`. Without it the client
   * connects without a token.
   */
  token?: () => string | Promise<string>;
  /** The WebSocket constructor. Default: the global `WebSocket` (browsers; Node 22 and later). */
  WebSocket?: WebSocketConstructor;
  /** Base of the reconnect backoff, in ms. Default 500. */
  minReconnectDelay?: number;
  /** Cap of the reconnect backoff, in ms. Default 20000. */
  maxReconnectDelay?: number;
  /** A ping is sent when nothing was received for this long, in ms. Default 10000. */
  livenessInterval?: number;
  /** The connection is taken for dead when nothing arrives this long after a ping, in ms. Default 5000. */
  livenessTimeout?: number;
  /**
   * A connection attempt (TCP connect and WebSocket handshake) that has not opened after this long,
   * in ms, is abandoned and tried again with backoff. Default 10000.
   */
  connectTimeout?: number;
  /** How many requests may wait while not connected; beyond that they fail with "queue_full". Default 1000. */
  queueSize?: number;
  /** The token is refreshed in band this long before its `exp`, in ms. Default 30000. */
  refreshBefore?: number;
  /** Uniform random numbers in [0, 1) for the backoff jitter. Default Math.random. */
  random?: () => number;
  /** Timers and the current time. Default: the platform's. */
  clock?: Clock;
}

/** Payload of the `disconnected` event. */
export interface DisconnectEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
}

/** The client's events and their payloads. */
export interface ClientEvents {
  /**
   * `attempt` is n of the reconnect backoff whose delay came before this attempt: 0 for the first
   * connection and for the first reconnect after a connection that stayed up, then 1, 2, …
   */
  connecting: { attempt: number };
  connected: {};
  disconnected: DisconnectEvent;
  error: Error;
}

/** A connection subscribed to a channel, as presence lists it and join/leave events carry it. */
export interface PresenceInfo {
  conn: string;
  subject?: string;
  claims?: Record<string, unknown>;
}

/** Passed to the `subscribed` handler after every successful (re)subscribe. */
export interface SubscribedContext {
  /** True when the gateway replayed everything missed since the last delivered message. */
  recovered: boolean;
  /** The channel's epoch and last offset (channels with history only). */
  epoch?: string;
  offset?: number;
  /** True for the first subscribe of this Subscription, false after a reconnect. */
  first: boolean;
}

export interface SubscriptionHandlers<T = unknown> {
  message?(data: T, ctx: { offset?: number }): void;
  subscribed?(ctx: SubscribedContext): void;
  reset?(pos: Position): void;
  join?(info: PresenceInfo): void;
  leave?(info: PresenceInfo): void;
  error?(err: WsgateError): void;
}

export interface SubscribeOptions {
  /** Resume from this position (e.g. one kept across page loads) instead of the channel's end. */
  since?: Position;
}

/** One message of a channel's history. */
export interface HistoryEntry<T = unknown> {
  offset: number;
  data: T;
}

export interface HistoryResult<T = unknown> {
  epoch: string;
  offset: number;
  publications: HistoryEntry<T>[];
}

/**
 * A failed request or subscription. `code` is the gateway's error code (bad_request, forbidden,
 * rate_limited, too_large, unavailable, not_found) or one of the client's own: queue_full (the
 * offline queue is full), disconnected (the connection was lost before the reply: the request
 * may or may not have taken effect), closed (the client was closed), already_subscribed.
 */
export class WsgateError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "WsgateError";
    this.code = code;
  }
}

/** Close codes after which the client never reconnects (1008 only when its reason is not "token expired"). */
export const TERMINAL_CLOSE_CODES: readonly number[] = [1002, 1003, 1007, 1008, 1009, 1010];

/** Whether a close with this code and reason ends reconnection. */
export function isTerminalClose(code: number, reason: string): boolean {
  if (code === 1008) return reason !== "token expired";
  return TERMINAL_CLOSE_CODES.includes(code);
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first): full jitter over
 * [0, min(max, min·2^attempt)).
 */
export function backoffDelay(attempt: number, min: number, max: number, random: () => number): number {
  const cap = Math.min(max, min * Math.pow(2, Math.min(attempt, 52)));
  return Math.floor(random() * cap);
}

/** The `exp` claim of a JWT in ms since the epoch, read without verifying it; undefined if none. */
export function tokenExpiry(token: string): number | undefined {
  const parts = token.split(".");
  if (parts.length !== 3) return undefined;
  try {
    let b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    b64 += "=".repeat((4 - (b64.length % 4)) % 4);
    const decode = (globalThis as any).atob as (s: string) => string;
    const claims = JSON.parse(decode(b64));
    return typeof claims?.exp === "number" ? claims.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

// The platform's timers (browsers and Node both have them; lib ES2020 does not declare them).
declare function setTimeout(fn: () => void, ms: number): unknown;
declare function clearTimeout(handle: unknown): void;

const defaultClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h),
};

// The longest delay setTimeout honours in browsers and Node.
const MAX_TIMER_DELAY = 2 ** 31 - 1;

// Client-initiated closes that are followed by a reconnect (private-use range,
// which browsers allow in close()).
const CLOSE_LIVENESS = 4000;
const CLOSE_REFRESH = 4002;

type Listener<K extends keyof ClientEvents> = (ev: ClientEvents[K]) => void;

interface Pending {
  resolve(reply: any): void;
  reject(err: WsgateError): void;
}

interface Queued extends Pending {
  req: Record<string, unknown>;
}

/** The client's view of one channel; made by {@link Client.subscribe}. */
export class Subscription<T = unknown> {
  readonly channel: string;
  private _state: SubscriptionState = "subscribing";
  private _pos: Position | undefined;
  // The id of the subscribe request in flight on the current connection, if any.
  /** @internal */ _reqId = 0;
  /** @internal */ _retry: TimerHandle | undefined;
  /** @internal */ _attempt = 0;
  private _first = true;

  /** Made by {@link Client.subscribe}. */
  constructor(
    private readonly client: Client,
    channel: string,
    private readonly handlers: SubscriptionHandlers<T>,
    since: Position | undefined,
  ) {
    this.channel = channel;
    this._pos = since && { epoch: since.epoch, offset: since.offset };
  }

  get state(): SubscriptionState {
    return this._state;
  }

  /** The epoch and offset of the last message delivered (or the position after a reset or a non-recovered subscribe). */
  get position(): Position | undefined {
    return this._pos && { ...this._pos };
  }

  /** Ends the subscription; settled by the gateway's reply (at once when not connected). */
  unsubscribe(): Promise<void> {
    return this.client._unsubscribe(this);
  }

  /** @internal */ _request(): Record<string, unknown> {
    const req: Record<string, unknown> = { op: "subscribe", channel: this.channel };
    if (this._pos) req.since = { epoch: this._pos.epoch, offset: this._pos.offset };
    return req;
  }

  /** @internal */ _subscribed(reply: any): void {
    this._reqId = 0;
    this._attempt = 0;
    const recovered = reply.recovered === true;
    if (typeof reply.epoch === "string" && typeof reply.offset === "number") {
      // After a recovery the replayed messages follow the reply and move the
      // position themselves; otherwise the reply says where we now stand.
      if (!(recovered && this._pos && this._pos.epoch === reply.epoch)) {
        this._pos = { epoch: reply.epoch, offset: reply.offset };
      }
    } else {
      this._pos = undefined;
    }
    this._state = "subscribed";
    const first = this._first;
    this._first = false;
    const ctx: SubscribedContext = { recovered, first };
    if (typeof reply.epoch === "string") ctx.epoch = reply.epoch;
    if (typeof reply.offset === "number") ctx.offset = reply.offset;
    this.call("subscribed", ctx);
  }

  /** @internal */ _message(m: any): void {
    if (this._state === "unsubscribed") return;
    const ctx: { offset?: number } = {};
    if (typeof m.offset === "number") {
      if (this._pos) {
        if (m.offset <= this._pos.offset) return; // delivered already
        this._pos.offset = m.offset;
      }
      ctx.offset = m.offset;
    }
    this.call("message", m.data as T, ctx);
  }

  /** @internal */ _reset(m: any): void {
    if (this._state === "unsubscribed") return;
    if (typeof m.epoch !== "string" || typeof m.offset !== "number") return;
    this._pos = { epoch: m.epoch, offset: m.offset };
    this.call("reset", { epoch: m.epoch, offset: m.offset });
  }

  /** @internal */ _presence(kind: "join" | "leave", m: any): void {
    if (this._state === "unsubscribed") return;
    const info: PresenceInfo = { conn: m.conn };
    if (m.subject !== undefined) info.subject = m.subject;
    if (m.claims !== undefined) info.claims = m.claims;
    this.call(kind, info);
  }

  /** @internal */ _lost(): void {
    this._reqId = 0;
    if (this._state === "subscribed") this._state = "subscribing";
  }

  /** @internal */ _forgetSince(): void {
    this._pos = undefined;
  }

  /** @internal */ _end(err?: WsgateError): void {
    if (this._state === "unsubscribed") return;
    this._state = "unsubscribed";
    this._reqId = 0;
    if (err) this.call("error", err);
  }

  /** @internal */ _error(err: WsgateError): void {
    this.call("error", err);
  }

  // A handler that throws must not break the client's read loop.
  private call<K extends keyof SubscriptionHandlers<T>>(name: K, ...args: any[]): void {
    const fn = this.handlers[name] as ((...a: any[]) => void) | undefined;
    if (!fn) return;
    try {
      fn.apply(this.handlers, args);
    } catch (e) {
      this.client._emitError(e);
    }
  }
}

/**
 * A wsgate.v1 client: one WebSocket to the gateway, kept open with reconnects, carrying any
 * number of subscriptions and requests.
 */
export class Client {
  readonly url: string;
  private readonly opts: Required<Omit<ClientOptions, "token" | "WebSocket">>;
  private readonly tokenFn: (() => string | Promise<string>) | undefined;
  private readonly WS: WebSocketConstructor | undefined;

  private _state: ClientState = "disconnected";
  private ws: WebSocketLike | undefined;
  // Incremented for every connection attempt; callbacks of older ones are ignored.
  private gen = 0;
  private attempt = 0;
  private connectedAt = 0;
  private nextId = 1;
  private token: string | undefined;

  private readonly subs = new Map<string, Subscription<any>>();
  private readonly pending = new Map<number, Pending>();
  private readonly queue: Queued[] = [];
  private readonly listeners: { [K in keyof ClientEvents]: Set<Listener<K>> } = {
    connecting: new Set(),
    connected: new Set(),
    disconnected: new Set(),
    error: new Set(),
  };

  private reconnectTimer: TimerHandle | undefined;
  private livenessTimer: TimerHandle | undefined;
  private connectTimer: TimerHandle | undefined;
  private refreshTimer: TimerHandle | undefined;
  private lastReceived = 0;
  private pingSentAt = 0;

  constructor(url: string, options: ClientOptions = {}) {
    this.url = url;
    this.tokenFn = options.token;
    this.WS = options.WebSocket ?? (globalThis as any).WebSocket;
    this.opts = {
      minReconnectDelay: options.minReconnectDelay ?? 500,
      maxReconnectDelay: options.maxReconnectDelay ?? 20000,
      livenessInterval: options.livenessInterval ?? 10000,
      livenessTimeout: options.livenessTimeout ?? 5000,
      connectTimeout: options.connectTimeout ?? 10000,
      queueSize: options.queueSize ?? 1000,
      refreshBefore: options.refreshBefore ?? 30000,
      random: options.random ?? Math.random,
      clock: options.clock ?? defaultClock,
    };
    if (!(this.opts.minReconnectDelay > 0) || !(this.opts.maxReconnectDelay >= this.opts.minReconnectDelay)) {
      throw new RangeError("wsgate: need 0 < minReconnectDelay <= maxReconnectDelay");
    }
    if (!(this.opts.livenessInterval > 0) || !(this.opts.livenessTimeout > 0)) {
      throw new RangeError("wsgate: livenessInterval and livenessTimeout must be positive");
    }
    if (!(this.opts.connectTimeout > 0)) throw new RangeError("wsgate: connectTimeout must be positive");
    if (!(this.opts.queueSize >= 0)) throw new RangeError("wsgate: queueSize must not be negative");
  }

  get state(): ClientState {
    return this._state;
  }

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof ClientEvents>(event: K, fn: (ev: ClientEvents[K]) => void): () => void {
    this.listeners[event].add(fn);
    return () => this.off(event, fn);
  }

  off<K extends keyof ClientEvents>(event: K, fn: (ev: ClientEvents[K]) => void): void {
    this.listeners[event].delete(fn);
  }

  /** Starts connecting (at once); reconnects on its own from then on until {@link close}. */
  connect(): void {
    if (this._state === "closed") throw new WsgateError("closed", "wsgate: client is closed");
    if (this._state !== "disconnected" || this.reconnectTimer !== undefined) return;
    void this.open(0);
  }

  /** Closes the connection for good: no reconnect; waiting requests fail with "closed". */
  close(): void {
    if (this._state === "closed") return;
    const wasUp = this._state;
    this._state = "closed";
    this.gen++;
    this.clearTimers();
    const ws = this.ws;
    this.ws = undefined;
    if (ws) this.detach(ws, 1000, "client closed");
    this.failAll(new WsgateError("closed", "wsgate: client closed"));
    if (wasUp !== "disconnected" || ws) {
      this.emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false });
    }
  }

  /**
   * Subscribes to a channel. The subscription is made again after every reconnect, resuming
   * after the last delivered message where the channel keeps history.
   */
  subscribe<T = unknown>(channel: string, handlers: SubscriptionHandlers<T> = {}, options: SubscribeOptions = {}): Subscription<T> {
    if (this._state === "closed") throw new WsgateError("closed", "wsgate: client is closed");
    if (this.subs.has(channel)) throw new WsgateError("already_subscribed", `wsgate: already subscribed to ${channel}`);
    const sub = new Subscription<T>(this, channel, handlers, options.since);
    this.subs.set(channel, sub);
    if (this._state === "connected") this.sendSubscribe(sub);
    return sub;
  }

  /** Ends the subscription to a channel (see {@link Subscription.unsubscribe}). */
  unsubscribe(channel: string): Promise<void> {
    const sub = this.subs.get(channel);
    return sub ? sub.unsubscribe() : Promise.resolve();
  }

  /** The subscription to a channel, if any. */
  subscription(channel: string): Subscription<any> | undefined {
    return this.subs.get(channel);
  }

  /** Publishes to a channel: resolves on the gateway's ok, rejects with its error. */
  publish(channel: string, data: unknown): Promise<void> {
    return this.request({ op: "publish", channel, data }).then(() => undefined);
  }

  /** The connections subscribed to a channel, on every node. */
  presence(channel: string): Promise<PresenceInfo[]> {
    return this.request({ op: "presence", channel }).then((r) => r.presence ?? []);
  }

  /** How many connections are subscribed to a channel, on every node. */
  presenceCount(channel: string): Promise<number> {
    return this.request({ op: "presence_count", channel }).then((r) => r.count);
  }

  /** The last `limit` messages of a channel (the gateway's `recover_max` without a limit), oldest first. */
  history<T = unknown>(channel: string, limit?: number): Promise<HistoryResult<T>> {
    const req: Record<string, unknown> = { op: "history", channel };
    if (limit !== undefined) req.limit = limit;
    return this.request(req).then((r) => ({ epoch: r.epoch, offset: r.offset, publications: r.publications ?? [] }));
  }

  // ---- internals used by Subscription ----

  /** @internal */ _unsubscribe(sub: Subscription<any>): Promise<void> {
    if (sub.state === "unsubscribed") return Promise.resolve();
    const wasSent = this._state === "connected" && (sub.state === "subscribed" || sub._reqId !== 0);
    this.clearSubRetry(sub);
    sub._end();
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    if (!wasSent) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.send(
        { op: "unsubscribe", channel: sub.channel },
        {
          resolve: () => resolve(),
          // A lost connection ends the gateway's subscription too.
          reject: (err) => (err.code === "disconnected" || err.code === "closed" ? resolve() : reject(err)),
        },
      );
    });
  }

  /** @internal */ _emitError(e: unknown): void {
    this.emit("error", e instanceof Error ? e : new Error(String(e)));
  }

  // ---- connection ----

  // attempt is the n of the backoff whose delay preceded this attempt (0 for
  // the first connection), the number the README's reconnect section uses.
  private async open(attempt: number): Promise<void> {
    const gen = ++this.gen;
    this._state = "connecting";
    this.emit("connecting", { attempt });
    if (gen !== this.gen) return; // a listener closed the client
    let token: string | undefined;
    if (this.tokenFn) {
      try {
        token = await this.tokenFn();
      } catch (e) {
        if (gen !== this.gen) return;
        this._emitError(e);
        this.lost(1006, "token unavailable", false);
        return;
      }
      if (gen !== this.gen) return;
    }
    if (!this.WS) {
      this._state = "closed";
      this.failAll(new WsgateError("closed", "wsgate: no WebSocket implementation (pass options.WebSocket)"));
      this._emitError(new Error("wsgate: no WebSocket implementation (pass options.WebSocket)"));
      this.emit("disconnected", { code: 1006, reason: "no WebSocket implementation", willReconnect: false });
      return;
    }
    this.token = token;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(this.url, token ? [PROTOCOL, "bearer", token] : [PROTOCOL]);
    } catch (e) {
      // A malformed URL or token: no retry can fix it.
      this._emitError(e);
      this.lost(1006, String((e as Error)?.message ?? e), true);
      return;
    }
    this.ws = ws;
    // A connect that gets no answer (a blackholed address) would otherwise
    // wait for the operating system's timeout, minutes on some.
    this.connectTimer = this.opts.clock.setTimeout(() => {
      this.connectTimer = undefined;
      if (gen !== this.gen) return;
      this.detach(ws, 1000, "");
      this.lost(1006, "handshake timeout", false);
    }, Math.min(MAX_TIMER_DELAY, this.opts.connectTimeout));
    ws.onopen = () => {
      if (gen === this.gen) this.opened(ws);
    };
    ws.onmessage = (ev) => {
      if (gen === this.gen) this.received(ev.data);
    };
    ws.onclose = (ev) => {
      if (gen !== this.gen) return;
      this.ws = undefined;
      this.lost(ev.code, ev.reason ?? "", isTerminalClose(ev.code, ev.reason ?? ""));
    };
    ws.onerror = () => {
      // A failed connection: browsers follow with a close event of code 1006,
      // but Node 20's WebSocket fires none after a refused handshake, so the
      // error itself ends the attempt.
      if (gen !== this.gen) return;
      this.detach(ws, 1000, "");
      this.lost(1006, "", false);
    };
  }

  private opened(ws: WebSocketLike): void {
    if (this.connectTimer !== undefined) {
      this.opts.clock.clearTimeout(this.connectTimer);
      this.connectTimer = undefined;
    }
    if (ws.protocol !== PROTOCOL) {
      this._emitError(new Error(`wsgate: the server answered subprotocol "${ws.protocol}", not ${PROTOCOL}`));
      // Retried like any failed handshake (perhaps a proxy in front that is
      // being replaced), so reported as one; close() takes only 1000 and 3000–4999.
      this.detach(ws, 1000, "");
      this.lost(1006, "subprotocol not accepted", false);
      return;
    }
    this._state = "connected";
    const now = this.opts.clock.now();
    this.connectedAt = now;
    this.lastReceived = now;
    this.pingSentAt = 0;
    this.armLiveness(this.opts.livenessInterval);
    this.scheduleRefresh();
    // Subscriptions first, in the order they were made, so that the queued
    // publishes' own messages reach them.
    for (const sub of this.subs.values()) {
      if (sub._retry === undefined) this.sendSubscribe(sub);
    }
    const queued = this.queue.splice(0);
    for (const q of queued) this.send(q.req, q);
    this.emit("connected", {});
  }

  // lost handles the end of a connection attempt or connection the client did not ask for.
  private lost(code: number, reason: string, terminal: boolean): void {
    if (this._state === "closed") return;
    const gen = ++this.gen;
    const lived = this._state === "connected" ? this.opts.clock.now() - this.connectedAt : 0;
    this.clearConnTimers();
    this.ws = undefined;
    this.failPending();
    for (const sub of this.subs.values()) {
      sub._lost();
      this.clearSubRetry(sub);
    }
    if (terminal) {
      this._state = "closed";
      this.failAll(new WsgateError("closed", `wsgate: connection closed: ${code} ${reason}`.trim()));
      this.emit("disconnected", { code, reason, willReconnect: false });
      return;
    }
    this._state = "disconnected";
    // A connection that stayed up resets the backoff; one that drops soon after
    // opening (a gateway that accepts and closes at once) keeps growing it.
    if (lived >= this.opts.maxReconnectDelay) this.attempt = 0;
    const attempt = this.attempt++;
    const delay = backoffDelay(attempt, this.opts.minReconnectDelay, this.opts.maxReconnectDelay, this.opts.random);
    this.emit("disconnected", { code, reason, willReconnect: true });
    if (gen !== this.gen || this._state !== "disconnected") return; // a listener closed or reconnected
    this.reconnectTimer = this.opts.clock.setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this._state === "disconnected") void this.open(attempt);
    }, delay);
  }

  // drop abandons the current socket (closing it with code, which must be 1000
  // or 3000–4999, the only ones close() accepts) and reconnects.
  private drop(ws: WebSocketLike, code: number, reason: string): void {
    this.detach(ws, code, reason);
    this.lost(code, reason, false);
  }

  private detach(ws: WebSocketLike, code: number, reason: string): void {
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.onerror = () => {};
    try {
      ws.close(code, reason);
    } catch {
      // Not expected (the codes and reasons are the client's own); closing
      // without them still releases the socket whose handlers are gone.
      try {
        ws.close();
      } catch {
        // already closed
      }
    }
  }

  // ---- liveness ----

  private armLiveness(ms: number): void {
    this.livenessTimer = this.opts.clock.setTimeout(() => this.checkLiveness(), ms);
  }

  private checkLiveness(): void {
    this.livenessTimer = undefined;
    const ws = this.ws;
    if (this._state !== "connected" || !ws) return;
    const now = this.opts.clock.now();
    if (this.pingSentAt) {
      if (this.lastReceived >= this.pingSentAt) {
        this.pingSentAt = 0; // answered (or anything else arrived): wait a full interval again
      } else if (now - this.pingSentAt >= this.opts.livenessTimeout) {
        this.drop(ws, CLOSE_LIVENESS, "liveness timeout");
        return;
      } else {
        this.armLiveness(this.pingSentAt + this.opts.livenessTimeout - now);
        return;
      }
    }
    const quiet = now - this.lastReceived;
    if (quiet < this.opts.livenessInterval) {
      this.armLiveness(this.opts.livenessInterval - quiet);
      return;
    }
    // Without an id: no pending entry; any message that arrives proves the connection alive.
    this.pingSentAt = now;
    this.rawSend({ op: "ping" });
    this.armLiveness(this.opts.livenessTimeout);
  }

  // ---- token refresh ----

  private scheduleRefresh(): void {
    if (this.refreshTimer !== undefined) {
      this.opts.clock.clearTimeout(this.refreshTimer);
      this.refreshTimer = undefined;
    }
    if (!this.tokenFn || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const now = this.opts.clock.now();
    // Tokens that live less than twice refreshBefore are refreshed halfway.
    const lead = Math.min(this.opts.refreshBefore, Math.max(0, (exp - now) / 2));
    this.armRefresh(this.gen, exp - lead);
  }

  private armRefresh(gen: number, due: number): void {
    // Timers take at most 2^31−1 ms (about 24.8 days) and fire at once beyond
    // that, so a longer wait is made of several.
    const wait = Math.min(MAX_TIMER_DELAY, Math.max(0, due - this.opts.clock.now()));
    this.refreshTimer = this.opts.clock.setTimeout(() => {
      this.refreshTimer = undefined;
      if (gen !== this.gen) return;
      if (this.opts.clock.now() < due) this.armRefresh(gen, due);
      else void this.refresh(gen);
    }, wait);
  }

  private async refresh(gen: number): Promise<void> {
    const ws = this.ws;
    let token: string;
    try {
      token = await this.tokenFn!();
    } catch (e) {
      if (gen !== this.gen || !this.ws) return;
      this._emitError(e);
      this.drop(this.ws, CLOSE_REFRESH, "token refresh failed");
      return;
    }
    if (gen !== this.gen || this.ws !== ws || !ws) return;
    this.send(
      { op: "refresh", token },
      {
        resolve: () => {
          if (gen !== this.gen) return;
          this.token = token;
          this.scheduleRefresh();
        },
        reject: (err) => {
          if (gen !== this.gen || err.code === "disconnected" || err.code === "closed") return;
          this._emitError(err);
          if (this.ws) this.drop(this.ws, CLOSE_REFRESH, "token refresh failed");
        },
      },
    );
  }

  // ---- requests ----

  private request(req: Record<string, unknown>): Promise<any> {
    if (this._state === "closed") return Promise.reject(new WsgateError("closed", "wsgate: client is closed"));
    return new Promise((resolve, reject) => {
      if (this._state === "connected") {
        this.send(req, { resolve, reject });
        return;
      }
      if (this.queue.length >= this.opts.queueSize) {
        reject(new WsgateError("queue_full", `wsgate: offline queue full (${this.opts.queueSize} requests)`));
        return;
      }
      this.queue.push({ req, resolve, reject });
    });
  }

  private send(req: Record<string, unknown>, p: Pending): number {
    const id = this.nextId++;
    this.pending.set(id, p);
    this.rawSend({ id, ...req });
    return id;
  }

  private rawSend(msg: Record<string, unknown>): void {
    try {
      this.ws!.send(JSON.stringify(msg));
    } catch (e) {
      // The socket is closing; its close event follows and fails what is pending.
      this._emitError(e);
    }
  }

  private sendSubscribe(sub: Subscription<any>): void {
    sub._reqId = this.send(sub._request(), {
      resolve: (reply) => {
        if (sub.state !== "unsubscribed") sub._subscribed(reply);
      },
      reject: (err) => this.subscribeFailed(sub, err),
    });
  }

  private subscribeFailed(sub: Subscription<any>, err: WsgateError): void {
    if (sub.state === "unsubscribed" || err.code === "disconnected" || err.code === "closed") return;
    sub._reqId = 0;
    if (err.code === "forbidden" || err.code === "bad_request") {
      this.subs.delete(sub.channel);
      sub._end(err);
      return;
    }
    if (err.code === "not_found" && sub.position) {
      // The channel no longer keeps history: subscribe from its end (the app sees recovered: false).
      sub._forgetSince();
      sub._error(err);
      if (this._state === "connected") this.sendSubscribe(sub);
      return;
    }
    // unavailable (the broker is down) and anything else: try again with backoff.
    sub._error(err);
    const delay = backoffDelay(sub._attempt++, this.opts.minReconnectDelay, this.opts.maxReconnectDelay, this.opts.random);
    sub._retry = this.opts.clock.setTimeout(() => {
      sub._retry = undefined;
      if (this._state === "connected" && sub.state === "subscribing" && sub._reqId === 0) this.sendSubscribe(sub);
    }, delay);
  }

  private received(raw: unknown): void {
    this.lastReceived = this.opts.clock.now();
    if (typeof raw !== "string") {
      this._emitError(new Error("wsgate: binary message from the gateway ignored"));
      return;
    }
    let m: any;
    try {
      m = JSON.parse(raw);
    } catch {
      this._emitError(new Error("wsgate: message from the gateway is not JSON"));
      return;
    }
    if (m === null || typeof m !== "object") return;
    switch (m.op) {
      case "ok":
      case "error": {
        if (typeof m.id !== "number") return; // the reply to a ping
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.op === "ok") p.resolve(m);
        else p.reject(new WsgateError(String(m.code ?? "error"), String(m.message ?? m.code ?? "error")));
        return;
      }
      case "message":
        this.subs.get(m.channel)?._message(m);
        return;
      case "reset":
        this.subs.get(m.channel)?._reset(m);
        return;
      case "join":
      case "leave":
        this.subs.get(m.channel)?._presence(m.op, m);
        return;
    }
  }

  // ---- cleanup ----

  private failPending(): void {
    const err = new WsgateError("disconnected", "wsgate: connection lost before the reply; the request may or may not have taken effect");
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(err);
  }

  private failAll(err: WsgateError): void {
    this.failPending();
    const queued = this.queue.splice(0);
    for (const q of queued) q.reject(err);
    for (const sub of this.subs.values()) {
      this.clearSubRetry(sub);
      sub._end();
    }
    this.subs.clear();
  }

  private clearSubRetry(sub: Subscription<any>): void {
    if (sub._retry !== undefined) {
      this.opts.clock.clearTimeout(sub._retry);
      sub._retry = undefined;
    }
  }

  private clearConnTimers(): void {
    const c = this.opts.clock;
    if (this.livenessTimer !== undefined) c.clearTimeout(this.livenessTimer);
    if (this.refreshTimer !== undefined) c.clearTimeout(this.refreshTimer);
    if (this.connectTimer !== undefined) c.clearTimeout(this.connectTimer);
    this.livenessTimer = this.refreshTimer = this.connectTimer = undefined;
  }

  private clearTimers(): void {
    this.clearConnTimers();
    if (this.reconnectTimer !== undefined) this.opts.clock.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    for (const sub of this.subs.values()) this.clearSubRetry(sub);
  }

  private emit<K extends keyof ClientEvents>(event: K, ev: ClientEvents[K]): void {
    for (const fn of [...this.listeners[event]]) {
      try {
        fn(ev);
      } catch (e) {
        if (event !== "error") this._emitError(e);
      }
    }
  }
}
