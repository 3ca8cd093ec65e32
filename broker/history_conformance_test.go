package broker_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// historyNames are channel names whose keys and pub/sub channel must
// share a Redis Cluster slot: without a hash tag, with one, and with
// braces that are not one.
var historyNames = []string{"h:plain", tagged("ht", "room"), "we}ird", "a{}b{c}", "{}x"}

func historian(t *testing.T, n *node) broker.Historian {
	t.Helper()
	h, ok := n.b.(broker.Historian)
	if !ok {
		t.Skip("not a Historian")
	}
	return h
}

func presencer(t *testing.T, n *node) broker.Presencer {
	t.Helper()
	p, ok := n.b.(broker.Presencer)
	if !ok {
		t.Skip("not a Presencer")
	}
	return p
}

func publishH(t testing.TB, h broker.Historian, opt broker.HistoryOptions, channel string, data ...string) []broker.Position {
	t.Helper()
	pubs := make([]broker.HistoryPub, len(data))
	for i, d := range data {
		pubs[i] = broker.HistoryPub{Channel: channel, Data: []byte(d), Opt: opt}
	}
	pos, err := h.PublishHistory(ctxT(t), pubs)
	if err != nil {
		t.Fatalf("PublishHistory(%s, %q): %v", channel, data, err)
	}
	if len(pos) != len(data) {
		t.Fatalf("PublishHistory(%s) gave %d positions for %d publications", channel, len(pos), len(data))
	}
	return pos
}

func history(t testing.TB, h broker.Historian, channel string, q broker.HistoryQuery) broker.HistoryResult {
	t.Helper()
	res, err := h.History(ctxT(t), channel, q)
	if err != nil {
		t.Fatalf("History(%s, %+v): %v", channel, q, err)
	}
	return res
}

// storedString writes publications as offset=data, for comparisons.
func storedString(pubs []broker.Stored) string {
	var b strings.Builder
	for i, p := range pubs {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%d=%s", p.Offset, p.Data)
	}
	return b.String()
}

// msgString writes messages as the tests expect them: pub:<offset>=data
// (offset 0 for publications outside history), join=info, leave=info.
func msgString(ms []broker.Message) string {
	var parts []string
	for _, m := range ms {
		switch m.Kind {
		case broker.KindJoin:
			parts = append(parts, "join="+string(m.Data))
		case broker.KindLeave:
			parts = append(parts, "leave="+string(m.Data))
		default:
			parts = append(parts, "pub:"+strconv.FormatUint(m.Pos.Offset, 10)+"="+string(m.Data))
		}
	}
	return strings.Join(parts, " ")
}

func samePresence(got map[string][]byte, want map[string]string) bool {
	if len(got) != len(want) {
		return false
	}
	for id, info := range want {
		if g, ok := got[id]; !ok || string(g) != info {
			return false
		}
	}
	return true
}

func presenceString(m map[string][]byte) string {
	var parts []string
	for _, id := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, id+"="+string(m[id]))
	}
	return strings.Join(parts, " ")
}

func presenceOf(t testing.TB, p broker.Presencer, channel string) map[string][]byte {
	t.Helper()
	m, err := p.Presence(ctxT(t), channel)
	if err != nil {
		t.Fatalf("Presence(%s): %v", channel, err)
	}
	return m
}

func requirePresence(t testing.TB, who string, p broker.Presencer, channel string, want map[string]string) {
	t.Helper()
	got := presenceOf(t, p, channel)
	if !samePresence(got, want) {
		t.Fatalf("%s: Presence(%s) = %s, want %v", who, channel, presenceString(got), want)
	}
	n, err := p.PresenceCount(ctxT(t), channel)
	if err != nil || n != len(want) {
		t.Fatalf("%s: PresenceCount(%s) = %d, %v; want %d", who, channel, n, err, len(want))
	}
}

var histOpt = broker.HistoryOptions{Size: 100, TTL: time.Minute}

// runHistoryConformance is the history and presence behaviour the rooms
// hub relies on, the same for every broker.
func runHistoryConformance(t *testing.T, im impl) {
	t.Run("HistoryOffsets", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		n.subscribe(t, historyNames...)
		n.settle(t, historyNames...)
		epochs := map[string]string{}
		for _, ch := range historyNames {
			var pos []broker.Position
			for i := 1; i <= 3; i++ {
				pos = append(pos, publishH(t, h, histOpt, ch, strconv.Itoa(i))...)
			}
			epochs[ch] = pos[0].Epoch
			for i, p := range pos {
				if p.Epoch != pos[0].Epoch || p.Offset != uint64(i+1) || p.Epoch == "" {
					t.Fatalf("%s: positions %v, want offsets 1, 2, 3 in one epoch", ch, pos)
				}
			}
		}
		// A batch in one call, over several channels, keeps each channel's order.
		var batch []broker.HistoryPub
		for i := 4; i <= 6; i++ {
			for _, ch := range historyNames {
				batch = append(batch, broker.HistoryPub{Channel: ch, Data: []byte(strconv.Itoa(i)), Opt: histOpt})
			}
		}
		pos, err := h.PublishHistory(ctxT(t), batch)
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range pos {
			want := broker.Position{Epoch: epochs[batch[i].Channel], Offset: uint64(4 + i/len(historyNames))}
			if p != want {
				t.Fatalf("batch publication %d on %s at %v, want %v", i, batch[i].Channel, p, want)
			}
		}
		for _, ch := range historyNames {
			n.fence(t, ch)
			got := n.rec.msgs(ch)
			if s := msgString(got); s != "pub:1=1 pub:2=2 pub:3=3 pub:4=4 pub:5=5 pub:6=6" {
				t.Fatalf("%s delivered %s, want offsets 1…6 once each, in order", ch, s)
			}
			for _, m := range got {
				if m.Pos.Epoch != epochs[ch] {
					t.Fatalf("%s delivered epoch %q, published in %q", ch, m.Pos.Epoch, epochs[ch])
				}
			}
			res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: histOpt})
			if res.Top != (broker.Position{Epoch: epochs[ch], Offset: 6}) || storedString(res.Pubs) != "1=1 2=2 3=3 4=4 5=5 6=6" {
				t.Fatalf("%s: History = %v %s", ch, res.Top, storedString(res.Pubs))
			}
		}
	})

	t.Run("HistoryConcurrentPublishers", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:concurrent"
		n.subscribe(t, ch)
		n.settle(t, ch)
		const publishers, each = 4, 60
		var wg sync.WaitGroup
		var mu sync.Mutex
		var given []broker.Position
		errs := make(chan error, publishers)
		for p := 0; p < publishers; p++ {
			wg.Go(func() {
				for i := 0; i < each; {
					// Publishers 0 and 1 publish one by one, 2 and 3 in batches.
					k := 1 + (p/2)*(i%3)
					var pubs []broker.HistoryPub
					for j := 0; j < k && i < each; j++ {
						pubs = append(pubs, broker.HistoryPub{Channel: ch, Data: fmt.Appendf(nil, "[%d,%d]", p, i), Opt: histOpt})
						i++
					}
					pos, err := h.PublishHistory(context.Background(), pubs)
					if err != nil {
						errs <- err
						return
					}
					mu.Lock()
					given = append(given, pos...)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		const total = publishers * each
		slices.SortFunc(given, func(a, b broker.Position) int { return int(a.Offset) - int(b.Offset) })
		for i, p := range given {
			if p.Offset != uint64(i+1) || p.Epoch != given[0].Epoch {
				t.Fatalf("positions given: %v…, want offsets 1…%d in one epoch", given[:i+1], total)
			}
		}
		n.rec.waitN(t, ch, total)
		n.fence(t, ch)
		got := n.rec.msgs(ch)
		if len(got) != total {
			t.Fatalf("%d messages delivered, want %d", len(got), total)
		}
		next := make([]int, publishers)
		for i, m := range got {
			if m.Pos != (broker.Position{Epoch: given[0].Epoch, Offset: uint64(i + 1)}) {
				t.Fatalf("message %d delivered at %v: offsets must grow by one", i, m.Pos)
			}
			var p, k int
			if _, err := fmt.Sscanf(string(m.Data), "[%d,%d]", &p, &k); err != nil || k != next[p] {
				t.Fatalf("message %d is %s, publisher %d's next is %d", i, m.Data, p, next[p])
			}
			next[p]++
		}
	})

	t.Run("HistoryQueries", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:queries"
		opt := broker.HistoryOptions{Size: 3, TTL: time.Minute}
		pos := publishH(t, h, opt, ch, `"a"`, `"b"`, `"c"`, `"d"`, `"e"`)
		top := pos[4]
		for _, tc := range []struct {
			q    broker.HistoryQuery
			want string
		}{
			{broker.HistoryQuery{Limit: 10}, `3="c" 4="d" 5="e"`}, // only the last Size kept
			{broker.HistoryQuery{After: 1, Limit: 10}, `3="c" 4="d" 5="e"`},
			{broker.HistoryQuery{After: 3, Limit: 10}, `4="d" 5="e"`},
			{broker.HistoryQuery{After: 3, Limit: 1}, `4="d"`},
			{broker.HistoryQuery{After: 5, Limit: 10}, ``},
			{broker.HistoryQuery{After: 99, Limit: 10}, ``},
			{broker.HistoryQuery{Latest: true, Limit: 2}, `4="d" 5="e"`},
			{broker.HistoryQuery{Latest: true, Limit: 10}, `3="c" 4="d" 5="e"`},
			{broker.HistoryQuery{Latest: true}, ``},
			{broker.HistoryQuery{}, ``},
		} {
			tc.q.Opt = opt
			res := history(t, h, ch, tc.q)
			if res.Top != top || storedString(res.Pubs) != tc.want {
				t.Errorf("History(%+v) = %v %s, want %v %s", tc.q, res.Top, storedString(res.Pubs), top, tc.want)
			}
		}

		// Size 0 keeps positions and nothing else.
		none := broker.HistoryOptions{TTL: time.Minute}
		pos = publishH(t, h, none, "h:none", "1", "2")
		if res := history(t, h, "h:none", broker.HistoryQuery{Limit: 10, Opt: none}); res.Top != pos[1] || len(res.Pubs) != 0 {
			t.Errorf("History of size 0 = %v %s, want %v and nothing", res.Top, storedString(res.Pubs), pos[1])
		}
	})

	t.Run("HistoryTTL", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:ttl"
		opt := broker.HistoryOptions{Size: 10, TTL: 10 * time.Second}
		publishH(t, h, opt, ch, "1", "2", "3")
		im.advanceHistory(6 * time.Second)
		publishH(t, h, opt, ch, "4", "5")
		im.advanceHistory(3 * time.Second)
		if res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: opt}); storedString(res.Pubs) != "1=1 2=2 3=3 4=4 5=5" {
			t.Fatalf("History within the TTL = %s, want all five", storedString(res.Pubs))
		}
		im.advanceHistory(time.Second + time.Millisecond)
		for _, tc := range []struct {
			q    broker.HistoryQuery
			want string
		}{
			{broker.HistoryQuery{Limit: 10}, "4=4 5=5"},
			{broker.HistoryQuery{Limit: 1}, "4=4"}, // reads on past the expired ones
			{broker.HistoryQuery{After: 1, Limit: 1}, "4=4"},
			{broker.HistoryQuery{Latest: true, Limit: 10}, "4=4 5=5"},
			{broker.HistoryQuery{Latest: true, Limit: 1}, "5=5"},
		} {
			tc.q.Opt = opt
			res := history(t, h, ch, tc.q)
			if res.Top.Offset != 5 || storedString(res.Pubs) != tc.want {
				t.Errorf("History(%+v) past the TTL of 1…3 = %v %s, want offset 5 and %s", tc.q, res.Top, storedString(res.Pubs), tc.want)
			}
		}
	})

	t.Run("HistoryBeforeFirstPublication", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:fresh"
		first := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: histOpt})
		if first.Top.Epoch == "" || first.Top.Offset != 0 || len(first.Pubs) != 0 {
			t.Fatalf("History of a channel never published = %v %s, want a new epoch at offset 0", first.Top, storedString(first.Pubs))
		}
		if again := history(t, h, ch, broker.HistoryQuery{Opt: histOpt}); again.Top != first.Top {
			t.Fatalf("History read twice: %v then %v", first.Top, again.Top)
		}
		if pos := publishH(t, h, histOpt, ch, "1"); pos[0] != (broker.Position{Epoch: first.Top.Epoch, Offset: 1}) {
			t.Fatalf("first publication at %v, want offset 1 in the epoch History made (%s)", pos[0], first.Top.Epoch)
		}
		if res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: histOpt}); res.Top != (broker.Position{Epoch: first.Top.Epoch, Offset: 1}) || storedString(res.Pubs) != "1=1" {
			t.Fatalf("History after it = %v %s", res.Top, storedString(res.Pubs))
		}
	})

	t.Run("EpochChangesWhenHistoryIsLost", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:lost"
		n.subscribe(t, ch)
		n.settle(t, ch)
		old := publishH(t, h, histOpt, ch, "1", "2")[1]
		im.loseHistory(t)
		pos := publishH(t, h, histOpt, ch, "3")[0]
		if pos.Epoch == old.Epoch || pos.Offset != 1 {
			t.Fatalf("after the history was lost: %v (before: %v), want a new epoch at offset 1", pos, old)
		}
		n.fence(t, ch)
		got := n.rec.msgs(ch)
		if len(got) != 3 || got[2].Pos != pos || got[1].Pos != old {
			t.Fatalf("delivered %s, the last at %v, want 1, 2 at %v then 1 at %v", msgString(got), got[len(got)-1].Pos, old.Epoch, pos)
		}
		if res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: histOpt}); res.Top != pos || storedString(res.Pubs) != "1=3" {
			t.Fatalf("History = %v %s, want only the new epoch's", res.Top, storedString(res.Pubs))
		}
	})

	t.Run("EpochEndsWithMetaTTL", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h := historian(t, n)
		ch := "h:meta"
		short := broker.HistoryOptions{Size: 10, TTL: 100 * time.Millisecond, MetaTTL: 300 * time.Millisecond}
		old := publishH(t, h, short, ch, "1")[0]
		if res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: short}); res.Top != old {
			t.Fatalf("History just after = %v", res.Top)
		}
		im.advanceHistory(short.MetaTTL + time.Millisecond)
		// History makes the next epoch, which lasts as its query says.
		long := broker.HistoryQuery{Limit: 10, Opt: broker.HistoryOptions{Size: 10, TTL: time.Minute, MetaTTL: time.Hour}}
		var res broker.HistoryResult
		eventually(t, waitLong, "the epoch to expire", func() bool {
			res = history(t, h, ch, long)
			return res.Top.Epoch != old.Epoch
		})
		if res.Top.Offset != 0 || len(res.Pubs) != 0 {
			t.Fatalf("History of an expired epoch = %v %s, want a new one at offset 0", res.Top, storedString(res.Pubs))
		}
		if pos := publishH(t, h, long.Opt, ch, "2")[0]; pos != (broker.Position{Epoch: res.Top.Epoch, Offset: 1}) {
			t.Fatalf("publication after = %v, want offset 1 in %s", pos, res.Top.Epoch)
		}
	})

	t.Run("PlainPublishBypassesHistory", func(t *testing.T) {
		prefix := newPrefix()
		n := im.node(t, prefix)
		h := historian(t, n)
		ch := "h:plain-too"
		n.subscribe(t, ch)
		n.settle(t, ch)
		first := publishH(t, h, histOpt, ch, `"h1"`)[0]
		n.publish(t, ch, []byte(`"plain"`))
		want := `pub:1="h1" pub:0="plain"`
		if im.publishRaw != nil {
			if got := im.publishRaw(t, prefix+ch, []byte(`"raw"`)); got != 1 {
				t.Fatalf("raw publish: %d receivers", got)
			}
			want += ` pub:0="raw"`
		}
		second := publishH(t, h, histOpt, ch, `"h2"`)[0]
		want += ` pub:2="h2"`
		if second != (broker.Position{Epoch: first.Epoch, Offset: 2}) {
			t.Fatalf("history publication after plain ones at %v, want offset 2 in %s", second, first.Epoch)
		}
		n.fence(t, ch)
		if got := msgString(n.rec.msgs(ch)); got != want {
			t.Fatalf("delivered %s, want %s", got, want)
		}
		for _, m := range n.rec.msgs(ch) {
			if m.Pos.Offset == 0 && m.Pos.Epoch != "" {
				t.Fatalf("plain publication with epoch %q", m.Pos.Epoch)
			}
		}
		if res := history(t, h, ch, broker.HistoryQuery{Limit: 10, Opt: histOpt}); storedString(res.Pubs) != `1="h1" 2="h2"` {
			t.Fatalf("History = %s, want the history publications only", storedString(res.Pubs))
		}
	})

	t.Run("HistoryAfterScriptCacheLoss", func(t *testing.T) {
		if im.servers == nil {
			t.Skip("no script cache")
		}
		n := im.node(t, newPrefix())
		h := historian(t, n)
		p := presencer(t, n)
		chans := []string{"h:flush:a", "h:flush:b", tagged("fl", "c")}
		n.subscribe(t, chans...)
		n.settle(t, chans...)
		flush := func() {
			for _, a := range im.servers() {
				if v := dialRESP(t, a).do(t, "SCRIPT", "FLUSH"); v != "OK" {
					t.Fatalf("SCRIPT FLUSH on %s: %v", a, v)
				}
			}
		}
		flush()
		publishH(t, h, histOpt, chans[0], "1")
		flush()
		var batch []broker.HistoryPub
		for i := 0; i < 3; i++ {
			for _, ch := range chans {
				batch = append(batch, broker.HistoryPub{Channel: ch, Data: []byte(strconv.Itoa(i + 2)), Opt: histOpt})
			}
		}
		if _, err := h.PublishHistory(ctxT(t), batch); err != nil {
			t.Fatalf("batch after SCRIPT FLUSH: %v", err)
		}
		flush()
		if res := history(t, h, chans[0], broker.HistoryQuery{Limit: 10, Opt: histOpt}); storedString(res.Pubs) != "1=1 2=2 3=3 4=4" {
			t.Fatalf("History after SCRIPT FLUSH = %s", storedString(res.Pubs))
		}
		flush()
		if err := p.Join(ctxT(t), chans[0], "c1", []byte(`{}`), broker.PresenceOptions{TTL: time.Minute}); err != nil {
			t.Fatalf("Join after SCRIPT FLUSH: %v", err)
		}
		flush()
		requirePresence(t, "after SCRIPT FLUSH", p, chans[0], map[string]string{"c1": `{}`})
		for i, ch := range chans {
			n.fence(t, ch)
			want := "pub:1=2 pub:2=3 pub:3=4"
			if i == 0 {
				want = "pub:1=1 pub:2=2 pub:3=3 pub:4=4"
			}
			if got := msgString(n.rec.msgs(ch)); got != want {
				t.Errorf("%s delivered %s, want %s (each publication once)", ch, got, want)
			}
		}
	})

	t.Run("BackendPublishesWithTheScript", func(t *testing.T) {
		if im.servers == nil {
			t.Skip("no backend an application could publish to")
		}
		src, err := os.ReadFile("publish.lua")
		if err != nil {
			t.Fatal(err)
		}
		prefix := newPrefix()
		n := im.node(t, prefix)
		h := historian(t, n)
		for _, ch := range historyNames {
			n.subscribe(t, ch)
			n.settle(t, ch)
			name := prefix + ch
			s, m := broker.ChannelKey(name, ":s"), broker.ChannelKey(name, ":m")
			if broker.Slot(s) != broker.Slot(name) || broker.Slot(m) != broker.Slot(name) {
				t.Fatalf("keys %s, %s not in the slot of %s", s, m, name)
			}
			spub := "0"
			if im.shardedPubSub {
				spub = "1"
			}
			// As a backend would, with a client of its own, on the
			// server that holds the keys.
			conn := dialRESP(t, im.owner(s))
			v := conn.do(t, "EVAL", string(src), "2", s, m, name, `{"from":"backend"}`, "100", "60000", "2592000000",
				"backendepoch", strconv.FormatInt(time.Now().UnixMilli(), 10), spub)
			reply, ok := v.([]any)
			if !ok || len(reply) != 2 || reply[0] != "backendepoch" || reply[1] != int64(1) {
				t.Fatalf("%s: EVAL publish.lua = %v, want [backendepoch 1]", ch, v)
			}
			pos := publishH(t, h, histOpt, ch, `{"from":"wsgate"}`)[0]
			if pos != (broker.Position{Epoch: "backendepoch", Offset: 2}) {
				t.Fatalf("%s: the broker's publication after the backend's at %v", ch, pos)
			}
			n.fence(t, ch)
			if got, want := msgString(n.rec.msgs(ch)), `pub:1={"from":"backend"} pub:2={"from":"wsgate"}`; got != want {
				t.Fatalf("%s delivered %s, want %s", ch, got, want)
			}
			if d := im.pttl(t, s); d <= 0 || d > time.Minute {
				t.Fatalf("%s: PTTL of the stream %s is %v, want up to a minute", ch, s, d)
			}
		}
	})

	t.Run("HistoryAndPresenceAfterClose", func(t *testing.T) {
		n := im.node(t, newPrefix())
		h, p := historian(t, n), presencer(t, n)
		if err := n.b.Close(); err != nil {
			t.Fatal(err)
		}
		_, perr := h.PublishHistory(ctxT(t), []broker.HistoryPub{{Channel: "c", Data: []byte(`1`), Opt: histOpt}})
		_, herr := h.History(ctxT(t), "c", broker.HistoryQuery{Opt: histOpt})
		jerr := p.Join(ctxT(t), "c", "id", []byte(`{}`), broker.PresenceOptions{TTL: time.Minute})
		_, lerr := p.Presence(ctxT(t), "c")
		_, cerr := p.PresenceCount(ctxT(t), "c")
		for name, err := range map[string]error{"PublishHistory": perr, "History": herr, "Join": jerr, "Presence": lerr, "PresenceCount": cerr} {
			if !errors.Is(err, broker.ErrClosed) {
				t.Errorf("%s after Close = %v, want ErrClosed", name, err)
			}
		}
	})

	t.Run("PresenceAcrossNodes", func(t *testing.T) {
		prefix := newPrefix()
		a := im.node(t, prefix)
		b := a
		if im.shared {
			b = im.node(t, prefix)
		}
		pa, pb := presencer(t, a), presencer(t, b)
		ha := historian(t, a)
		ch := "p:room"
		for _, n := range []*node{a, b} {
			n.subscribe(t, ch)
			n.settle(t, ch)
		}
		opt := broker.PresenceOptions{TTL: time.Minute, Events: true}
		requirePresence(t, "before any Join", pa, ch, nil)
		join := func(p broker.Presencer, id, info string) {
			t.Helper()
			if err := p.Join(ctxT(t), ch, id, []byte(info), opt); err != nil {
				t.Fatalf("Join(%s): %v", id, err)
			}
		}
		leave := func(p broker.Presencer, id string) {
			t.Helper()
			if err := p.Leave(ctxT(t), ch, id, opt); err != nil {
				t.Fatalf("Leave(%s): %v", id, err)
			}
		}
		join(pa, "c1", `{"u":1}`)
		publishH(t, ha, histOpt, ch, `"hello"`)
		join(pb, "c2", `{"u":2}`)
		both := map[string]string{"c1": `{"u":1}`, "c2": `{"u":2}`}
		requirePresence(t, "node A", pa, ch, both)
		requirePresence(t, "node B", pb, ch, both)
		join(pa, "c1", `{"u":1,"again":true}`) // replaces the info
		requirePresence(t, "node B after a second Join", pb, ch, map[string]string{"c1": `{"u":1,"again":true}`, "c2": `{"u":2}`})
		leave(pb, "c2")
		requirePresence(t, "node A after B's Leave", pa, ch, map[string]string{"c1": `{"u":1,"again":true}`})
		leave(pa, "c1")
		leave(pa, "c1")
		leave(pb, "never-joined")
		if err := pa.Leave(ctxT(t), "p:never", "x", opt); err != nil {
			t.Fatalf("Leave of a channel never joined: %v", err)
		}
		requirePresence(t, "after the Leaves", pb, ch, nil)
		publishH(t, ha, histOpt, ch, `"bye"`)
		want := `join={"u":1} pub:1="hello" join={"u":2} join={"u":1,"again":true} leave={"u":2} leave={"u":1,"again":true} pub:2="bye"`
		for name, n := range map[string]*node{"A": a, "B": b} {
			n.rec.waitN(t, ch, 7)
			n.fence(t, ch)
			if got := msgString(n.rec.msgs(ch)); got != want {
				t.Errorf("node %s got %s, want %s", name, got, want)
			}
		}
	})

	t.Run("PresenceWithoutEvents", func(t *testing.T) {
		n := im.node(t, newPrefix())
		p, h := presencer(t, n), historian(t, n)
		ch := "p:quiet"
		n.subscribe(t, ch)
		n.settle(t, ch)
		opt := broker.PresenceOptions{TTL: time.Minute}
		if err := p.Join(ctxT(t), ch, "c1", []byte(`{"u":1}`), opt); err != nil {
			t.Fatal(err)
		}
		requirePresence(t, "after Join", p, ch, map[string]string{"c1": `{"u":1}`})
		if err := p.Leave(ctxT(t), ch, "c1", opt); err != nil {
			t.Fatal(err)
		}
		requirePresence(t, "after Leave", p, ch, nil)
		publishH(t, h, histOpt, ch, `"only"`)
		n.rec.waitN(t, ch, 1)
		n.fence(t, ch)
		if got := msgString(n.rec.msgs(ch)); got != `pub:1="only"` {
			t.Fatalf("delivered %s; joins and leaves without Events must not be", got)
		}
	})

	t.Run("PresenceOfDeadNodeExpires", func(t *testing.T) {
		if !im.shared || im.crash == nil {
			t.Skip("a node's entries die with it")
		}
		prefix := newPrefix()
		alive, dead := im.node(t, prefix), im.node(t, prefix)
		pa, pd := presencer(t, alive), presencer(t, dead)
		ch := "p:dead"
		const ttl = 2 * time.Second
		opt := broker.PresenceOptions{TTL: ttl}
		if err := pa.Join(ctxT(t), ch, "alive", []byte(`{"n":"alive"}`), opt); err != nil {
			t.Fatal(err)
		}
		joined := time.Now()
		if err := pd.Join(ctxT(t), ch, "dead", []byte(`{"n":"dead"}`), opt); err != nil {
			t.Fatal(err)
		}
		crashed := time.Now()
		if err := im.crash(dead.b); err != nil {
			t.Fatal(err)
		}
		requirePresence(t, "just after the crash", pa, ch, map[string]string{"alive": `{"n":"alive"}`, "dead": `{"n":"dead"}`})
		var gone time.Duration
		// The live node's entry stays beyond its TTL; the dead node's goes
		// within it.
		for time.Since(joined) < 2*ttl || gone == 0 {
			got := presenceOf(t, pa, ch)
			if _, ok := got["alive"]; !ok {
				t.Fatalf("the live node's entry is gone %v after its Join: %s", time.Since(joined).Round(time.Millisecond), presenceString(got))
			}
			if _, ok := got["dead"]; !ok && gone == 0 {
				gone = time.Since(crashed)
				t.Logf("the dead node's entry went %v after the crash (TTL %v)", gone.Round(time.Millisecond), ttl)
			}
			if time.Since(crashed) > ttl+time.Second && gone == 0 {
				t.Fatalf("the dead node's entry is still there %v after the crash (TTL %v)", time.Since(crashed).Round(time.Millisecond), ttl)
			}
			pollPause()
		}
		if gone < ttl-ttl/3-200*time.Millisecond {
			t.Fatalf("the dead node's entry went %v after the crash, before its TTL %v could have passed", gone, ttl)
		}
	})

	t.Run("CloseLeaves", func(t *testing.T) {
		if !im.shared {
			t.Skip("a node's entries die with it")
		}
		prefix := newPrefix()
		watcher, closing := im.node(t, prefix), im.node(t, prefix)
		pw, pc := presencer(t, watcher), presencer(t, closing)
		ch := "p:close"
		watcher.subscribe(t, ch)
		watcher.settle(t, ch)
		opt := broker.PresenceOptions{TTL: time.Minute, Events: true}
		for _, id := range []string{"x", "y"} {
			if err := pc.Join(ctxT(t), ch, id, []byte(`{"id":"`+id+`"}`), opt); err != nil {
				t.Fatal(err)
			}
		}
		if err := pw.Join(ctxT(t), ch, "w", []byte(`{"id":"w"}`), opt); err != nil {
			t.Fatal(err)
		}
		if err := closing.b.Close(); err != nil {
			t.Fatal(err)
		}
		requirePresence(t, "after the other node closed", pw, ch, map[string]string{"w": `{"id":"w"}`})
		watcher.rec.waitN(t, ch, 5)
		watcher.fence(t, ch)
		got := msgString(watcher.rec.msgs(ch))
		if !strings.HasPrefix(got, `join={"id":"x"} join={"id":"y"} join={"id":"w"} `) ||
			!strings.Contains(got, `leave={"id":"x"}`) || !strings.Contains(got, `leave={"id":"y"}`) || strings.Count(got, "leave=") != 2 {
			t.Fatalf("got %s, want the three joins, then a leave for each entry of the closed node", got)
		}
	})

	t.Run("PresenceComesBackAfterLoss", func(t *testing.T) {
		if !im.shared {
			t.Skip("a node's entries die with it")
		}
		n := im.node(t, newPrefix())
		p := presencer(t, n)
		ch := "p:lost"
		const ttl = 1500 * time.Millisecond
		if err := p.Join(ctxT(t), ch, "c", []byte(`{"c":1}`), broker.PresenceOptions{TTL: ttl}); err != nil {
			t.Fatal(err)
		}
		im.loseHistory(t)
		lost := time.Now()
		if got := presenceOf(t, p, ch); len(got) != 0 {
			t.Fatalf("Presence after the data was lost = %s", presenceString(got))
		}
		eventually(t, waitLong, "the entry to come back", func() bool {
			return samePresence(presenceOf(t, p, ch), map[string]string{"c": `{"c":1}`})
		})
		back := time.Since(lost)
		t.Logf("the entry came back %v after the loss (TTL %v)", back.Round(time.Millisecond), ttl)
		if back > ttl {
			t.Fatalf("the entry came back %v after the loss; the refresher runs every TTL/3 = %v", back, ttl/3)
		}
	})
}
