//! Pure flow-control algorithms for one target host: an adaptive concurrency limit (AIMD
//! on measured latency and back-pressure answers, after Vector's adaptive request
//! concurrency and Netflix's concurrency-limits) and a token-bucket rate limit.
//!
//! Nothing here does I/O or reads a clock: callers pass `now`, so the simulation tests at
//! the bottom drive the limiter through scenarios of simulated receivers, deterministically.

use std::time::{Duration, Instant};

/// How a delivery attempt went, as far as the receiver's capacity is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The receiver answered and was not struggling (2xx, and final 4xx such as 404 or 422).
    Ok,
    /// The receiver is overloaded or failing: 429, 5xx, timeouts, connect errors.
    Backpressure,
}

/// Settings of one host's limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// Fixed limit (no adaptation) when false: the limit is `max`.
    pub adaptive: bool,
    /// Limit to start from (and to return to when a paused host reopens, after its trial).
    pub initial: usize,
    /// Hard cap: never more requests at once than this.
    pub max: usize,
    /// Latency above `baseline * (1 + tolerance)` counts as congestion.
    pub rtt_tolerance: f64,
    /// Multiplicative decrease on congestion (0.75: cut by a quarter).
    pub decrease: f64,
    /// After a cut, stay at or below the limit that failed for this long before probing
    /// above it again, so a receiver with a hard limit sees few overload answers.
    pub plateau: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            adaptive: true,
            initial: 4,
            max: 32,
            rtt_tolerance: 1.0,
            decrease: 0.75,
            plateau: Duration::from_secs(120),
        }
    }
}

/// Shortest and longest evaluation window.
const MIN_WINDOW: Duration = Duration::from_millis(10);
const MAX_WINDOW: Duration = Duration::from_secs(1);
/// Smallest latency rise that counts as congestion.
const MIN_RISE: f64 = 0.005;
/// Time over which the latency baseline follows a lasting rise.
const BASELINE_RISE: Duration = Duration::from_secs(60);

/// An adaptive concurrency limit. Responses are gathered into windows about one round trip
/// long; at the end of each window the limit grows by one when the limit was in use, latency
/// stayed near its baseline and nothing pushed back, and is cut multiplicatively when
/// something pushed back or latency rose.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    s: LimitSettings,
    limit: f64,
    /// Latency with no congestion, seconds: falls quickly, rises slowly.
    baseline: Option<f64>,
    window_start: Option<Instant>,
    rtt_sum: f64,
    count: u32,
    /// Most requests in flight seen in the window (was the limit actually used?).
    peak_in_flight: usize,
    pushed_back: bool,
    /// The limit at which the receiver last pushed back, and when.
    ceiling: Option<(f64, Instant)>,
    /// When the limit was last cut: answers to requests sent before that do not cut again.
    last_cut: Option<Instant>,
}

impl AdaptiveLimit {
    pub fn new(s: LimitSettings) -> Self {
        let max = s.max.max(1);
        let s = LimitSettings { max, initial: s.initial.clamp(1, max), ..s };
        let limit = if s.adaptive { s.initial as f64 } else { max as f64 };
        Self {
            s,
            limit,
            baseline: None,
            window_start: None,
            rtt_sum: 0.0,
            count: 0,
            peak_in_flight: 0,
            pushed_back: false,
            ceiling: None,
            last_cut: None,
        }
    }

    /// Requests allowed at once now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.s.max)
    }

    /// Latency baseline in seconds, once measured.
    pub fn baseline(&self) -> Option<f64> {
        self.baseline
    }

    /// Start over from one request at a time (a paused host reopening: one trial request,
    /// then ramp up).
    pub fn restart_from_one(&mut self) {
        if self.s.adaptive {
            self.limit = 1.0;
        }
        self.reset_window();
    }

    /// Record one finished request: how long it took, how it went, and how many requests
    /// were in flight when it was sent (itself included).
    pub fn on_response(&mut self, now: Instant, rtt: Duration, signal: Signal, in_flight: usize) {
        // A fixed limit still measures the latency baseline (it tells how fast the host
        // drains its queue).
        let start = *self.window_start.get_or_insert(now);
        self.count += 1;
        self.peak_in_flight = self.peak_in_flight.max(in_flight);
        match signal {
            Signal::Ok => self.rtt_sum += rtt.as_secs_f64(),
            // A burst of failures sent at the old limit is one signal, not one per request.
            Signal::Backpressure
                if self.last_cut.is_some_and(|c| now.checked_sub(rtt).is_some_and(|sent| sent < c)) =>
            {
                self.count -= 1;
                return;
            }
            Signal::Backpressure => self.pushed_back = true,
        }
        // A push-back is acted on at once: waiting for the window to end would let a whole
        // window of requests hit an overloaded receiver.
        let window = self.baseline.map(Duration::from_secs_f64).unwrap_or(MIN_WINDOW).clamp(MIN_WINDOW, MAX_WINDOW);
        if self.pushed_back || now.duration_since(start) >= window {
            self.evaluate(now);
        }
    }

    fn evaluate(&mut self, now: Instant) {
        let ok_count = if self.pushed_back { self.count.saturating_sub(1) } else { self.count };
        let mean = (ok_count > 0).then(|| self.rtt_sum / ok_count as f64);
        let congested = match (mean, self.baseline) {
            // Loopback receivers answer in a millisecond or two, where scheduling noise
            // alone doubles latency: a rise also has to be worth noticing in absolute terms.
            (Some(m), Some(b)) => m > b * (1.0 + self.s.rtt_tolerance) && m - b > MIN_RISE,
            _ => false,
        };
        if !self.s.adaptive {
            // Measure only.
        } else if self.pushed_back || congested {
            let before = self.limit;
            // Latency alone cuts gently; an answer that pushes back cuts harder.
            let factor = if self.pushed_back { self.s.decrease } else { (1.0 + self.s.decrease) / 2.0 };
            self.limit = (self.limit * factor).max(1.0);
            self.last_cut = Some(now);
            if self.pushed_back {
                // The ceiling marks the highest limit that was refused lately. Push-backs at
                // lower limits (sporadic 503s) cut the limit but do not lower the ceiling, or
                // the limit would ratchet down to one.
                let keep =
                    matches!(self.ceiling, Some((c, at)) if c > before && now.duration_since(at) < self.s.plateau);
                if !keep {
                    self.ceiling = Some((before, now));
                }
            }
        } else if self.peak_in_flight >= self.limit() {
            let capped = matches!(self.ceiling, Some((c, at)) if self.limit + 1.0 >= c && now.duration_since(at) < self.s.plateau);
            if !capped {
                self.limit = (self.limit + 1.0).min(self.s.max as f64);
            }
        }
        if !self.pushed_back {
            if let Some(m) = mean {
                let span = self.window_start.map(|s| now.duration_since(s)).unwrap_or_default();
                self.baseline = Some(match self.baseline {
                    None => m,
                    Some(b) if m < b => b * 0.5 + m * 0.5,
                    // Rising over about a minute lets the baseline follow a receiver that
                    // became slower for good, without chasing the latency congestion causes.
                    Some(b) => b + (m - b) * (span.as_secs_f64() / BASELINE_RISE.as_secs_f64()).min(1.0),
                });
            }
        }
        self.reset_window();
    }

    fn reset_window(&mut self) {
        self.window_start = None;
        self.rtt_sum = 0.0;
        self.count = 0;
        self.peak_in_flight = 0;
        self.pushed_back = false;
    }
}

/// A token bucket: `rate` requests per second on average, bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimit {
    /// None for a rate that is not a positive finite number (no limit).
    pub fn new(rate: f64) -> Option<Self> {
        (rate.is_finite() && rate > 0.0).then(|| {
            let burst = rate.clamp(1.0, 1e6);
            Self { rate, burst, tokens: burst, last: None }
        })
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            self.tokens = (self.tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Take a token, or say how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Bounded: at most one second of a tiny rate's wait (`rate` may be 1e-9).
            let secs = ((1.0 - self.tokens) / self.rate).min(3600.0);
            Err(Duration::from_secs_f64(secs.max(0.001)))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Scenarios as data: a simulated receiver (latency that rises with concurrency, a hard
    //! limit, jitter) is driven by the limiter under a virtual clock, and the limit it settles
    //! on is asserted, as Vector's adaptive concurrency tests do.
    use super::*;

    #[derive(Debug, Clone, Copy)]
    struct Receiver {
        /// Latency with nothing else in flight.
        base_ms: f64,
        /// Concurrency it serves without slowing down.
        knee: usize,
        /// Extra latency per request in flight beyond the knee.
        per_extra_ms: f64,
        /// Above this many requests at once it answers with an error (a connection pool).
        hard_limit: Option<usize>,
        /// Latency jitter, as a fraction of the latency.
        jitter: f64,
    }

    struct Outcome {
        final_limit: usize,
        max_in_flight: usize,
        overloads: usize,
        completed: usize,
        mean_limit_last_half: f64,
    }

    /// Run a closed loop: as many clients as the limit allows send back to back for `secs`
    /// of virtual time. Deterministic (a fixed pseudo-random sequence for the jitter).
    fn simulate(settings: LimitSettings, r: Receiver, secs: u64) -> Outcome {
        let t0 = Instant::now();
        let mut lim = AdaptiveLimit::new(settings);
        let mut now = Duration::ZERO;
        // (finish time, sent with this many in flight, failed, sent at)
        let mut flying: Vec<(Duration, usize, bool, Duration)> = vec![];
        let (mut overloads, mut completed, mut max_in_flight) = (0, 0, 0);
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut limits = vec![];
        let end = Duration::from_secs(secs);
        while now < end {
            // Fill up to the limit.
            while flying.len() < lim.limit() {
                let n = flying.len() + 1;
                max_in_flight = max_in_flight.max(n);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = 1.0 + r.jitter * ((seed % 2000) as f64 / 1000.0 - 1.0);
                // A pool counts the requests it serves: failed ones do not hold a connection.
                let served = flying.iter().filter(|f| !f.2).count() + 1;
                let over = r.hard_limit.is_some_and(|h| served > h);
                let ms =
                    if over { 1.0 } else { (r.base_ms + r.per_extra_ms * n.saturating_sub(r.knee) as f64) * noise };
                flying.push((now + Duration::from_secs_f64(ms / 1000.0), n, over, now));
            }
            // Advance to the next completion.
            let (i, _) = flying.iter().enumerate().min_by_key(|(_, f)| f.0).expect("something in flight");
            let (done_at, n, over, sent_at) = flying.swap_remove(i);
            let rtt = done_at - sent_at;
            now = done_at;
            if over {
                overloads += 1;
            }
            completed += 1;
            lim.on_response(
                t0 + now,
                rtt.max(Duration::from_millis(1)),
                if over { Signal::Backpressure } else { Signal::Ok },
                n,
            );
            if now > end / 2 {
                limits.push(lim.limit() as f64);
            }
        }
        Outcome {
            final_limit: lim.limit(),
            max_in_flight,
            overloads,
            completed,
            mean_limit_last_half: limits.iter().sum::<f64>() / limits.len().max(1) as f64,
        }
    }

    fn receiver() -> Receiver {
        Receiver { base_ms: 5.0, knee: 1000, per_extra_ms: 0.0, hard_limit: None, jitter: 0.1 }
    }

    #[test]
    fn grows_to_the_cap_when_the_receiver_keeps_up() {
        let s = LimitSettings { max: 32, ..Default::default() };
        let o = simulate(s, receiver(), 10);
        assert_eq!(o.final_limit, 32);
        assert!(o.max_in_flight <= 32);
        assert_eq!(o.overloads, 0);
    }

    #[test]
    fn never_exceeds_the_cap() {
        let s = LimitSettings { max: 16, ..Default::default() };
        let o = simulate(s, Receiver { hard_limit: Some(100), ..receiver() }, 20);
        assert!(o.max_in_flight <= 16, "{}", o.max_in_flight);
        assert_eq!(o.overloads, 0);
    }

    #[test]
    fn finds_a_hard_limit_below_the_cap_with_few_overloads() {
        // A receiver whose pool holds 10 connections, behind a cap of 32.
        let s = LimitSettings { max: 32, ..Default::default() };
        let o = simulate(s, Receiver { hard_limit: Some(10), ..receiver() }, 300);
        assert!(o.mean_limit_last_half <= 10.5 && o.mean_limit_last_half >= 5.0, "{}", o.mean_limit_last_half);
        // One push-back to find the limit, then one probe per plateau (two minutes).
        assert!(o.overloads <= 4, "{} overload answers out of {}", o.overloads, o.completed);
        assert!(o.completed > 100_000);
    }

    #[test]
    fn backs_off_when_latency_rises_with_concurrency() {
        // Serves 8 at once at full speed; every extra request queues behind them.
        let r = Receiver { knee: 8, per_extra_ms: 2.0, ..receiver() };
        let o = simulate(LimitSettings { max: 64, ..Default::default() }, r, 30);
        assert!(o.mean_limit_last_half < 20.0, "settled at {}", o.mean_limit_last_half);
        assert!(o.mean_limit_last_half >= 4.0, "settled at {}", o.mean_limit_last_half);
    }

    #[test]
    fn sporadic_push_back_does_not_ratchet_the_limit_down() {
        // One answer in a hundred is a 503 whatever the load (a flaky dependency).
        let mut l = AdaptiveLimit::new(LimitSettings { max: 32, ..Default::default() });
        let t0 = Instant::now();
        let mut lows = vec![];
        for i in 0..20_000u64 {
            let n = l.limit();
            let signal = if i % 100 == 99 { Signal::Backpressure } else { Signal::Ok };
            l.on_response(t0 + Duration::from_millis(i), Duration::from_millis(3), signal, n);
            if i > 10_000 {
                lows.push(l.limit());
            }
        }
        let mean = lows.iter().sum::<usize>() as f64 / lows.len() as f64;
        assert!(mean >= 8.0, "settled at {mean}");
    }

    #[test]
    fn a_fixed_limit_stays_put() {
        let s = LimitSettings { adaptive: false, max: 12, ..Default::default() };
        let o = simulate(s, Receiver { hard_limit: Some(100), knee: 2, per_extra_ms: 5.0, ..receiver() }, 5);
        assert_eq!(o.final_limit, 12);
        assert_eq!(o.max_in_flight, 12);
    }

    #[test]
    fn restarts_from_one_then_ramps_up() {
        let mut l = AdaptiveLimit::new(LimitSettings { max: 32, initial: 8, ..Default::default() });
        assert_eq!(l.limit(), 8);
        l.restart_from_one();
        assert_eq!(l.limit(), 1);
        let t0 = Instant::now();
        for i in 0..200u64 {
            let n = l.limit();
            l.on_response(t0 + Duration::from_millis(i * 20), Duration::from_millis(5), Signal::Ok, n);
        }
        assert!(l.limit() > 8, "ramped up to {}", l.limit());
    }

    #[test]
    fn unused_limit_does_not_grow() {
        // One request at a time (the original worker's pattern): the limit has no reason to rise.
        let mut l = AdaptiveLimit::new(LimitSettings::default());
        let t0 = Instant::now();
        for i in 0..1000u64 {
            l.on_response(t0 + Duration::from_millis(i * 20), Duration::from_millis(5), Signal::Ok, 1);
        }
        assert_eq!(l.limit(), 4);
    }

    #[test]
    fn rate_limit_spaces_requests() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10.0).unwrap();
        let mut sent = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            match r.try_take(now) {
                Ok(()) => sent += 1,
                Err(wait) => now += wait,
            }
        }
        // A burst of 10, then 10 per second.
        assert!((105..=112).contains(&sent), "{sent}");
        assert!(RateLimit::new(0.0).is_none() && RateLimit::new(f64::NAN).is_none());
        let mut tiny = RateLimit::new(1e-12).unwrap();
        assert!(tiny.try_take(t0).is_ok());
        assert_eq!(tiny.try_take(t0), Err(Duration::from_secs(3600)), "a tiny rate waits a bounded time");
    }
}
