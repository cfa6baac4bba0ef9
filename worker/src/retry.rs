//! Pure retry rules: Retry-After parsing, capped jittered backoff, attempt accounting.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Longest delay a response may ask for; longer requests are clamped.
pub const MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Seconds from the outside world (a header, an event field, a flag) as a duration that
/// cannot panic: negative means zero, beyond `max` means `max`, NaN means None.
pub fn bounded_secs(secs: f64, max: Duration) -> Option<Duration> {
    if secs.is_nan() {
        return None;
    }
    Some(if secs <= 0.0 { Duration::ZERO } else { Duration::try_from_secs_f64(secs).unwrap_or(max).min(max) })
}

/// `Retry-After` / `X-Retry-After`: delay-seconds (fractions accepted) or an HTTP date.
/// A negative delay or a date in the past means "now"; a huge one is clamped; anything
/// unreadable is None (the caller's backoff applies).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return bounded_secs(secs, MAX_SCHEDULE_DELAY);
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_SCHEDULE_DELAY))
}

/// Exponential backoff for the given 1-based try: base * 2^(n-1), capped, with ±20 % jitter
/// so that many workers do not retry in lock-step.
pub fn backoff(base: Duration, n: u32, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    let d = exp.min(cap);
    let jitter = rand::rng().random_range(0.8..=1.2);
    d.mul_f64(jitter).min(cap)
}

/// Whether an event that has now failed `failures` times is out of attempts.
pub fn exhausted(failures: u32, max_attempts: u32) -> bool {
    failures >= max_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 1.5 ", now), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("-1", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-5", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("1e20", now), Some(MAX_SCHEDULE_DELAY));
        assert_eq!(parse_retry_after("inf", now), Some(MAX_SCHEDULE_DELAY));
        assert_eq!(parse_retry_after("-inf", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1e308", now), Some(MAX_SCHEDULE_DELAY));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(120)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1e12", now), Some(MAX_SCHEDULE_DELAY));
    }

    #[test]
    fn bounded_seconds_never_panic() {
        let max = Duration::from_secs(3600);
        assert_eq!(bounded_secs(1.0 / 1e-300, max), Some(max), "redrive with a tiny rate");
        assert_eq!(bounded_secs(f64::INFINITY, max), Some(max));
        assert_eq!(bounded_secs(-3.0, max), Some(Duration::ZERO));
        assert_eq!(bounded_secs(f64::NAN, max), None);
        assert_eq!(bounded_secs(0.25, max), Some(Duration::from_millis(250)));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(30);
        for n in 1..=40 {
            let d = backoff(base, n, cap);
            let ideal = (base * 2u32.pow((n - 1).min(20))).min(cap);
            assert!(d >= ideal.mul_f64(0.8) && d <= ideal.mul_f64(1.2).min(cap), "n={n} d={d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(base, 3, cap)).collect();
        assert!(samples.len() > 1, "jitter varies the delay");
    }

    #[test]
    fn attempts() {
        assert!(!exhausted(4, 5));
        assert!(exhausted(5, 5));
        assert!(exhausted(1, 1));
    }
}
