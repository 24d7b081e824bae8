//! The azure_core pipeline every ARM request goes through: retries that honour
//! `Retry-After` within a bounded wait, a cap on concurrent requests, a timeout per attempt,
//! and a count of the HTTP requests sent.
//!
//! How azure_core 0.21 retries (`policies/retry_policies/retry_policy.rs`): it retries
//! 408, 429, 500, 502, 503 and 504 responses and I/O errors. For 429 and 503 it reads
//! `retry-after-ms`, `x-ms-retry-after-ms` or `Retry-After` (seconds or an HTTP date) and
//! sleeps for the longer of that and the policy's back-off. It does not cap
//! `Retry-After`, and it checks the policy's expiry only before each sleep, so a long `Retry-After` could run
//! far past any total. arcfleet therefore adds two checks: [`ArmRetry`] declares the
//! request expired when the next back-off would pass the budget, and [`ThrottleGuard`]
//! ends the request with [`RetryBudgetExceeded`] when the server asks for a wait that
//! would pass it. Together they start no retry later than [`RetrySettings::max_wait`]
//! after the request's first attempt.
//!
//! The 0.21 `ClientBuilder`s set only retry and transport options, so the clients are built
//! with `Client::new` and full [`ClientOptions`], which carry per-call and per-retry
//! policies. The policies sit in these pipeline slots: [`RequestStart`] per call (before the retry
//! policy), [`ThrottleGuard`] and [`RequestGate`] per retry (after it, so each HTTP attempt,
//! page and retry passes them once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::error::ErrorKind;
use azure_core::headers::{Headers, RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS};
use azure_core::{
    ClientOptions, Context, Policy, PolicyResult, Request, RetryOptions, RetryPolicy, StatusCode,
};
use tokio::sync::Semaphore;

/// Concurrent ARM requests per run. ARM counts its read limits per subscription and
/// principal. Eight at once keeps a large fleet's reads short without bursting into
/// throttling, and bulk list reads keep the number of requests small anyway.
pub const ARM_CONCURRENCY: usize = 8;

/// Bound on one HTTP attempt, from sending the request to the response headers.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound of the random part that [`ArmRetry`] adds to each back-off, so that
/// concurrent throttled requests do not retry in lockstep.
const MAX_JITTER: Duration = Duration::from_millis(250);

/// Retry settings of ARM requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    /// Bound on the time from a request's first attempt to the start of its last retry
    /// (`--arm-max-wait`).
    pub max_wait: Duration,
    /// Retries after the first attempt, at most.
    pub max_retries: u32,
    /// Back-off before the first retry; it doubles for each further retry.
    pub initial_delay: Duration,
    /// Back-off cap. A longer `Retry-After` is still honoured while it fits `max_wait`.
    pub max_delay: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_wait: Duration::from_secs(120),
            max_retries: 10,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Counts of what the pipeline sent, for the run's log line.
#[derive(Debug, Default)]
pub struct ArmStats {
    requests: AtomicUsize,
    throttled: AtomicUsize,
}

impl ArmStats {
    /// Returns the HTTP requests sent, pages and retries included.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Returns the responses that were 429 or 503.
    pub fn throttled(&self) -> usize {
        self.throttled.load(Ordering::Relaxed)
    }
}

/// Returns client options with arcfleet's retry, timeout, concurrency and counting
/// policies. Every ARM client of a run is built from the same options, so they share the
/// concurrency cap and the counts.
pub fn client_options(settings: RetrySettings, stats: Arc<ArmStats>) -> ClientOptions {
    let gate = RequestGate {
        permits: Arc::new(Semaphore::new(ARM_CONCURRENCY)),
        stats: stats.clone(),
    };
    let guard = ThrottleGuard { settings, stats };
    let per_call: Vec<Arc<dyn Policy>> = vec![Arc::new(RequestStart)];
    let per_retry: Vec<Arc<dyn Policy>> = vec![Arc::new(guard), Arc::new(gate)];
    ClientOptions::default()
        .retry(RetryOptions::custom(Arc::new(ArmRetry { settings })))
        .per_call_policies(per_call)
        .per_retry_policies(per_retry)
}

/// Exponential back-off whose expiry looks ahead: a retry whose back-off would end past
/// [`RetrySettings::max_wait`] is not attempted.
#[derive(Debug)]
pub struct ArmRetry {
    settings: RetrySettings,
}

impl ArmRetry {
    /// Returns the back-off before retry number `retry` (1-based), without jitter.
    fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.settings
            .initial_delay
            .saturating_mul(factor)
            .min(self.settings.max_delay)
    }
}

impl RetryPolicy for ArmRetry {
    fn is_expired(&self, duration_since_start: Duration, retry_count: u32) -> bool {
        let next_wait = self.backoff(retry_count + 1) + MAX_JITTER;
        retry_count >= self.settings.max_retries
            || duration_since_start + next_wait > self.settings.max_wait
    }

    fn sleep_duration(&self, retry_count: u32) -> Duration {
        self.backoff(retry_count) + jitter()
    }
}

/// Returns a pseudo-random delay below [`MAX_JITTER`], from the clock's nanoseconds.
fn jitter() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    Duration::from_nanos(u64::from(nanos) % MAX_JITTER.as_nanos() as u64)
}

/// The instant a request was first sent, stored in its pipeline context.
#[derive(Debug, Clone, Copy)]
struct Started(Instant);

/// Records when a request starts, before any retry.
#[derive(Debug)]
pub struct RequestStart;

#[async_trait::async_trait]
impl Policy for RequestStart {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let mut ctx = ctx.clone();
        ctx.insert(Started(Instant::now()));
        next[0].send(&ctx, request, &next[1..]).await
    }
}

/// A throttled request whose requested wait would pass the retry budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "ARM throttled the request (HTTP {status}) and asked to wait {:.1} s (Retry-After), but \
     only {:.1} s of the {:.1} s retry budget (--arm-max-wait) are left",
    retry_after.as_secs_f64(), remaining.as_secs_f64(), budget.as_secs_f64()
)]
pub struct RetryBudgetExceeded {
    /// The HTTP status, 429 or 503.
    pub status: u16,
    /// The wait the server asked for.
    pub retry_after: Duration,
    /// The part of the budget that was left.
    pub remaining: Duration,
    /// The budget.
    pub budget: Duration,
}

/// Ends a throttled request at once when its `Retry-After` would pass the retry budget,
/// instead of letting azure_core sleep past it. Logs each throttled response.
#[derive(Debug)]
pub struct ThrottleGuard {
    settings: RetrySettings,
    stats: Arc<ArmStats>,
}

#[async_trait::async_trait]
impl Policy for ThrottleGuard {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let response = next[0].send(ctx, request, &next[1..]).await?;
        let status = response.status();
        if !matches!(
            status,
            StatusCode::TooManyRequests | StatusCode::ServiceUnavailable
        ) {
            return Ok(response);
        }
        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        let retry_after = retry_after(response.headers());
        let elapsed = ctx
            .get::<Started>()
            .map_or(Duration::ZERO, |started| started.0.elapsed());
        let remaining = self.settings.max_wait.saturating_sub(elapsed);
        tracing::debug!(
            status = u16::from(status),
            path = request.url().path(),
            retry_after_ms = retry_after.map(|wait| wait.as_millis() as u64),
            "ARM throttled a request"
        );
        match retry_after {
            Some(wait) if wait > remaining => Err(azure_core::Error::new(
                ErrorKind::HttpResponse {
                    status,
                    error_code: None,
                },
                RetryBudgetExceeded {
                    status: u16::from(status),
                    retry_after: wait,
                    remaining,
                    budget: self.settings.max_wait,
                },
            )),
            _ => Ok(response),
        }
    }
}

/// Returns the wait a response requests, from the headers azure_core 0.21 reads, in its
/// order: `retry-after-ms`, `x-ms-retry-after-ms`, then `Retry-After` in seconds or as an
/// HTTP date.
pub fn retry_after(headers: &Headers) -> Option<Duration> {
    for name in [RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS] {
        if let Some(millis) = headers
            .get_optional_str(&name)
            .and_then(|value| value.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(millis));
        }
    }
    let value = headers.get_optional_str(&RETRY_AFTER)?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = azure_core::date::parse_rfc1123(value).ok()?;
    let wait = date - time::OffsetDateTime::now_utc();
    Some(wait.try_into().unwrap_or(Duration::ZERO))
}

/// Caps concurrent HTTP attempts, bounds each one with [`ATTEMPT_TIMEOUT`] and counts them.
#[derive(Debug)]
pub struct RequestGate {
    permits: Arc<Semaphore>,
    stats: Arc<ArmStats>,
}

#[async_trait::async_trait]
impl Policy for RequestGate {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let _permit = self.permits.acquire().await.map_err(|_| {
            azure_core::Error::message(ErrorKind::Other, "the ARM request limiter was closed")
        })?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(method = %request.method(), path = request.url().path(), "ARM request");
        match tokio::time::timeout(ATTEMPT_TIMEOUT, next[0].send(ctx, request, &next[1..])).await {
            Ok(result) => result,
            // An I/O error, so that azure_core retries the attempt.
            Err(_) => Err(azure_core::Error::message(
                ErrorKind::Io,
                format!("ARM did not answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_wait: u64) -> ArmRetry {
        ArmRetry {
            settings: RetrySettings {
                max_wait: Duration::from_secs(max_wait),
                ..RetrySettings::default()
            },
        }
    }

    #[test]
    fn backoff_doubles_up_to_cap() {
        let retry = policy(600);
        let seconds: Vec<u64> = (1..=7).map(|n| retry.backoff(n).as_secs()).collect();
        assert_eq!(seconds, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn expiry_looks_ahead_at_next_backoff() {
        let retry = policy(10);
        assert!(!retry.is_expired(Duration::from_secs(0), 0));
        // The fourth retry would wait 8 s, which would end past 10 s.
        assert!(retry.is_expired(Duration::from_secs(3), 3));
        assert!(retry.is_expired(Duration::from_secs(10), 0));
    }

    #[test]
    fn expiry_counts_retries() {
        let retry = policy(100_000);
        assert!(!retry.is_expired(Duration::ZERO, 9));
        assert!(retry.is_expired(Duration::ZERO, 10));
    }

    #[test]
    fn sleep_stays_below_backoff_plus_jitter() {
        let retry = policy(600);
        for n in 1..5 {
            let sleep = retry.sleep_duration(n);
            assert!(sleep >= retry.backoff(n), "{sleep:?}");
            assert!(sleep < retry.backoff(n) + MAX_JITTER, "{sleep:?}");
        }
    }

    #[test]
    fn retry_after_reads_each_header() {
        let mut headers = Headers::new();
        headers.insert(RETRY_AFTER, "7");
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(X_MS_RETRY_AFTER_MS, "1500");
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));
        headers.insert(RETRY_AFTER_MS, "250");
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&Headers::new()), None);
    }

    #[test]
    fn retry_after_date_in_past_is_zero() {
        let mut headers = Headers::new();
        headers.insert(RETRY_AFTER, "Fri, 01 Jan 2021 00:00:00 GMT");
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, "soon");
        assert_eq!(retry_after(&headers), None);
    }
}
