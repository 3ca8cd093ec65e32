package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/procfs"
)

// Scenario k measures the inputs of the capacity model on one rooms
// gateway (memory and kernel socket memory per subscribed connection, CPU
// per handshake, CPU per delivery, per message a node receives from Redis
// and per HTTP publish, Redis CPU per publish), then checks the model with
// several gateway processes on one Redis: what it predicts for each
// process from the single-gateway inputs beside what each one used.
//
// Stage 1, one gateway: capConns subscribers, capBig per channel in the
// big channels and capSmall in the small ones. Three publishing windows,
// each at the same deliveries/s: plain Redis PUBLISH to the big channels;
// plain Redis PUBLISH to the small ones; HTTP publishes to the small ones
// (the shape and rate of stage 2's publishes, since a request costs less
// the more of them come). With x the gateway's CPU per publish in a window,
//
//	x(Redis, big)   = msg + capBig·del
//	x(Redis, small) = msg + capSmall·del
//	x(HTTP, small)  = pub + msg + capSmall·del
//
// give del (per delivery), msg (per message received from Redis) and pub
// (per HTTP publish, on the gateway that takes it).
//
// Stage 2, capNodes gateways on the same Redis: twice stage 1's
// subscribers (as many as the load generator's open-file limit allows), in
// small channels each spread over every gateway; HTTP publishes to the
// first, at the rate of stage 1's small window. The model predicts each
// process's memory, handshake CPU and publishing CPU from stage 1's
// inputs, and the two windows at that rate give Redis's CPU per publish as
// a + b·(gateways subscribed).

const (
	// A big channel's subscribers still fit one inline fan-out (up to 64
	// local subscribers, written in one batch), as a small one's do: the
	// gateway's CPU per message is then msg + subscribers·del in both.
	capBig   = 50 // subscribers of a big channel
	capSmall = 10 // subscribers of a small channel
	capNodes = 3  // gateway processes in stage 2
)

// capWindowResult is one publishing window.
type capWindowResult struct {
	name      string
	rate      float64 // publishes per second asked for
	perChan   int     // subscribers per channel
	sent      int64
	delivered int64
	expected  int64
	nodeCPU   []time.Duration // per gateway, over the window
	redisCPU  time.Duration
	p50, p99  time.Duration
	perNode   []int64 // deliveries made by each gateway
}

func (w *capWindowResult) String() string {
	return fmt.Sprintf("%s: %.0f publishes/s, %d sent, %s of %s deliveries, p50 %v p99 %v, gateway CPU %v, Redis CPU %v",
		w.name, w.rate, w.sent, count(float64(w.delivered)), count(float64(w.expected)), w.p50, w.p99, w.nodeCPU, w.redisCPU)
}

// perPublish is gateway i's CPU per publish in the window.
func (w *capWindowResult) perPublish(i int) time.Duration {
	return time.Duration(float64(w.nodeCPU[i]) / float64(max(1, w.sent)))
}

// capStage is one stage: its gateways, connections and windows.
type capStage struct {
	nodes    int
	perNode  []int           // subscribers on each gateway
	rss      []int64         // RSS growth of each gateway from connecting its subscribers, bytes
	sockMem  int64           // kernel memory growth (slab and TCP buffers), both ends of every connection, bytes
	hsCPU    []time.Duration // CPU of each gateway while its subscribers connected and subscribed
	hsWall   time.Duration
	windows  []*capWindowResult
	channels int
}

// capResult is what scenario k measured and what the model made of it.
type capResult struct {
	one, many *capStage

	// The model's inputs, from stage 1.
	rssPerConn  float64          // bytes
	sockPerConn float64          // bytes of kernel TCP memory per connection, both ends
	hsPer       time.Duration    // gateway CPU per handshake (connect + subscribe)
	del, msg    time.Duration    // per delivery; per message received from Redis
	pub         time.Duration    // per HTTP publish taken
	redisPer    [2]time.Duration // Redis CPU per publish at the small channels' rate: 1 gateway subscribed; capNodes

	// Stage 2: predicted and measured, per gateway.
	predCPU, measCPU []time.Duration
	predRSS, measRSS []int64
	predHS, measHS   []time.Duration
}

// capSub is a subscriber: it counts deliveries and keeps their latencies.
type capSub struct {
	subscriber
	node int

	got []int64           // by window
	lat [][]time.Duration // by window
}

type capState struct {
	e       *env
	redis   *redisProc
	gws     []*caddyProc
	base    time.Time
	subs    []*capSub
	closing atomic.Bool
	httpc   *http.Client
	rconn   net.Conn // plain Redis publisher
	rbw     *bufio.Writer
	nwin    int
}

func (e *env) runCapacity(ctx context.Context) (*capResult, error) {
	res := &capResult{}
	var err error
	if res.one, err = e.capStage(ctx, 1, e.p.capConns); err != nil {
		return res, fmt.Errorf("one gateway: %w", err)
	}
	res.derive()
	// Stage 2 holds twice stage 1's subscribers: as many as the load
	// generator's open-file limit allows.
	if res.many, err = e.capStage(ctx, capNodes, 2*e.p.capConns); err != nil {
		return res, fmt.Errorf("%d gateways: %w", capNodes, err)
	}
	res.predict()
	return res, nil
}

// capStage runs one stage with nodes gateways and n subscribers.
func (e *env) capStage(ctx context.Context, nodes, n int) (st *capStage, err error) {
	rp, err := e.startRedis(ctx)
	if err != nil {
		return nil, err
	}
	e.redis = rp
	cs := &capState{e: e, redis: rp, base: time.Now(), nwin: 3}
	defer func() {
		cs.close()
		for _, c := range cs.gws {
			c.stop()
		}
		rp.stop()
		e.redis = nil
	}()
	for range nodes {
		c, err := e.startCaddyKind(ctx, fanoutCaddy)
		if err != nil {
			return nil, err
		}
		cs.gws = append(cs.gws, c)
	}
	st = &capStage{nodes: nodes, perNode: make([]int, nodes)}
	before := make([]int64, nodes)
	for i, c := range cs.gws {
		s, err := c.snapshot(ctx)
		if err != nil {
			return nil, err
		}
		before[i] = s.rss
	}
	g0 := make([]int, nodes)
	for i, c := range cs.gws {
		if g0[i], err = c.goroutines(ctx); err != nil {
			return nil, err
		}
	}
	sock0, err := kernelMem()
	if err != nil {
		return nil, err
	}
	cpu0, err := cs.cpu()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	// Stage 1: big channels, then small ones; stage 2: small channels
	// only, each spread over every gateway.
	big := 0
	if nodes == 1 {
		big = max(1, n*9/10/capBig) * capBig
	}
	n = big + max(1, (n-big)/capSmall)*capSmall
	if err := cs.connect(ctx, n, big); err != nil {
		return nil, err
	}
	st.hsWall = time.Since(t0)
	cpu1, err := cs.cpu()
	if err != nil {
		return nil, err
	}
	// Memory is read once the connections are parked (no goroutine
	// left while idle), as they are for most of their lives.
	for i, c := range cs.gws {
		err := poll(ctx, time.Minute, "the gateway's idle connections to park", func() (bool, error) {
			g, err := c.goroutines(ctx)
			return g <= g0[i]+max(10, n/nodes/100), err
		})
		if err != nil {
			return nil, err
		}
	}
	sock1, err := kernelMem()
	if err != nil {
		return nil, err
	}
	st.sockMem = sock1 - sock0
	st.channels = big/capBig + (n-big)/capSmall
	for i, c := range cs.gws {
		s, err := c.snapshot(ctx)
		if err != nil {
			return nil, err
		}
		st.rss = append(st.rss, s.rss-before[i])
		st.hsCPU = append(st.hsCPU, cpu1[i]-cpu0[i])
	}
	for _, s := range cs.subs {
		st.perNode[s.node]++
	}
	e.logf("  k %d gateway(s), %d subscribers (%v per gateway), %d channels, connected in %v", nodes, n, st.perNode, st.channels, st.hsWall.Round(time.Millisecond))

	small := chanNames("cap:small:", (n-big)/capSmall)
	if nodes > 1 {
		w, err := cs.window(ctx, 0, "HTTP, small channels", e.p.capDeliveries/capSmall, small, capSmall, true)
		if err != nil {
			return nil, err
		}
		st.windows = append(st.windows, w)
		return st, nil
	}
	bigChans := chanNames("cap:big:", big/capBig)
	for i, w := range []struct {
		name     string
		channels []string
		perChan  int
		viaHTTP  bool
	}{
		{"Redis, big channels", bigChans, capBig, false},
		{"Redis, small channels", small, capSmall, false},
		{"HTTP, small channels", small, capSmall, true},
	} {
		res, err := cs.window(ctx, i, w.name, e.p.capDeliveries/float64(w.perChan), w.channels, w.perChan, w.viaHTTP)
		if err != nil {
			return nil, err
		}
		st.windows = append(st.windows, res)
	}
	return st, nil
}

func chanNames(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = prefix + strconv.Itoa(i)
	}
	return out
}

// connect opens n subscribers spread over the gateways in turn: the first
// big of them capBig to a channel ("cap:big:<k>"), the rest capSmall to a
// channel ("cap:small:<k>").
func (cs *capState) connect(ctx context.Context, n, big int) error {
	cs.subs = make([]*capSub, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	nodes := len(cs.gws)
	for range 16 {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				room := "cap:big:" + strconv.Itoa(i/capBig)
				if i >= big {
					room = "cap:small:" + strconv.Itoa((i-big)/capSmall)
				}
				node := i % nodes
				cl, err := dialRooms(ctx, fmt.Sprintf("ws://127.0.0.1:%d%s", cs.gws[node].roomsPort, roomsPath), 1024)
				if err == nil {
					if err = cl.subscribe(room); err != nil {
						cl.conn.Close()
					}
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("subscriber %d: %w", i, err))
					mu.Unlock()
					next.Store(int64(n))
					return
				}
				s := &capSub{subscriber: newSubscriber(cl), node: node, got: make([]int64, cs.nwin), lat: make([][]time.Duration, cs.nwin)}
				cs.subs[i] = s
				go cs.read(s)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(append(errs, ctx.Err())...); err != nil {
		cs.subs = slices.DeleteFunc(cs.subs, func(s *capSub) bool { return s == nil })
		return err
	}
	cs.httpc = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: fanHTTPWorkers, DisableCompression: true}}
	c, err := net.DialTimeout("tcp", cs.redis.addr(), 5*time.Second)
	if err != nil {
		return err
	}
	cs.rconn, cs.rbw = c, bufio.NewWriter(c)
	go io.Copy(io.Discard, c) // PUBLISH replies (counts of receivers)
	return nil
}

// capData is a publication's data: the window and the send time.
func capData(win int, ts int64) string {
	return `{"w":` + strconv.Itoa(win) + `,"t":` + strconv.FormatInt(ts, 10) + `}`
}

// read counts s's deliveries and answers pings.
func (cs *capState) read(s *capSub) {
	s.read(&cs.closing, 512, cs.base, s.pong, func(p []byte, at time.Duration) error {
		win, ts, ok := parseCap(p)
		if !ok || win >= len(s.got) {
			return fmt.Errorf("unexpected message %q", p)
		}
		s.mu.Lock()
		s.got[win]++
		s.lat[win] = append(s.lat[win], at-time.Duration(ts))
		s.mu.Unlock()
		return nil
	})
}

// parseCap reads the window and send time out of a delivered message,
// wherever the server put the data (capData's object): wsgate's
// {"op":"message","channel":…,"data":{"w":…,"t":…}}, Centrifugo's
// {"push":{…,"pub":{"data":{"w":…,"t":…}}}} or Nchan's bare data.
func parseCap(p []byte) (win int, ts int64, ok bool) {
	i := bytes.Index(p, []byte(`{"w":`))
	if i < 0 {
		return 0, 0, false
	}
	w, rest, ok := leadingInt(p[i+len(`{"w":`):])
	if !ok || !bytes.HasPrefix(rest, []byte(`,"t":`)) {
		return 0, 0, false
	}
	ts, _, ok = leadingInt(rest[len(`,"t":`):])
	return int(w), ts, ok
}

// cpu is the CPU time used so far by each gateway, then Redis.
func (cs *capState) cpu() ([]time.Duration, error) {
	var out []time.Duration
	for _, pid := range append(cs.pids(), cs.redis.pid()) {
		d, err := procCPU(pid)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

func (cs *capState) pids() []int {
	var p []int
	for _, c := range cs.gws {
		p = append(p, c.pid())
	}
	return p
}

// window publishes rate messages per second for e.p.capWindow, round
// robin over channels, through the first
// gateway's wsgate_publish (viaHTTP) or as plain Redis PUBLISH, and waits
// for the deliveries.
func (cs *capState) window(ctx context.Context, win int, name string, rate float64, channels []string, perChan int, viaHTTP bool) (*capWindowResult, error) {
	dur := cs.e.p.capWindow
	n := int64(math.Round(rate * dur.Seconds()))
	w := &capWindowResult{name: name, rate: rate, perChan: perChan}
	cpu0, err := cs.cpu()
	if err != nil {
		return nil, err
	}
	got0 := cs.delivered(win)
	period := time.Duration(float64(time.Second) / rate)
	jobs := make(chan int64, n)
	var sent, failed atomic.Int64
	var firstErr atomic.Pointer[string]
	var workers sync.WaitGroup
	url := fmt.Sprintf("http://127.0.0.1:%d%s", cs.gws[0].roomsPort, pubPath)
	var rmu sync.Mutex
	for range fanHTTPWorkers {
		workers.Go(func() {
			for k := range jobs {
				ch := channels[k%int64(len(channels))]
				data := capData(win, int64(time.Since(cs.base)))
				var err error
				if viaHTTP {
					err = httpPublish(ctx, cs.httpc, url, `{"channel":"`+ch+`","data":`+data+`}`)
				} else {
					rmu.Lock()
					fmt.Fprintf(cs.rbw, "*3\r\n$7\r\nPUBLISH\r\n$%d\r\nwsgate:%s\r\n$%d\r\n%s\r\n", len("wsgate:")+len(ch), ch, len(data), data)
					if len(jobs) == 0 {
						err = cs.rbw.Flush()
					}
					rmu.Unlock()
				}
				if err != nil {
					failed.Add(1)
					m := err.Error()
					firstErr.CompareAndSwap(nil, &m)
					continue
				}
				sent.Add(1)
			}
		})
	}
	start := time.Now().Add(5 * time.Millisecond)
	tm := time.NewTimer(time.Hour)
	for k := range n {
		if d := time.Until(start.Add(time.Duration(k) * period)); d > 0 {
			tm.Reset(d)
			select {
			case <-tm.C:
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		jobs <- k
	}
	close(jobs)
	workers.Wait()
	tm.Stop()
	rmu.Lock()
	err = cs.rbw.Flush()
	rmu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("Redis publisher: %w", err)
	}
	w.sent = sent.Load()
	if f := failed.Load(); f > 0 {
		return nil, fmt.Errorf("%s: %d publishes failed (%s)", name, f, *firstErr.Load())
	}
	w.expected = w.sent * int64(perChan)
	// The deliveries drain: wait until they stop coming.
	last, lastAt := int64(-1), time.Now()
	err = poll(ctx, 30*time.Second, "the deliveries", func() (bool, error) {
		d := cs.delivered(win) - got0
		if d >= w.expected {
			return true, nil
		}
		if d != last {
			last, lastAt = d, time.Now()
		}
		return time.Since(lastAt) > 2*time.Second, nil
	})
	if err != nil {
		return nil, err
	}
	cpu1, err := cs.cpu()
	if err != nil {
		return nil, err
	}
	for i := range cs.gws {
		w.nodeCPU = append(w.nodeCPU, cpu1[i]-cpu0[i])
	}
	w.redisCPU = cpu1[len(cs.gws)] - cpu0[len(cs.gws)]
	var lat []time.Duration
	w.perNode = make([]int64, len(cs.gws))
	for _, s := range cs.subs {
		s.mu.Lock()
		if s.err != nil {
			err = s.err
		}
		lat = append(lat, s.lat[win]...)
		w.perNode[s.node] += s.got[win]
		s.lat[win] = nil
		s.mu.Unlock()
	}
	if err != nil {
		return nil, fmt.Errorf("a subscriber failed: %w", err)
	}
	w.delivered = int64(len(lat))
	slices.Sort(lat)
	w.p50, w.p99 = percentile(lat, 0.5), percentile(lat, 0.99)
	cs.e.logf("  k %s", w)
	if w.delivered != w.expected {
		return w, fmt.Errorf("%s: %d deliveries, %d expected", name, w.delivered, w.expected)
	}
	return w, nil
}

func (cs *capState) delivered(win int) int64 {
	var n int64
	for _, s := range cs.subs {
		s.mu.Lock()
		n += s.got[win]
		s.mu.Unlock()
	}
	return n
}

func (cs *capState) close() {
	cs.closing.Store(true)
	if cs.rconn != nil {
		cs.rconn.Close()
	}
	closeSubscribers(cs.subs)
}

// kernelMem is the kernel's slab memory (socket, file and epoll structures
// live there) plus its TCP buffer memory, in bytes.
func kernelMem() (int64, error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, err
	}
	mi, err := fs.Meminfo()
	if err != nil {
		return 0, err
	}
	ss, err := fs.NetSockstat()
	if err != nil {
		return 0, err
	}
	if mi.SlabBytes == nil {
		return 0, errors.New("no Slab in /proc/meminfo")
	}
	total := int64(*mi.SlabBytes)
	for _, p := range ss.Protocols {
		if p.Protocol == "TCP" && p.Mem != nil {
			total += int64(*p.Mem) * int64(os.Getpagesize())
		}
	}
	return total, nil
}

// derive computes the model's inputs from stage 1.
func (r *capResult) derive() {
	one := r.one
	n := float64(one.perNode[0])
	r.rssPerConn = float64(one.rss[0]) / n
	r.sockPerConn = float64(one.sockMem) / n
	r.hsPer = time.Duration(float64(one.hsCPU[0]) / n)
	redisBig, redisSmall, httpSmall := one.windows[0], one.windows[1], one.windows[2]
	xb, xs := float64(redisBig.perPublish(0)), float64(redisSmall.perPublish(0))
	del := (xb - xs) / float64(capBig-capSmall)
	r.del = time.Duration(del)
	r.msg = time.Duration(xs - capSmall*del)
	r.pub = httpSmall.perPublish(0) - redisSmall.perPublish(0)
	r.redisPer[0] = time.Duration(float64(redisSmall.redisCPU) / float64(max(1, redisSmall.sent)))
}

// predict is the model's figures for stage 2's gateways.
func (r *capResult) predict() {
	m := r.many
	w := m.windows[0]
	r.redisPer[1] = time.Duration(float64(w.redisCPU) / float64(max(1, w.sent)))
	for i := range m.nodes {
		cpu := float64(w.sent)*float64(r.msg) + float64(w.perNode[i])*float64(r.del)
		if i == 0 {
			cpu += float64(w.sent) * float64(r.pub)
		}
		r.predCPU = append(r.predCPU, time.Duration(cpu))
		r.measCPU = append(r.measCPU, w.nodeCPU[i])
		r.predRSS = append(r.predRSS, int64(float64(m.perNode[i])*r.rssPerConn))
		r.measRSS = append(r.measRSS, m.rss[i])
		r.predHS = append(r.predHS, time.Duration(m.perNode[i])*r.hsPer)
		r.measHS = append(r.measHS, m.hsCPU[i])
	}
}

// ---- report ----

func (r *report) capSection(w writer) {
	w("## k. Capacity: the model's inputs, and a check with several gateways\n\n")
	if !r.section(w, 'k', r.capErr) {
		return
	}
	res := r.cap
	w("Rooms-mode gateways with the Redis broker and `wsgate_publish` (scenario d's configuration) on one\n")
	w("redis-server. **Stage 1**, one gateway: subscribers in channels of %d and of %d, connected by 16\n", capBig, capSmall)
	w("concurrent dialers (each connection: handshake, then `subscribe` and its `ok`); then three windows of\n")
	w("%v, each at %s deliveries/s on a fixed schedule: plain Redis `PUBLISH` (from the load generator) to\n", r.p.capWindow, count(r.p.capDeliveries))
	w("the big channels, and to the small ones, and HTTP publishes (`wsgate_publish`) to the small ones (the\n")
	w("shape and rate of stage 2's publishes: a request costs less the more of them come).\n")
	w("CPU is each process's utime + stime from `/proc`, over the window until its last delivery; RSS is\n")
	w("`VmRSS` after a forced GC, before connecting and once every connection has parked; kernel memory\n")
	w("is `Slab` of `/proc/meminfo` (sockets, files, epoll entries) plus TCP's `mem` of `/proc/net/sockstat`\n")
	w("(both ends of every connection: the clients are on this machine too).\n")
	w("With *x* the gateway's CPU per publish in a window: *x*(Redis, big) = msg + %d·del,\n", capBig)
	w("*x*(Redis, small) = msg + %d·del, *x*(HTTP, small) = pub + msg + %d·del. **Stage 2**, %d gateways on\n", capSmall, capSmall, capNodes)
	w("one Redis, twice the subscribers, in channels of %d each spread over all of them, HTTP publishes to\n", capSmall)
	w("the first at the rate of stage 1's small window: the model's figures from stage 1's inputs beside\n")
	w("what each process used.\n\n")
	if one := res.one; one != nil {
		w("| stage 1 window | publishes/s | sent | deliveries | p50 | p99 | gateway CPU per publish | Redis CPU per publish |\n|---|---|---|---|---|---|---|---|\n")
		for _, win := range one.windows {
			w("| %s (%d per channel) | %s | %s | %s | %v | %v | %s | %s |\n", win.name, win.perChan, count(win.rate), count(float64(win.sent)),
				count(float64(win.delivered)), win.p50.Round(time.Microsecond), win.p99.Round(time.Microsecond),
				micros(float64(win.perPublish(0))), micros(float64(win.redisCPU)/float64(max(1, win.sent))))
		}
		w("\n")
	}
	if res.one != nil && len(res.one.windows) == 3 {
		w("| input (stage 1: %s subscribers, %d channels) | measured |\n|---|---|\n", count(float64(res.one.perNode[0])), res.one.channels)
		w("| gateway RSS per subscribed connection | %s |\n", kib(res.rssPerConn))
		w("| kernel memory per connection (both ends, system-wide) | %s |\n", kib(res.sockPerConn))
		w("| gateway CPU per handshake (connect + subscribe) | %s |\n", micros(float64(res.hsPer)))
		w("| gateway CPU per delivery (del) | %s |\n", micros(float64(res.del)))
		w("| gateway CPU per message received from Redis (msg) | %s |\n", micros(float64(res.msg)))
		w("| gateway CPU per HTTP publish taken (pub) | %s |\n", micros(float64(res.pub)))
		w("| Redis CPU per publish at %s/s, 1 gateway subscribed (Redis, small channels) | %s |\n", count(r.p.capDeliveries/capSmall), micros(float64(res.redisPer[0])))
		if res.many != nil {
			w("| Redis CPU per publish at %s/s, %d gateways subscribed (stage 2) | %s |\n", count(r.p.capDeliveries/capSmall), capNodes, micros(float64(res.redisPer[1])))
		}
		w("\n")
	}
	if m := res.many; m != nil && len(m.windows) > 0 {
		win := m.windows[0]
		w("Stage 2: %s subscribers (%v per gateway) in %d channels, connected in %v; %s publishes/s over HTTP to gateway 1 for %v: %s deliveries of %s, p50 %v, p99 %v.\n\n",
			count(float64(sum(m.perNode))), m.perNode, m.channels, m.hsWall.Round(time.Millisecond), count(win.rate), r.p.capWindow,
			count(float64(win.delivered)), count(float64(win.expected)), win.p50.Round(time.Microsecond), win.p99.Round(time.Microsecond))
		w("| gateway | deliveries | CPU publishing: model | measured | measured ÷ model | RSS growth: model | measured | ÷ | handshake CPU: model | measured | ÷ |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
		for i := range m.nodes {
			w("| %d | %s | %v | %v | %.2f | %s | %s | %.2f | %v | %v | %.2f |\n", i+1, count(float64(win.perNode[i])),
				res.predCPU[i].Round(time.Millisecond), res.measCPU[i].Round(time.Millisecond), float64(res.measCPU[i])/float64(res.predCPU[i]),
				kib(float64(res.predRSS[i])), kib(float64(res.measRSS[i])), float64(res.measRSS[i])/float64(res.predRSS[i]),
				res.predHS[i].Round(time.Millisecond), res.measHS[i].Round(time.Millisecond), float64(res.measHS[i])/float64(res.predHS[i]))
		}
		w("\n")
	}
}

func sum(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}
