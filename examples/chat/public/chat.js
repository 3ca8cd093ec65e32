// The example chat: rooms, presence and history on the wsgate.v1 client.
//
// Query parameters (all optional): name and room log in at once; ttl is the
// token lifetime in seconds (default 300, so that refreshes happen while you
// watch); minReconnectDelay, maxReconnectDelay, livenessInterval,
// livenessTimeout and refreshBefore (ms) go to the client as they are.

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// What happened, for a look in the developer tools (and for the integration
// tests, which read it).
const state = (window.chatState = {
	events: [], // connection events: {type, at, code, reason, willReconnect}
	subscribed: [], // {channel, first, recovered, epoch, offset, at}
	resets: [], // {channel, epoch, offset, at}
	delivered: [], // what the subscription delivered: {channel, offset, data}
	tokens: [], // {iat, exp} of each token minted
	reloads: 0, // history reloads after a lost history
	errors: [],
});

let lib;
try {
	lib = await import("/lib/wsgate.js");
} catch (e) {
	fail("The client library is missing: run `npm ci && npm run build` in clients/js, then reload.", e);
	throw e;
}
// DEVELOPMENT ONLY: the gateway's signing secret, served by the Caddyfile.
const { devSecret } = await import("/dev-config.js");
if (!devSecret) fail("CHAT_DEV_SECRET is not set in the gateway's environment.");

function fail(text, err) {
	state.errors.push(String(err ?? text));
	const n = $("notice");
	n.textContent = text;
	n.hidden = false;
	$("chat").hidden = false;
	$("login").hidden = true;
}

// ---- development tokens (HS256, signed here with WebCrypto) ----

const enc = new TextEncoder();
const b64url = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const ttl = Number(params.get("ttl") ?? 300);
let hmacKey;

async function mintToken(name) {
	hmacKey ??= await crypto.subtle.importKey("raw", enc.encode(devSecret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
	const iat = Math.floor(Date.now() / 1000);
	const exp = iat + ttl;
	const part = (obj) => b64url(enc.encode(JSON.stringify(obj)));
	const unsigned = part({ alg: "HS256", typ: "JWT" }) + "." + part({ sub: name, name, iat, exp });
	const sig = new Uint8Array(await crypto.subtle.sign("HMAC", hmacKey, enc.encode(unsigned)));
	state.tokens.push({ iat, exp });
	return unsigned + "." + b64url(sig);
}

// ---- the room on screen ----

const roomName = /^[A-Za-z0-9_-]{1,40}$/;
const knownRooms = ["lobby", "random", "ops"];
let me = "";
let client;
let sub;
let channel = "";
// Messages on screen by offset: history loads and live messages overlap, and
// the offset says which is which.
let shown = new Map();
let members = new Map(); // conn → {subject, claims}

function clearRoom() {
	shown = new Map();
	$("messages").replaceChildren();
}

function show(data, offset) {
	if (offset !== undefined) {
		if (shown.has(offset)) return;
		shown.set(offset, true);
	}
	const li = document.createElement("li");
	li.className = "msg";
	if (offset !== undefined) li.dataset.offset = offset;
	if (data && typeof data === "object" && typeof data.text === "string") {
		const who = document.createElement("span");
		who.className = "who";
		who.textContent = String(data.name ?? "?");
		const text = document.createElement("span");
		text.textContent = data.text;
		li.append(who, text);
		if (typeof data.at === "number") {
			const t = document.createElement("time");
			t.textContent = new Date(data.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
			li.append(t);
		}
		if (data.name === me) li.classList.add("mine");
	} else {
		// Published by a backend (POST /publish) in a shape of its own.
		const raw = document.createElement("span");
		raw.className = "raw";
		raw.textContent = JSON.stringify(data);
		li.append(raw);
	}
	const list = $("messages");
	const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
	// Live messages come last; a history load may bring older ones.
	let before = null;
	if (offset !== undefined) {
		for (let el = list.lastElementChild; el && Number(el.dataset.offset) > offset; el = el.previousElementSibling) before = el;
	}
	list.insertBefore(li, before);
	if (stick) list.scrollTop = list.scrollHeight;
}

function notice(text) {
	const n = $("notice");
	n.textContent = text;
	n.hidden = !text;
}

async function loadHistory(ch) {
	try {
		const h = await client.history(ch, 100);
		if (ch !== channel) return;
		for (const p of h.publications) show(p.data, p.offset);
	} catch (e) {
		if (ch === channel) notice(`Could not load the history: ${e.message}`);
	}
}

// The history we were following is gone (the gateway answered recovered:
// false, or sent a reset): what is on screen may have holes, so start over
// from what the channel still has.
function reload(ch, why) {
	state.reloads++;
	notice(`${why} Reloaded the room from its history.`);
	clearRoom();
	void loadHistory(ch);
}

async function loadPresence(ch) {
	try {
		const list = await client.presence(ch);
		if (ch !== channel) return;
		members = new Map(list.map((p) => [p.conn, p]));
		renderPresence();
	} catch (e) {
		state.errors.push(`presence: ${e.message}`);
	}
}

function renderPresence() {
	const names = new Map(); // one line per name, however many tabs
	for (const p of members.values()) {
		const name = String(p.claims?.name ?? p.subject ?? "anonymous");
		names.set(name, (names.get(name) ?? 0) + 1);
	}
	const ul = $("presence");
	ul.replaceChildren(
		...[...names.keys()].sort().map((name) => {
			const li = document.createElement("li");
			li.textContent = name;
			if (name === me) {
				const you = document.createElement("span");
				you.className = "you";
				you.textContent = "(you)";
				li.append(you);
			}
			return li;
		}),
	);
}

function renderRooms(current) {
	const rooms = knownRooms.includes(current) ? knownRooms : [...knownRooms, current];
	$("rooms").replaceChildren(
		...rooms.map((r) => {
			const li = document.createElement("li");
			const a = document.createElement("a");
			a.href = "#" + r;
			a.textContent = "# " + r;
			if (r === current) a.className = "current";
			a.onclick = (e) => {
				e.preventDefault();
				void joinRoom(r);
			};
			li.append(a);
			return li;
		}),
	);
}

async function joinRoom(room) {
	if (!roomName.test(room)) {
		notice("A room name is 1 to 40 letters, digits, - or _.");
		return;
	}
	const ch = "chat:" + room;
	if (ch === channel) return;
	if (sub) void sub.unsubscribe().catch(() => {});
	channel = ch;
	history.replaceState(null, "", "#" + room);
	$("room-title").textContent = "# " + room;
	renderRooms(room);
	notice("");
	clearRoom();
	members = new Map();
	renderPresence();
	sub = client.subscribe(ch, {
		message(data, { offset }) {
			state.delivered.push({ channel: ch, offset, data });
			show(data, offset);
		},
		subscribed(ctx) {
			state.subscribed.push({ channel: ch, ...ctx, at: Date.now() });
			if (ctx.first) void loadHistory(ch);
			else if (!ctx.recovered) reload(ch, "Messages were lost while you were away.");
			else notice("");
			void loadPresence(ch); // joins and leaves while we were away were missed
		},
		reset(pos) {
			state.resets.push({ channel: ch, ...pos, at: Date.now() });
			reload(ch, "The room's history was interrupted.");
		},
		join(info) {
			members.set(info.conn, info);
			renderPresence();
		},
		leave(info) {
			members.delete(info.conn);
			renderPresence();
		},
		error(err) {
			state.errors.push(`${ch}: ${err.code} ${err.message}`);
			notice(`${ch}: ${err.message}`);
		},
	});
}

function setStatus(s, text) {
	const el = $("status");
	el.dataset.state = s;
	el.textContent = text;
}

function start(name, room) {
	me = name;
	$("me").textContent = "signed in as " + name;
	$("login").hidden = true;
	$("chat").hidden = false;
	const num = (k) => (params.has(k) ? Number(params.get(k)) : undefined);
	client = new lib.Client(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`, {
		token: () => mintToken(name),
		minReconnectDelay: num("minReconnectDelay"),
		maxReconnectDelay: num("maxReconnectDelay"),
		livenessInterval: num("livenessInterval"),
		livenessTimeout: num("livenessTimeout"),
		refreshBefore: num("refreshBefore"),
	});
	client.on("connecting", () => {
		state.events.push({ type: "connecting", at: Date.now() });
		setStatus("connecting", "connecting…");
	});
	client.on("connected", () => {
		state.events.push({ type: "connected", at: Date.now() });
		setStatus("connected", "connected");
	});
	client.on("disconnected", (e) => {
		state.events.push({ type: "disconnected", at: Date.now(), ...e });
		setStatus(e.willReconnect ? "disconnected" : "closed", e.willReconnect ? "reconnecting…" : `closed (${e.code} ${e.reason})`);
	});
	client.on("error", (e) => state.errors.push(String(e?.message ?? e)));
	client.connect();
	void joinRoom(room);
}

$("login").onsubmit = (e) => {
	e.preventDefault();
	const name = $("login-name").value.trim();
	const room = $("login-room").value.trim();
	if (name) start(name, room); // the form's pattern checked the room
};
$("room-form").onsubmit = (e) => {
	e.preventDefault();
	void joinRoom($("room-input").value.trim());
	$("room-input").value = "";
};
$("composer").onsubmit = (e) => {
	e.preventDefault();
	const input = $("text");
	const text = input.value.trim();
	if (!text) return;
	input.value = "";
	client.publish(channel, { name: me, text, at: Date.now() }).catch((err) => notice(`Not sent: ${err.message}`));
};

const room = params.get("room") ?? (location.hash.slice(1) || "lobby");
$("login-room").value = room;
if (params.get("name")) start(params.get("name"), room);
