//! Logs, metrics and traces.
//!
//! Logs go through `tracing` to stderr, JSON when `log.format = "json"`.
//! Metrics use the `metrics` facade with the Prometheus exporter; `/metrics`
//! on the admin listener renders them. The metric names in [`metrics`] are part
//! of the product contract. Spans go to an OTLP collector when
//! `telemetry.otlp_endpoint` is set, through `tracing-opentelemetry`; the
//! W3C trace context crosses the outbox and the broker ([`traces`]).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, TelemetryConfig};

/// Installs the global `tracing` subscriber: logs to stderr, and spans to
/// an OTLP collector when `telemetry.otlp_endpoint` is set. Safe to call
/// more than once (the first wins). The guard flushes the spans still
/// queued when it is dropped (at exit).
pub fn init_logging(config: &LogConfig, telemetry: &TelemetryConfig) -> TracesGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    // warp logs every connection a client drops mid-response (a closed tab
    // on a live stream) as an ERROR; that is the normal end of a stream, and
    // ten thousand of them would drown the log. Unless asked for explicitly.
    let filter = match format!("{filter}").contains("warp::server") {
        true => filter,
        false => filter.add_directive(
            "warp::server::run=off"
                .parse()
                .unwrap_or_else(|_| tracing_subscriber::filter::LevelFilter::OFF.into()),
        ),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (text, json) = if config.format == "json" {
        let json = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr);
        (None, Some(json))
    } else {
        let text = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        (Some(text), None)
    };
    let (provider, error) = match telemetry.otlp_endpoint.as_deref() {
        Some(endpoint) => match traces::provider(endpoint, &telemetry.service_name) {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let otel = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("herald"))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(error) = error {
        tracing::error!(%error, "telemetry.otlp_endpoint: traces are not exported");
    }
    if installed && provider.is_some() {
        traces::ON.store(true, std::sync::atomic::Ordering::Relaxed);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    TracesGuard(provider.filter(|_| installed))
}

/// Flushes and stops the span exporter when dropped.
pub struct TracesGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for TracesGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// W3C trace context across Herald's seams: a request's `traceparent` is
/// its span's parent; the context an outbox event was committed in is
/// stored with it (`outbox_events.traceparent`) and travels in its envelope;
/// the relay's publish continues that trace, and the consumer's send, which
/// serves many events at once, starts its own trace *linked* to each (the
/// OpenTelemetry messaging convention); the provider request carries its
/// own `traceparent`. All of it is a no-op unless traces are exported.
pub mod traces {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// Whether spans are exported (set once, at start).
    pub(super) static ON: AtomicBool = AtomicBool::new(false);

    pub fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    /// The exporter: OTLP over HTTP/protobuf to `<endpoint>/v1/traces`,
    /// batched off the request path.
    pub(super) fn provider(
        endpoint: &str,
        service: &str,
    ) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
        use opentelemetry_otlp::WithExportConfig;
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name(service.to_string())
                    .build(),
            )
            .build())
    }

    /// The `traceparent` of `span` (`None` when traces are off).
    pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
        if !on() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        carrier.remove("traceparent")
    }

    /// The `traceparent` of the span the caller is in.
    pub fn current() -> Option<String> {
        traceparent_of(&tracing::Span::current())
    }

    /// The context a `traceparent` names (an invalid one names none).
    fn context_of(traceparent: &str) -> opentelemetry::Context {
        let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
        TraceContextPropagator::new().extract(&carrier)
    }

    /// Renames `span` (a server span's name is its route, known only once
    /// routed; the span has started by then).
    pub fn rename(span: &tracing::Span, name: String) {
        if on() {
            span.context().span().update_name(name);
        }
    }

    /// Makes `span` a child of the remote context `traceparent` names.
    pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
        if let (true, Some(parent)) = (on(), traceparent) {
            let _ = span.set_parent(context_of(parent));
        }
    }

    /// Makes `span` a child of an incoming request's `traceparent` header.
    pub fn continue_request(span: &tracing::Span, headers: &http::HeaderMap) {
        let parent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        continue_from(span, parent);
    }

    /// Links `span` to each context of `traceparents` it may.
    pub fn link_to<'a>(span: &tracing::Span, traceparents: impl Iterator<Item = &'a str>) {
        if !on() {
            return;
        }
        for traceparent in traceparents {
            let linked = context_of(traceparent).span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Only an empty bucket list is refused, and none is.
            let recorder = with_buckets(PrometheusBuilder::new())
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist when Herald is embedded in a test
            // binary; then this handle renders only what it records itself.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!(
                metrics::IDEMPOTENCY_REQUESTS,
                "Requests carrying an Idempotency-Key, by resolution"
            );
            metrics::describe_gauge!(
                metrics::REDIS_FALLBACK,
                "1 while idempotency is served by the database without Redis"
            );
            metrics::describe_gauge!(metrics::OUTBOX_PENDING, "Unpublished outbox rows");
            metrics::describe_gauge!(
                metrics::OUTBOX_LAG_SECONDS,
                "Age of the oldest unpublished outbox row"
            );
            metrics::exported_from_the_start();
            handle
        })
        .clone()
}

/// Latency histograms get Prometheus buckets (`_bucket` series, so
/// `histogram_quantile` works across a fleet; the exporter's default is a
/// per-process summary that cannot be aggregated). Request and provider
/// times are short; delivery times include the provider's rate and retries,
/// so their buckets reach minutes.
fn with_buckets(
    builder: PrometheusBuilder,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::Matcher;
    const SHORT: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    const LONG: &[f64] = &[
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    ];
    let per_metric = [
        (metrics::HTTP_REQUEST_DURATION, SHORT),
        (metrics::PROVIDER_REQUEST_DURATION, SHORT),
        (metrics::EMAIL_DELIVERY, LONG),
        (metrics::SSE_DELIVERY, LONG),
    ];
    per_metric
        .iter()
        .try_fold(builder, |builder, (name, buckets)| {
            builder.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
        })
}

/// The contract's metric names and the helpers that record them.
pub mod metrics {
    pub use ::metrics::{describe_counter, describe_gauge, set_global_recorder};

    pub const IDEMPOTENCY_REQUESTS: &str = "herald_idempotency_requests_total";
    pub const REDIS_FALLBACK: &str = "herald_redis_fallback";
    pub const OUTBOX_PENDING: &str = "herald_outbox_pending";
    pub const OUTBOX_LAG_SECONDS: &str = "herald_outbox_lag_seconds";
    pub const HTTP_REQUESTS: &str = "herald_http_requests_total";
    pub const APPLICATIONS_CREATED: &str = "herald_applications_created_total";
    pub const DELIVERY_ATTEMPTS: &str = "herald_delivery_attempts_total";
    pub const DELIVERIES: &str = "herald_deliveries_total";
    pub const EMAILS_SENT: &str = "herald_emails_sent_total";
    pub const RETRY_BUDGET_TOKENS: &str = "herald_retry_budget_tokens";
    pub const RELAY_PUBLISHED: &str = "herald_relay_published_total";
    pub const RELAY_FAILURES: &str = "herald_relay_publish_failures_total";
    /// Publishes of an event published before, by why (`lost`, `unclaimed`, `rescheduled`).
    pub const RELAY_REPUBLISHED: &str = "herald_relay_republished_total";
    /// Requests to the email provider, each carrying up to `email.max_batch` emails, by result.
    pub const EMAIL_REQUESTS: &str = "herald_email_requests_total";
    /// Emails carried by batch requests (a histogram of batch sizes would be
    /// finer; the sum over `herald_email_requests_total` gives the mean).
    pub const EMAIL_BATCHED: &str = "herald_email_batched_total";
    /// Effectively-once invariants the auditor found broken, by invariant (0 is healthy).
    pub const AUDIT_VIOLATIONS: &str = "herald_audit_violations";
    /// Audits the auditor completed.
    pub const AUDIT_RUNS: &str = "herald_audit_runs_total";
    pub const DLQ_DEPTH: &str = "herald_dlq_depth";
    pub const JANITOR_DELETED: &str = "herald_janitor_deleted_total";
    pub const EMAIL_IN_FLIGHT: &str = "herald_email_in_flight";
    pub const EMAIL_IN_FLIGHT_MAX: &str = "herald_email_in_flight_max";
    pub const LEDGER_ENTRIES: &str = "herald_ledger_entries_total";
    pub const EMAILS_DELIVERED: &str = "herald_emails_delivered";
    pub const LEDGER_ROWS: &str = "herald_ledger_entries";
    pub const SSE_CLIENTS: &str = "herald_sse_clients";
    pub const SSE_EVICTED: &str = "herald_sse_evicted_total";
    /// A slow client's older event of a job dropped for its newer one.
    pub const SSE_CONFLATED: &str = "herald_sse_conflated_total";
    /// A slow client's full queue replaced by one snapshot.
    pub const SSE_RESNAPSHOTS: &str = "herald_sse_resnapshots_total";
    pub const SSE_REJECTED: &str = "herald_sse_rejected_total";
    /// Requests refused by a per-client limit, by action.
    pub const RATE_LIMITED: &str = "herald_rate_limited_total";
    pub const SSE_EVENTS: &str = "herald_sse_events_total";
    /// Connections refused at accept, by listener and cap (`max`, `per_ip`);
    /// behind a trusted proxy also a request whose client is over its share.
    pub const CONNECTIONS_REFUSED: &str = "herald_connections_refused_total";
    /// Connections open now, by listener.
    pub const CONNECTIONS_OPEN: &str = "herald_connections_open";
    /// Connections closed because a request head did not arrive in time.
    pub const CONNECTIONS_TIMED_OUT: &str = "herald_connections_header_timeout_total";
    /// Connections reset because the peer took no bytes for the write timeout.
    pub const CONNECTIONS_WRITE_TIMED_OUT: &str = "herald_connections_write_timeout_total";
    /// The email provider's request rate this process paces to now, and
    /// which limiter holds the slots (`fleet`: Redis, shared; `local`).
    pub const EMAIL_PACE: &str = "herald_email_pace_per_sec";
    /// Webhook deliveries from the email provider, by event type and outcome.
    pub const WEBHOOK_EVENTS: &str = "herald_webhook_events_total";

    /// Seconds from a request's head to its answer, by route template and
    /// status class (`2xx` … `5xx`).
    pub const HTTP_REQUEST_DURATION: &str = "herald_http_request_duration_seconds";
    /// Seconds from the commit of an application (its outbox event) to the
    /// provider's acceptance of its confirmation, retries and waits included.
    pub const EMAIL_DELIVERY: &str = "herald_email_delivery_seconds";
    /// Seconds from an event's publish (its stream entry) to its frame's
    /// write to a stream client.
    pub const SSE_DELIVERY: &str = "herald_sse_delivery_seconds";
    /// Seconds of one request to the email provider, by outcome.
    pub const PROVIDER_REQUEST_DURATION: &str = "herald_provider_request_duration_seconds";

    /// 1 when the database answered this scrape in time (what `/readyz`
    /// checks), else 0.
    pub const READY: &str = "herald_ready";

    /// Counters an alert rule or a dashboard panel rates, exported at 0
    /// from the start: a series that appears only with its first event
    /// makes `rate()` miss that event, and a panel read before it dead.
    pub fn exported_from_the_start() {
        ::metrics::counter!(SSE_EVICTED).increment(0);
        ::metrics::counter!(SSE_RESNAPSHOTS).increment(0);
        ::metrics::counter!(SSE_CONFLATED).increment(0);
        ::metrics::counter!(WEBHOOK_EVENTS, "type" => "unverified", "outcome" => "rejected")
            .increment(0);
        ::metrics::counter!(APPLICATIONS_CREATED).increment(0);
        ::metrics::counter!(EMAILS_SENT).increment(0);
    }

    /// Reads of the identity provider's key set, by why (`start`,
    /// `unknown_kid`) and outcome (`ok`, `error`).
    pub const JWKS_FETCHES: &str = "herald_jwks_fetches_total";

    /// One resolved key: `new`, `replay`, `in_flight` or `mismatch`.
    pub fn idempotency_request(outcome: &'static str) {
        ::metrics::counter!(IDEMPOTENCY_REQUESTS, "outcome" => outcome).increment(1);
    }

    pub fn ready(ready: bool) {
        ::metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn jwks_fetch(reason: &'static str, outcome: &'static str) {
        ::metrics::counter!(JWKS_FETCHES, "reason" => reason, "outcome" => outcome).increment(1);
    }

    pub fn redis_fallback(on: bool) {
        ::metrics::gauge!(REDIS_FALLBACK).set(if on { 1.0 } else { 0.0 });
    }

    pub fn outbox(pending: i64, lag_seconds: f64) {
        ::metrics::gauge!(OUTBOX_PENDING).set(pending as f64);
        ::metrics::gauge!(OUTBOX_LAG_SECONDS).set(lag_seconds);
    }

    /// One answered request: its count by status, its duration by class.
    pub fn http_request(route: &'static str, status: u16, took: std::time::Duration) {
        ::metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string())
            .increment(1);
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        ::metrics::histogram!(HTTP_REQUEST_DURATION, "route" => route, "status_class" => class)
            .record(took.as_secs_f64());
    }

    /// One request to the email provider and how it ended (`ok`,
    /// `rate_limited`, `transient`, `permanent`, `reply_invalid`).
    pub fn provider_request(outcome: &'static str, took: std::time::Duration) {
        ::metrics::histogram!(PROVIDER_REQUEST_DURATION, "outcome" => outcome)
            .record(took.as_secs_f64());
    }

    /// A confirmation the provider accepted, `seconds` after its event's commit.
    pub fn email_delivered_after(seconds: f64) {
        ::metrics::histogram!(EMAIL_DELIVERY).record(seconds.max(0.0));
    }

    /// A frame written to a stream client, `seconds` after its event's publish.
    pub fn sse_delivered_after(seconds: f64) {
        ::metrics::histogram!(SSE_DELIVERY).record(seconds.max(0.0));
    }

    /// One webhook delivery: its `type` (one of a fixed set, so the label
    /// stays small) and what became of it.
    pub fn webhook_event(kind: &'static str, outcome: &'static str) {
        ::metrics::counter!(WEBHOOK_EVENTS, "type" => kind, "outcome" => outcome).increment(1);
    }

    pub fn application_created() {
        ::metrics::counter!(APPLICATIONS_CREATED).increment(1);
    }

    /// An attempt at a delivery (1-based), before its outcome is known.
    pub fn delivery_attempt(consumer: &'static str, attempt: i32) {
        ::metrics::counter!(DELIVERY_ATTEMPTS, "consumer" => consumer, "attempt" => attempt.to_string())
            .increment(1);
    }

    /// How a delivered message ended: `ok`, `retry`, `dead`, `deduped` or `deferred`.
    pub fn delivery(consumer: &'static str, result: &'static str) {
        ::metrics::counter!(DELIVERIES, "consumer" => consumer, "result" => result).increment(1);
    }

    pub fn email_sent() {
        ::metrics::counter!(EMAILS_SENT).increment(1);
    }

    pub fn retry_budget_tokens(call_site: &'static str, tokens: f64) {
        ::metrics::gauge!(RETRY_BUDGET_TOKENS, "call_site" => call_site).set(tokens);
    }

    pub fn relay_published(n: usize) {
        ::metrics::counter!(RELAY_PUBLISHED).increment(n as u64);
    }

    /// `n` events published again, and why.
    pub fn relay_republished(reason: &'static str, n: usize) {
        ::metrics::counter!(RELAY_REPUBLISHED, "reason" => reason).increment(n as u64);
    }

    /// One request to the email provider carrying `emails` emails; `result`
    /// is `ok`, `retry`, `deferred` or `dead`.
    pub fn email_request(result: &'static str, emails: usize) {
        ::metrics::counter!(EMAIL_REQUESTS, "result" => result).increment(1);
        ::metrics::counter!(EMAIL_BATCHED).increment(emails as u64);
    }

    /// One audit completed.
    pub fn audit_run() {
        ::metrics::counter!(AUDIT_RUNS).increment(1);
    }

    /// The auditor's latest count of rows breaking `invariant`.
    pub fn audit_violations(invariant: &'static str, rows: i64) {
        ::metrics::gauge!(AUDIT_VIOLATIONS, "invariant" => invariant).set(rows as f64);
    }

    pub fn relay_failure() {
        ::metrics::counter!(RELAY_FAILURES).increment(1);
    }

    /// Sends in progress in this process's EmailSender pool, and the most
    /// there ever were (never above `email.workers`).
    pub fn email_in_flight(now: usize, max: usize) {
        ::metrics::gauge!(EMAIL_IN_FLIGHT).set(now as f64);
        ::metrics::gauge!(EMAIL_IN_FLIGHT_MAX).set(max as f64);
    }

    /// Open dead letters, all topics.
    pub fn dlq_depth(depth: i64) {
        ::metrics::gauge!(DLQ_DEPTH).set(depth as f64);
    }

    /// Rows the janitor deleted from `table`.
    pub fn janitor_deleted(table: &'static str, rows: u64) {
        ::metrics::counter!(JANITOR_DELETED, "table" => table).increment(rows);
    }

    /// The effects as the database records them (read at each scrape): the
    /// same from every process, and unchanged by a restart, unlike the
    /// per-process `_total` counters.
    pub fn durable_effects(emails_delivered: i64, ledger_entries: i64) {
        ::metrics::gauge!(EMAILS_DELIVERED).set(emails_delivered as f64);
        ::metrics::gauge!(LEDGER_ROWS).set(ledger_entries as f64);
    }

    /// A charge applied to the ledger by this process.
    pub fn ledger_entry() {
        ::metrics::counter!(LEDGER_ENTRIES).increment(1);
    }

    /// Stream clients this process's hub is feeding.
    pub fn sse_clients(n: usize) {
        ::metrics::gauge!(SSE_CLIENTS).set(n as f64);
    }

    /// Clients dropped because their queue was full.
    pub fn sse_evicted(n: u64) {
        ::metrics::counter!(SSE_EVICTED).increment(n);
    }

    pub fn sse_conflated(n: u64) {
        ::metrics::counter!(SSE_CONFLATED).increment(n);
    }

    pub fn sse_resnapshots(n: u64) {
        ::metrics::counter!(SSE_RESNAPSHOTS).increment(n);
    }

    /// Connects over the admission rate (answered with `retry:` only).
    pub fn sse_rejected() {
        ::metrics::counter!(SSE_REJECTED).increment(1);
    }

    /// A request refused by a per-client abuse limit (`apply`, `charge`,
    /// `dev_login`, `stream_connect`, `job_list`, `streams_open`).
    pub fn rate_limited(action: &'static str) {
        ::metrics::counter!(RATE_LIMITED, "action" => action).increment(1);
    }

    /// Job events (posted, updated, closed) this process's hub announced.
    pub fn sse_event() {
        ::metrics::counter!(SSE_EVENTS).increment(1);
    }

    /// A connection refused at accept (`reason`: the cap it met).
    pub fn connection_refused(listener: &'static str, reason: &'static str) {
        ::metrics::counter!(CONNECTIONS_REFUSED, "listener" => listener, "reason" => reason)
            .increment(1);
    }

    /// How many connections a listener holds now.
    pub fn connections_open(listener: &'static str, n: usize) {
        ::metrics::gauge!(CONNECTIONS_OPEN, "listener" => listener).set(n as f64);
    }

    /// A connection closed because its request head was overdue.
    pub fn connection_timed_out(listener: &'static str) {
        ::metrics::counter!(CONNECTIONS_TIMED_OUT, "listener" => listener).increment(1);
    }

    /// A connection reset because its peer took no bytes in time.
    pub fn connection_write_timed_out(listener: &'static str) {
        ::metrics::counter!(CONNECTIONS_WRITE_TIMED_OUT, "listener" => listener).increment(1);
    }

    /// The provider rate paced to now, by the limiter in use.
    pub fn email_pace(limiter: &'static str, per_sec: f64) {
        for other in ["fleet", "local"] {
            let value = if other == limiter { per_sec } else { 0.0 };
            ::metrics::gauge!(EMAIL_PACE, "limiter" => other).set(value);
        }
    }
}
