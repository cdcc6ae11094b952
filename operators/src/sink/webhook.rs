//! `sink.webhook`: sends each result as a prediction message (JSON) to an HTTP(S) endpoint.
//!
//! Requests go out one at a time, in order. Connection errors, timeouts and the answers that mean
//! "try again later" (5xx, 408, 429) are retried with a backoff that doubles from
//! `initial_backoff_ms` to `max_backoff_ms`, at most `retries` times; meanwhile the sink is shown
//! offline in the metrics and its input edge buffers results (its capacity and policy decide
//! whether the pipeline waits or the oldest results are dropped, and every drop is counted). A
//! result that still fails, or that the receiver refuses (another 4xx), is given up, logged and
//! counted as `failed`; the pipeline carries on. After a stop request, waiting ends: each result
//! left gets one attempt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::message::{Dispatch, DispatchParams, InlineImages, OutputFormat};
use crate::contract::{
    EndpointHealth, OpError, OperatorInstance, OperatorKind, PortType, Sink, SinkContext,
    StopSignal,
};
use crate::packet::Packet;
use crate::registry::{OperatorDescriptor, ParamError};
use crate::retry::RetrySettings;
use crate::transform::encode::check_quality;

/// HTTP method of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// POST (the default).
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
}

/// Parameters of `sink.webhook`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookParams {
    /// The endpoint, `http://` or `https://`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// `POST`, `PUT` or `PATCH`.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra request headers (for example `Authorization`); values are never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Time allowed for one request, connection included, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1))]
    pub timeout_ms: u64,
    /// Further attempts after a failed one (connection error, timeout, 5xx, 408, 429).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The wait between attempts (`initial_backoff_ms`, `max_backoff_ms`).
    #[serde(flatten)]
    pub retry: RetrySettings,
    /// JPEG quality of the images sent inline (1-100).
    #[serde(default = "default_image_quality")]
    #[schemars(range(min = 1, max = 100))]
    pub image_quality: u8,
    /// Which results are sent and what they carry (default output format: `predictions`).
    #[serde(flatten)]
    pub dispatch: DispatchParams,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_retries() -> u32 {
    5
}
fn default_image_quality() -> u8 {
    85
}

impl WebhookParams {
    /// The rules the schema cannot express: a well-formed HTTP(S) URL, valid header names and
    /// values, the backoff in order, the dispatch settings and the JPEG quality.
    pub fn validate(&self) -> Result<(), ParamError> {
        parse_url(&self.url)?;
        header_map(&self.headers)?;
        self.retry.validate()?;
        self.dispatch.validate()?;
        check_quality("image_quality", self.image_quality)
    }
}

/// The receiver's URL, which must be `http://` or `https://` (the error never shows credentials).
fn parse_url(text: &str) -> Result<reqwest::Url, ParamError> {
    let url = reqwest::Url::parse(text).map_err(|e| {
        ParamError::new(
            "url",
            format!("'{}' is not a URL: {e}", crate::url::redact_url(text)),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ParamError::new(
            "url",
            format!(
                "'{}' must start with http:// or https://",
                crate::url::redact_url(text)
            ),
        ));
    }
    Ok(url)
}

/// The request headers: JSON content plus the configured ones, marked sensitive (never logged).
fn header_map(configured: &BTreeMap<String, String>) -> Result<HeaderMap, ParamError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in configured {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            ParamError::new("headers", format!("'{name}' is not a valid header name"))
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            ParamError::new("headers", format!("the value of '{name}' is not valid"))
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<WebhookParams>(
        "sink.webhook",
        OperatorKind::Sink,
        "Sends each result as a JSON prediction message to an HTTP(S) endpoint (POST, PUT or PATCH), in order, retrying with backoff while the receiver is down.",
    )
    .input("in", PortType::Image)
    .validate(WebhookParams::validate)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Sink(Box::new(WebhookSink::new(params)?)))
    })
}

/// The running sink.
pub struct WebhookSink {
    client: Client,
    method: reqwest::Method,
    url: reqwest::Url,
    retries: u32,
    retry: RetrySettings,
    dispatch: Dispatch,
    images: InlineImages,
    pipeline: Arc<str>,
    stop: StopSignal,
    health: Arc<EndpointHealth>,
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Worth retrying (connection error, timeout, 5xx, 408, 429).
    Retry(String),
    /// The receiver refused the message; retrying will not help.
    Refused(String),
}

impl WebhookSink {
    /// Checks the parameters and builds the HTTP client (nothing is sent yet).
    pub fn new(mut params: WebhookParams) -> Result<Self, OpError> {
        params.validate()?;
        let url = parse_url(&params.url)?;
        let client = Client::builder()
            .default_headers(header_map(&params.headers)?)
            .timeout(Duration::from_millis(params.timeout_ms))
            .build()
            .map_err(|e| OpError::Failed(format!("cannot build the HTTP client: {e}")))?;
        let dispatch = Dispatch::new(
            std::mem::take(&mut params.dispatch),
            &[OutputFormat::Predictions],
        )?;
        Ok(Self {
            client,
            method: match params.method {
                HttpMethod::Post => reqwest::Method::POST,
                HttpMethod::Put => reqwest::Method::PUT,
                HttpMethod::Patch => reqwest::Method::PATCH,
            },
            url,
            retries: params.retries,
            retry: params.retry,
            dispatch,
            images: InlineImages::new(params.image_quality)?,
            pipeline: Arc::from(""),
            stop: StopSignal::new(),
            health: Arc::default(),
        })
    }

    fn attempt(&self, body: &[u8]) -> Attempt {
        let sent = self
            .client
            .request(self.method.clone(), self.url.clone())
            .body(body.to_vec())
            .send();
        match sent {
            Ok(response) if response.status().is_success() => Attempt::Delivered,
            Ok(response) => {
                let status = response.status();
                let reason = format!(
                    "{} answered {status}",
                    crate::url::redact_url(self.url.as_str())
                );
                if status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Attempt::Retry(reason)
                } else {
                    Attempt::Refused(reason)
                }
            }
            Err(error) => Attempt::Retry(format!(
                "{}: {}",
                crate::url::redact_url(self.url.as_str()),
                error.without_url()
            )),
        }
    }

    /// Sends `body`, retrying as configured; false when it was given up.
    fn deliver(&self, body: &[u8], sequence: u64) -> bool {
        let mut backoff = self.retry.initial();
        let mut attempts_left = self.retries;
        loop {
            match self.attempt(body) {
                Attempt::Delivered => {
                    if self.health.set_online() {
                        tracing::info!(url = %crate::url::redact_url(self.url.as_str()), "webhook receiver is back");
                    }
                    return true;
                }
                Attempt::Refused(reason) => {
                    tracing::warn!("result {sequence} given up: {reason}");
                    return false;
                }
                Attempt::Retry(reason) => {
                    if self.health.set_offline(&reason) {
                        tracing::warn!("webhook receiver unreachable: {reason}");
                    }
                    if attempts_left == 0 || self.stop.is_raised() {
                        tracing::warn!(
                            "result {sequence} given up after {} attempts: {reason}",
                            self.retries + 1 - attempts_left
                        );
                        return false;
                    }
                    attempts_left -= 1;
                    if !self.stop.sleep_until(Instant::now() + backoff) {
                        continue; // stop requested: one last attempt, no more waiting
                    }
                    backoff = self.retry.next(backoff);
                }
            }
        }
    }
}

impl Sink for WebhookSink {
    fn attach(&mut self, ctx: &SinkContext) {
        self.pipeline = Arc::clone(&ctx.pipeline);
        self.stop = ctx.stop.clone();
        self.health = Arc::clone(&ctx.health);
    }

    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        if !self.dispatch.admit(&packet, &self.health) {
            return Ok(());
        }
        let images = self.images.encode(&self.dispatch, &packet)?;
        let message = self.dispatch.message(&self.pipeline, &packet, images);
        let body = serde_json::to_vec(&message)
            .map_err(|e| OpError::Failed(format!("serialising a prediction message: {e}")))?;
        if !self.deliver(&body, packet.frame.sequence) {
            self.health.count_failed();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_never_show() {
        assert_eq!(
            crate::url::redact_url("https://user:secret@example.com/hook"),
            "https://<credentials>@example.com/hook"
        );
        let error = WebhookSink::new(WebhookParams {
            url: "ftp://user:secret@example.com/".into(),
            method: HttpMethod::Post,
            headers: BTreeMap::new(),
            timeout_ms: 100,
            retries: 0,
            retry: RetrySettings::default(),
            image_quality: 85,
            dispatch: DispatchParams::default(),
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("url"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn backoff_out_of_order_is_refused_before_anything_is_built() {
        let descriptor = descriptor();
        let error = descriptor
            .check_params(&serde_json::json!({
                "url": "http://127.0.0.1:9/hook",
                "initial_backoff_ms": 5000,
                "max_backoff_ms": 100
            }))
            .expect_err("refused");
        assert_eq!(error.field, "max_backoff_ms");
        let error = descriptor
            .check_params(&serde_json::json!({"url": "http://x/", "headers": {"bad name": "1"}}))
            .expect_err("refused");
        assert_eq!(error.field, "headers");
    }
}
