//! An OTLP/HTTP receiver double: what a collector (the OpenTelemetry
//! Collector, Jaeger, Tempo) is to Herald's span exporter. It takes
//! `POST /v1/traces` (protobuf, as the exporter sends it by default),
//! decodes each export and keeps its spans for the tests to read.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use warp::Filter;

/// One received span, its ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// OTLP's span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub service: String,
}

pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<Span>>>,
    pub url: String,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let route = warp::post()
            .and(warp::path!("v1" / "traces"))
            .and(warp::body::bytes())
            .map(move |body: bytes::Bytes| {
                let Ok(export) = ExportTraceServiceRequest::decode(body.as_ref()) else {
                    return warp::http::Response::builder()
                        .status(400)
                        .body(Vec::new())
                        .unwrap();
                };
                let mut kept = kept.lock().unwrap();
                for resource in export.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            kept.push(Span {
                                name: span.name,
                                trace_id: hex::encode(span.trace_id),
                                span_id: hex::encode(span.span_id),
                                parent_span_id: hex::encode(span.parent_span_id),
                                links: span
                                    .links
                                    .iter()
                                    .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                                    .collect(),
                                kind: span.kind,
                                service: service.clone(),
                            });
                        }
                    }
                }
                warp::http::Response::builder()
                    .status(200)
                    .header("content-type", "application/x-protobuf")
                    .body(Vec::new())
                    .unwrap()
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(warp::serve(route).incoming(listener).run());
        OtlpReceiver { spans, url }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}
