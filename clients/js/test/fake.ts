// A scripted stand-in for the gateway and the time the client sees, so that
// the tests are deterministic and never wait on real time.

import { Client, type ClientOptions, type Clock, type TimerHandle, type WebSocketLike } from "wsgate";

/** Lets pending promise callbacks and queued deliveries run. */
export function flush(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class FakeClock implements Clock {
  t = 1_700_000_000_000;
  private seq = 0;
  private readonly timers = new Map<number, { at: number; fn: () => void }>();

  now(): number {
    return this.t;
  }
  /** Delays asked for beyond what real timers take (2^31−1 ms). */
  overlong: number[] = [];
  setTimeout(fn: () => void, ms: number): TimerHandle {
    const id = ++this.seq;
    // As in browsers and Node: a delay beyond 2^31−1 ms fires after 1 ms.
    if (ms > 2 ** 31 - 1) {
      this.overlong.push(ms);
      ms = 1;
    }
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }
  clearTimeout(handle: TimerHandle): void {
    this.timers.delete(handle as number);
  }
  /** How many timers are armed. */
  get armed(): number {
    return this.timers.size;
  }
  /** The delays of the armed timers from now, soonest first. */
  delays(): number[] {
    return [...this.timers.values()].map((t) => t.at - this.t).sort((a, b) => a - b);
  }
  /** Moves time forward by ms, firing due timers in order, letting promises settle after each. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const e of this.timers) {
        if (e[1].at <= end && (!next || e[1].at < next[1].at)) next = e;
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

/** A deterministic PRNG (mulberry32) for the backoff jitter. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Handshake = "accept" | "hold" | { code: number; reason?: string };

interface Channel {
  epoch: string;
  log: { offset: number; data: unknown }[];
  subscribers: Set<FakeSocket>;
}

/** One client socket as the fake gateway sees it. Deliveries are asynchronous, as on a real socket. */
export class FakeSocket implements WebSocketLike {
  readyState = 0;
  protocol = "";
  onopen: ((ev: any) => any) | null = null;
  onmessage: ((ev: { data: any }) => any) | null = null;
  onclose: ((ev: { code: number; reason: string }) => any) | null = null;
  onerror: ((ev: any) => any) | null = null;
  /** Requests received, parsed. */
  readonly sent: any[] = [];
  /** The close the client asked for, if any. */
  closedByClient: { code?: number; reason?: string } | undefined;

  constructor(
    readonly gateway: FakeGateway,
    readonly url: string,
    readonly protocols: string[],
  ) {}

  get token(): string | undefined {
    return this.protocols[1] === "bearer" ? this.protocols[2] : undefined;
  }

  accept(): void {
    this.readyState = 1;
    this.protocol = "wsgate.v1";
    this.onopen?.({});
  }

  /** Sends a server message (after the messages already on their way). */
  push(msg: unknown): void {
    const data = typeof msg === "string" ? msg : JSON.stringify(msg);
    queueMicrotask(() => {
      if (this.readyState === 1) this.onmessage?.({ data });
    });
  }

  /** The gateway closes the connection (or refuses the handshake, when not accepted yet). */
  serverClose(code: number, reason = ""): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.gateway.forget(this);
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** The connection fails as browsers report it: an error event, then a 1006 close. */
  fail(): void {
    queueMicrotask(() => this.onerror?.({}));
    this.serverClose(1006);
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("not open");
    const req = JSON.parse(data);
    this.sent.push(req);
    this.gateway.handle(this, req);
  }

  close(code?: number, reason?: string): void {
    // As browsers and Node's WebSocket do: the other codes are the endpoints' to send, not the API's.
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(`close code ${code} is not 1000 or in 3000-4999`, "InvalidAccessError");
    }
    if (this.readyState === 3) return;
    this.closedByClient = { code, reason };
    this.readyState = 3;
    this.gateway.forget(this);
    queueMicrotask(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "" }));
  }

  /** The requests of one op, in the order sent. */
  ops(op: string): any[] {
    return this.sent.filter((r) => r.op === op);
  }
}

/**
 * Answers like wsgate's rooms handler: subscribe (with history and since), unsubscribe,
 * publish, presence, presence_count, history, ping, refresh. `override` may answer a request
 * itself (return true) to script errors.
 */
export class FakeGateway {
  readonly sockets: FakeSocket[] = [];
  readonly channels = new Map<string, Channel>();
  readonly plain = new Map<string, Set<FakeSocket>>();
  handshake: (s: FakeSocket) => Handshake = () => "accept";
  override: ((s: FakeSocket, req: any) => boolean) | undefined;
  recoverMax = 100;

  readonly WebSocket: new (url: string, protocols?: string | string[]) => FakeSocket;

  constructor() {
    const gw = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url: string, protocols?: string | string[]) {
        super(gw, url, typeof protocols === "string" ? [protocols] : (protocols ?? []));
        gw.sockets.push(this);
        const h = gw.handshake(this);
        if (h === "accept") queueMicrotask(() => this.accept());
        else if (h !== "hold") this.serverClose(h.code, h.reason);
      }
    };
  }

  /** The newest socket. */
  get last(): FakeSocket {
    const s = this.sockets[this.sockets.length - 1];
    if (!s) throw new Error("no socket yet");
    return s;
  }

  /** Makes a channel keep history. */
  withHistory(channel: string, epoch = "e1"): Channel {
    const ch: Channel = { epoch, log: [], subscribers: new Set() };
    this.channels.set(channel, ch);
    return ch;
  }

  /** Publishes as a backend would: appended to history, sent to the subscribers. */
  publish(channel: string, data: unknown): void {
    const ch = this.channels.get(channel);
    if (ch) {
      const offset = (ch.log.at(-1)?.offset ?? 0) + 1;
      ch.log.push({ offset, data });
      for (const s of ch.subscribers) s.push({ op: "message", channel, data, offset });
      return;
    }
    for (const s of this.plain.get(channel) ?? []) s.push({ op: "message", channel, data });
  }

  /** The history is lost: a new epoch that starts empty. */
  newEpoch(channel: string, epoch: string): void {
    const ch = this.channels.get(channel)!;
    ch.epoch = epoch;
    ch.log = [];
  }

  forget(s: FakeSocket): void {
    for (const ch of this.channels.values()) ch.subscribers.delete(s);
    for (const set of this.plain.values()) set.delete(s);
  }

  handle(s: FakeSocket, req: any): void {
    if (this.override?.(s, req)) return;
    const ok = (extra: object = {}) => s.push({ ...(req.id !== undefined && { id: req.id }), op: "ok", ...extra });
    const ch = this.channels.get(req.channel);
    switch (req.op) {
      case "subscribe": {
        if (!ch) {
          if (req.since) return s.push({ id: req.id, op: "error", code: "not_found", message: "no history" });
          if (!this.plain.has(req.channel)) this.plain.set(req.channel, new Set());
          this.plain.get(req.channel)!.add(s);
          return ok();
        }
        ch.subscribers.add(s);
        const last = ch.log.at(-1)?.offset ?? 0;
        if (!req.since) return ok({ epoch: ch.epoch, offset: last });
        const { epoch, offset } = req.since;
        const recovered = epoch === ch.epoch && offset <= last && last - offset <= this.recoverMax;
        ok({ epoch: ch.epoch, offset: last, recovered });
        if (recovered) {
          for (const p of ch.log) if (p.offset > offset) s.push({ op: "message", channel: req.channel, data: p.data, offset: p.offset });
        }
        return;
      }
      case "unsubscribe":
        ch?.subscribers.delete(s);
        this.plain.get(req.channel)?.delete(s);
        return ok();
      case "publish":
        this.publish(req.channel, req.data);
        return ok();
      case "presence":
        return ok({ presence: [...(ch?.subscribers ?? this.plain.get(req.channel) ?? [])].map((_, i) => ({ conn: `c${i}` })) });
      case "presence_count":
        return ok({ count: (ch?.subscribers ?? this.plain.get(req.channel) ?? new Set()).size });
      case "history": {
        if (!ch) return s.push({ id: req.id, op: "error", code: "not_found", message: "no history" });
        const pubs = ch.log.slice(-(req.limit ?? this.recoverMax));
        return ok({ epoch: ch.epoch, offset: ch.log.at(-1)?.offset ?? 0, publications: pubs });
      }
      case "ping":
      case "refresh":
        return ok();
      default:
        return s.push({ id: req.id, op: "error", code: "not_found", message: "unknown op" });
    }
  }
}

/** A JWT-shaped token (unsigned; the client never verifies) with the given exp in seconds. */
export function jwt(exp: number, sub = "u-7"): string {
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp })}.sig`;
}

export interface Harness {
  gw: FakeGateway;
  clock: FakeClock;
  client: Client;
  events: { type: string; ev: any }[];
}

/** A client on a fake gateway and a fake clock, recording its events. */
export function harness(options: ClientOptions | ((clock: FakeClock) => ClientOptions) = {}): Harness {
  const gw = new FakeGateway();
  const clock = new FakeClock();
  if (typeof options === "function") options = options(clock);
  const client = new Client("ws://gw.test/ws", { WebSocket: gw.WebSocket, clock, random: seeded(1), ...options });
  const events: { type: string; ev: any }[] = [];
  for (const type of ["connecting", "connected", "disconnected", "error"] as const) {
    client.on(type, (ev: any) => events.push({ type, ev }));
  }
  return { gw, clock, client, events };
}
