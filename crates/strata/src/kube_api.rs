//! What Strata's writers to the Kubernetes API share: calls bounded in time, errors in the
//! core's terms, and events about the objects they act on.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use strata_core::Error;

/// How long one call to the API server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A call the API server refused or did not answer: UNAVAILABLE, retried next round.
pub(crate) fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    let said: String = e.to_string().chars().take(300).collect();
    Error::Unavailable(format!(
        "the Kubernetes API server refused or did not answer ({what}): {said}"
    ))
}

/// Runs a call to the API server, bounded by [`CALL_TIMEOUT`].
pub(crate) async fn call<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| failed(what, "timed out"))?
        .map_err(|e| failed(what, e))
}

/// Whether a kube error is the API server's 404 (already gone).
pub(crate) fn not_found<T>(r: &Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 404)
}

/// A reference to a claim, for events about it.
pub(crate) fn claim_reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

/// What an event says.
pub(crate) struct EventText<'a> {
    /// The prefix of its generated name (`strata-moves-`).
    pub prefix: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
    pub warning: bool,
}

/// Records an event about `object` in `namespace`, from `component` (the driver).
pub(crate) async fn create_event(
    client: &Client,
    component: &str,
    namespace: &str,
    object: ObjectReference,
    text: EventText<'_>,
) -> Result<(), Error> {
    let now = Time(Timestamp::now());
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(text.prefix.into()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        involved_object: object,
        reason: Some(text.reason.into()),
        message: Some(text.message.chars().take(1024).collect()),
        type_: Some(if text.warning { "Warning" } else { "Normal" }.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        source: Some(EventSource {
            component: Some(component.to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    call("create Event", api.create(&PostParams::default(), &event))
        .await
        .map(drop)
}
