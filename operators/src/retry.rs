//! Retry and backoff settings, one type for every operator that reconnects or retries
//! (`sink.webhook`, `sink.mqtt`, `sink.nats`, `source.ip_camera`, `source.usb_camera`; the fleet
//! engine's NATS client too): the wait before the next attempt starts at `initial_backoff_ms`,
//! doubles after each failed attempt up to `max_backoff_ms`, and starts again from
//! `initial_backoff_ms` once an attempt succeeds.
//!
//! Operators flatten it into their parameters (`#[serde(flatten)]`), so graph files keep writing
//! `initial_backoff_ms` and `max_backoff_ms` where they always did; the defaults (200 ms, 10 s)
//! are the same for every operator.

use std::time::Duration;

use serde::Deserialize;

use crate::registry::ParamError;

/// How long to wait between attempts. Flatten it into an operator's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub struct RetrySettings {
    /// First wait before trying again, in milliseconds; doubled after each failed attempt.
    #[serde(default = "default_initial_backoff_ms")]
    #[schemars(range(min = 1))]
    pub initial_backoff_ms: u64,
    /// Longest wait between attempts, in milliseconds (at least `initial_backoff_ms`).
    #[serde(default = "default_max_backoff_ms")]
    #[schemars(range(min = 1))]
    pub max_backoff_ms: u64,
}

fn default_initial_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    10_000
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

impl RetrySettings {
    /// The rules the schema cannot express: both waits positive, the longest not below the first.
    pub fn validate(&self) -> Result<(), ParamError> {
        for (field, value) in [
            ("initial_backoff_ms", self.initial_backoff_ms),
            ("max_backoff_ms", self.max_backoff_ms),
        ] {
            if value == 0 {
                return Err(ParamError::new(field, "must be at least 1, got 0"));
            }
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err(ParamError::new(
                "max_backoff_ms",
                format!(
                    "must not be below initial_backoff_ms ({}), got {}",
                    self.initial_backoff_ms, self.max_backoff_ms
                ),
            ));
        }
        Ok(())
    }

    /// The wait before the first retry.
    pub fn initial(&self) -> Duration {
        Duration::from_millis(self.initial_backoff_ms)
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }

    /// The wait after `current`: doubled, at most [`max`](Self::max).
    pub fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).min(self.max())
    }

    /// The wait before reconnect attempt `attempt`, counted from 1 as async-nats's
    /// `reconnect_delay_callback` counts: none before the first, then `initial_backoff_ms`
    /// doubled after each failure, at most `max_backoff_ms`. (A NATS client left to its own
    /// default waits up to 4 s whatever the graph says.)
    pub fn before_attempt(&self, attempt: usize) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(attempt - 2).unwrap_or(u32::MAX);
        self.initial()
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum() {
        let settings = RetrySettings {
            initial_backoff_ms: 300,
            max_backoff_ms: 1_000,
        };
        let second = settings.next(settings.initial());
        assert_eq!(second, Duration::from_millis(600));
        assert_eq!(settings.next(second), Duration::from_millis(1_000));
    }

    #[test]
    fn reconnects_start_at_once_then_double_up_to_the_maximum() {
        let settings = RetrySettings {
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        };
        let waits: Vec<u128> = (1..=7)
            .map(|attempt| settings.before_attempt(attempt).as_millis())
            .collect();
        assert_eq!(waits, [0, 50, 100, 200, 400, 500, 500]);
        assert_eq!(settings.before_attempt(0), Duration::ZERO);
        assert_eq!(settings.before_attempt(usize::MAX), settings.max());
    }

    #[test]
    fn a_maximum_below_the_first_wait_is_refused_naming_the_field() {
        let settings = RetrySettings {
            initial_backoff_ms: 5_000,
            max_backoff_ms: 100,
        };
        let error = settings.validate().expect_err("refused");
        assert_eq!(error.field, "max_backoff_ms");
        assert!(error.message.contains("5000"), "{error}");
        assert!(RetrySettings::default().validate().is_ok());
    }

    #[test]
    fn flattened_fields_keep_their_names_and_defaults() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Params {
            #[allow(dead_code)]
            url: String,
            #[serde(flatten)]
            retry: RetrySettings,
        }
        let params: Params =
            serde_json::from_value(serde_json::json!({"url": "x", "max_backoff_ms": 50}))
                .expect("parses");
        assert_eq!(params.retry.initial_backoff_ms, 200);
        assert_eq!(params.retry.max_backoff_ms, 50);
        assert!(
            serde_json::from_value::<Params>(serde_json::json!({"url": "x", "backoff": 1}))
                .is_err(),
            "unknown fields are still refused"
        );
    }
}
