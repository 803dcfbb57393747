//! Keeps each policy's key set at an identity provider current: fetched at start, again every
//! `refresh` (or sooner, when the provider's `Cache-Control: max-age` says so, never more often
//! than every 30 s), at once when a token names a `kid` the set lacks (at most once per
//! `jwks_min_refetch`, concurrent ones merged), and after a failure with a growing delay. A
//! failed fetch, or a set with no usable key, keeps the set before. Handshakes never wait on a
//! scheduled fetch; only a token with an unknown `kid` waits, for the one fetch it caused or
//! joined.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::Verifier;
use crate::auth::jwks::JwksKeys;
use crate::config::Config;
use crate::config::settings::{JwksSource, TargetSettings};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::upstream::fetch;

/// The largest key set read: a provider's set is a few KiB.
const MAX_SET: usize = 256 * 1024;
/// How long one fetch may take (connect, TLS, answer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds on how soon a provider's `max-age` makes the next fetch.
const MIN_MAX_AGE: Duration = Duration::from_secs(30);
/// The longest wait between two tries after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts a refresher for each key set of `config` at a URL, taking over the sets `previous`
/// (the config a reload replaces) had fetched for the same policy and URL, and stopping its
/// refreshers. Sets the key gauges (and removes those of policies gone). A set whose refresher
/// runs already is left to it.
pub(crate) fn start(
    config: &Config,
    previous: Option<&Config>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) {
    for source in &config.jwks {
        let same = previous.and_then(|previous| {
            previous
                .jwks
                .iter()
                .find(|old| old.policy == source.policy && old.target.url == source.target.url)
        });
        if !source.keys.claim_refresher() {
            continue;
        }
        if let Some(old) = same {
            source.keys.adopt(&old.keys);
        }
        let refresher = Refresher {
            policy: source.policy.clone(),
            target: source.target.clone(),
            refresh: source.refresh,
            keys: source.keys.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(refresher.run(shutdown.clone()));
    }
    if let Some(previous) = previous {
        for old in &previous.jwks {
            old.keys.retire();
        }
        for (name, policy) in &previous.policies {
            if matches!(policy.verifier, Verifier::Jwks(_)) && !config.policies.contains_key(name) {
                metrics.forget_jwks_keys(name);
            }
        }
    }
    for (name, policy) in &config.policies {
        if let Verifier::Jwks(keys) = &policy.verifier {
            metrics.jwks_keys(name, keys.key_count());
        }
    }
}

/// Whether every key set at a URL has loaded (for `/readyz`): the policies whose set has not
/// are named.
pub(crate) fn unloaded(config: &Config) -> Vec<&str> {
    config
        .jwks
        .iter()
        .filter(|source: &&JwksSource| !source.keys.loaded())
        .map(|source| source.policy.as_str())
        .collect()
}

struct Refresher {
    policy: String,
    target: TargetSettings,
    refresh: Duration,
    keys: Arc<JwksKeys>,
    metrics: Arc<Metrics>,
}

impl Refresher {
    async fn run(self, shutdown: Shutdown) {
        let mut failures = 0u32;
        loop {
            if self.keys.retired() || shutdown.is_cancelled() {
                return;
            }
            let forced = self.keys.forced_pending();
            let wait = match self.fetch(forced).await {
                Some(max_age) => {
                    failures = 0;
                    max_age.map_or(self.refresh, |age| age.max(MIN_MAX_AGE).min(self.refresh))
                }
                None => {
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_secs(1 << failures.min(6).saturating_sub(1));
                    backoff.min(MAX_BACKOFF).min(self.refresh)
                }
            };
            self.keys.attempted(forced);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.keys.woken() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One fetch; on success the provider's `max-age`, if it gave one.
    async fn fetch(&self, forced: bool) -> Option<Option<Duration>> {
        let mut headers: Vec<(HeaderName, HeaderValue)> = vec![(
            header::ACCEPT,
            HeaderValue::from_static("application/jwk-set+json, application/json"),
        )];
        if forced {
            // A key the provider has just published must not be missed for a cached set.
            headers.push((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")));
        }
        let policy = &self.policy;
        let url = &self.target.url;
        let fetched = match fetch::get(&self.target, &headers, MAX_SET, FETCH_TIMEOUT).await {
            Ok(fetched) => fetched,
            Err(error) => {
                self.metrics.jwks_fetch(policy, "error");
                tracing::warn!(policy = %policy, url = %url, %error, "key set fetch failed; the set before stays");
                return None;
            }
        };
        match self.keys.install(fetched.body) {
            Ok(count) => {
                self.metrics.jwks_fetch(policy, "ok");
                self.metrics.jwks_keys(policy, count);
                tracing::debug!(policy = %policy, url = %url, keys = count, forced, "key set fetched");
                Some(max_age(&fetched.headers))
            }
            Err(error) => {
                self.metrics.jwks_fetch(policy, "invalid");
                tracing::warn!(policy = %policy, url = %url, %error, "key set unusable; the set before stays");
                None
            }
        }
    }
}

/// The `max-age` of a response's `Cache-Control`.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|directive| {
            let (name, seconds) = directive.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("max-age")
                .then(|| seconds.trim().parse().ok().map(Duration::from_secs))?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=120, must-revalidate"),
        );
        assert_eq!(max_age(&headers), Some(Duration::from_secs(120)));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert_eq!(max_age(&headers), None);
    }
}
