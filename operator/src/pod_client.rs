//! Plain HTTP to one server pod (its IP and container port): `/metrics` for the canary analysis
//! and the autoscaler, the golden set for the quality gate. Bounded by a timeout, so a hung pod
//! costs a reconcile seconds, never the controller.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::resources::CONTAINER_PORT;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PodClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for PodClient {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl PodClient {
    /// `GET path` of `pod`; the body of a 200 answer.
    pub async fn get(&self, pod: &Pod, path: &str) -> Result<String, String> {
        self.send(pod, http::Method::GET, path, None).await
    }

    /// `POST path` of `pod` with a JSON body; the body of a 200 answer.
    pub async fn post(&self, pod: &Pod, path: &str, body: String) -> Result<String, String> {
        self.send(pod, http::Method::POST, path, Some(body)).await
    }

    async fn send(
        &self,
        pod: &Pod,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<String, String> {
        let name = pod.name_any();
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .ok_or_else(|| format!("pod {name} has no IP"))?;
        let uri = format!("http://{ip}:{CONTAINER_PORT}{path}");
        let request = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| format!("{uri}: {error}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("pod {name}: {uri}: {error}"))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|error| format!("pod {name}: reading {uri}: {error}"))?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if status.is_success() {
                Ok(text)
            } else {
                Err(format!("pod {name}: {uri} answered {status}: {text}"))
            }
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "pod {name}: {uri} gave no answer within {} s",
                    TIMEOUT.as_secs()
                ))
            })
    }
}
