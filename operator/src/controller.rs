//! The reconciler: applies the desired state with server-side apply, writes status, publishes
//! Events, and backs off on errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::autoscaler::{self, Autoscaler, Decision};
use crate::canary;
use crate::config::OperatorConfig;
use crate::crd::{
    AutoscalingSpec, AutoscalingStatus, CanaryStatus, QualityGateSpec, QuantizedModel, Task,
};
use crate::golden;
use crate::metrics::Metrics;
use crate::pod_client::PodClient;
use crate::pod_metrics::{self, PodMetrics};
use crate::resources::{self, DesiredState};
use crate::rollout::{self, CanaryPlan, Plan};
use crate::status::{self, Observation, Rollout};

/// Requeue interval while a rollout is under way, as a safety net next to the Deployment watch.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(30);
/// Periodic resync of a settled model, repairing drift the watches missed.
const RESYNC: Duration = Duration::from_secs(300);
/// How often the autoscaler samples its pods' load; also the requeue of an autoscaled model.
const AUTOSCALE_INTERVAL: Duration = Duration::from_secs(5);
/// Requeue while a canary waits for traffic or for its metrics to be readable.
const CANARY_RECHECK: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per model, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<QuantizedModel>, u32>>,
    /// The autoscaler's state per model, with its last decision (reused until the next
    /// sample is due, so a status write's own watch event changes nothing).
    autoscalers: Mutex<HashMap<ObjectRef<QuantizedModel>, (Autoscaler, Decision)>>,
    pods: PodClient,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: config.field_manager.clone(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            failures: Mutex::default(),
            autoscalers: Mutex::default(),
            pods: PodClient::default(),
        }
    }
}

/// Delay before retry number `attempt` (1-based): 5s doubling up to 5 minutes.
pub fn retry_delay(attempt: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(MAX_RETRY)
}

pub async fn reconcile(model: Arc<QuantizedModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciliations.inc();
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    let Some(namespace) = model.namespace() else {
        warn!(name = %model.name_any(), "QuantizedModel without namespace ignored");
        return Ok(Action::await_change());
    };
    let name = model.name_any();
    let now = Time(Timestamp::now());

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = resources::selector_string(&name);
    // The operator's autoscaler sets the replica count: the model is planned at its count.
    let (model, scaling, listed) = match model.spec.operator_autoscaling() {
        Some(settings) => {
            let pods = pods_api
                .list(&ListParams::default().labels(&selector))
                .await?
                .items;
            let decision = autoscale(&model, settings, &pods, &now, &ctx).await;
            let mut scaled = model.as_ref().clone();
            scaled.spec.replicas = decision.desired;
            (Arc::new(scaled), Some(decision), Some(pods))
        }
        None => (model, None, None),
    };

    let plan = Plan::of(&model);
    let rendered = resources::desired_state(&plan.model(&model), &ctx.config).and_then(|desired| {
        let canary = plan
            .canary
            .as_ref()
            .map(|canary| resources::canary_deployment(&canary_model(&model, canary), &ctx.config))
            .transpose()?;
        Ok((desired, canary))
    });
    let (new_status, action) = match rendered {
        Err(error) => {
            ctx.metrics.invalid_specs.inc();
            warn!(%namespace, %name, %error, "spec cannot be served; nothing applied");
            // Only a spec change can fix it, and that triggers a reconcile by itself.
            let status = status::status(&model, &Observation::Invalid(&error), &now);
            (status, Action::await_change())
        }
        Ok((desired, canary_deployment)) => {
            let deployment = apply(&model, &desired, &namespace, &ctx).await?;
            if let Some(canary_deployment) = &canary_deployment {
                apply_canary(canary_deployment, &namespace, &ctx).await?;
            }
            let pods = match listed {
                Some(pods) => pods,
                None => {
                    pods_api
                        .list(&ListParams::default().labels(&desired.selector))
                        .await?
                        .items
                }
            };
            let mut verdict = rollout::judge(&model, &plan, &deployment, &pods, &now);
            let mut judged_canary = None;
            let mut promote = false;
            if let (rollout::Verdict::Proceed, Some(canary)) = (&verdict, &plan.canary) {
                match judge_canary(&model, canary, &pods, &now, &ctx).await {
                    canary::Verdict::Continue(status) => judged_canary = Some(status),
                    canary::Verdict::Promote(status) => {
                        ctx.metrics
                            .canary_verdicts
                            .with_label_values(&["promoted"])
                            .inc();
                        info!(%namespace, %name, version = %status.version, message = %status.message,
                            "canary passed; promoting");
                        judged_canary = Some(status);
                        promote = true;
                    }
                    canary::Verdict::Fail {
                        status,
                        reason,
                        message,
                    } => {
                        ctx.metrics
                            .canary_verdicts
                            .with_label_values(&["rolled_back"])
                            .inc();
                        verdict = rollout::roll_back(
                            &model,
                            &status.version,
                            reason.to_owned(),
                            message,
                            &now,
                        );
                        judged_canary = Some(status);
                    }
                }
            }
            let next = if promote {
                Some(plan.promoted(&model))
            } else {
                plan.after(verdict)
            };
            let (plan, desired, deployment) = match next {
                Some(next) => match next_step(&model, next, &namespace, &ctx).await? {
                    Some(applied) => applied,
                    None => (plan, desired, deployment),
                },
                None => (plan, desired, deployment),
            };
            if plan.canary.is_none() && canary_may_run(&model, &pods) {
                scale_canary_to_zero(&name, &namespace, &ctx).await?;
            }
            let status = status::status(
                &model,
                &Observation::Applied {
                    plan: &plan,
                    desired: &desired,
                    deployment: &deployment,
                    pods: &pods,
                },
                &now,
            );
            let mut status = status::with_canary(status, &model, judged_canary, &now);
            status.autoscaling = scaling.as_ref().zip(model.spec.operator_autoscaling()).map(
                |(decision, settings)| {
                    autoscaling_status(&model, settings, decision, &status, &now)
                },
            );
            let mut action = match status::rollout(&deployment) {
                Rollout::InProgress(_) => Action::requeue(ROLLOUT_RECHECK),
                Rollout::Complete | Rollout::Stalled(_) => Action::requeue(RESYNC),
            };
            if let Some(canary) = plan.canary.as_ref().zip(status.canary.as_ref()) {
                action = Action::requeue(canary_recheck(canary.0, canary.1, &now));
            }
            if scaling.is_some() {
                action = Action::requeue(AUTOSCALE_INTERVAL);
            }
            (status, action)
        }
    };

    if model.status.as_ref() != Some(&new_status) {
        let models: Api<QuantizedModel> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": QuantizedModel::api_version(&()),
            "kind": QuantizedModel::kind(&()),
            "status": new_status,
        });
        models
            .patch_status(&name, &apply_params(&ctx.config), &Patch::Apply(&patch))
            .await?;
    }
    let reference = model.object_ref(&());
    for event in status::events(model.status.as_ref(), &new_status) {
        // An Event lost to a transient error is not worth re-applying everything for.
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%namespace, %name, reason = %event.reason, %error, "publishing Event failed");
        }
    }
    ctx.failures
        .lock()
        .expect("failure map lock poisoned")
        .remove(&ObjectRef::from(model.as_ref()));
    Ok(action)
}

/// Applies the rollout's next step (the last good spec, or pods replaced one at a time): the
/// plan, desired state and stored Deployment in force afterwards, or `None` if the step cannot
/// be rendered (the operator's configuration changed under it) and the spec's stays applied.
async fn next_step(
    model: &QuantizedModel,
    next: Plan,
    namespace: &str,
    ctx: &Context,
) -> Result<Option<(Plan, DesiredState, Deployment)>, kube::Error> {
    let name = model.name_any();
    let desired = match resources::desired_state(&next.model(model), &ctx.config) {
        Ok(desired) => desired,
        Err(error) => {
            warn!(%namespace, %name, %error, "the rollout's next step cannot be rendered");
            return Ok(None);
        }
    };
    match &next.rollback {
        Some(rollback) => {
            ctx.metrics.rollbacks.inc();
            warn!(%namespace, %name, failed = %rollback.failed_version,
                to = %rollback.rolled_back_to, reason = %rollback.reason,
                "rollout failed; rolling back");
        }
        None if next.one_at_a_time => {
            info!(%namespace, %name, "no spare GPU for a surge pod; replacing pods one at a time")
        }
        None => {
            info!(%namespace, %name, version = %next.version(), "rolling out the promoted canary's version")
        }
    }
    let deployment = apply(model, &desired, namespace, ctx).await?;
    Ok(Some((next, desired, deployment)))
}

/// The model as its canary Deployment renders it: the canary's spec.
fn canary_model(model: &QuantizedModel, canary: &CanaryPlan) -> QuantizedModel {
    QuantizedModel {
        spec: canary.spec.clone(),
        ..model.clone()
    }
}

async fn apply_canary(
    deployment: &Deployment,
    namespace: &str,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    deployments
        .patch(
            deployment.metadata.name.as_deref().unwrap_or_default(),
            &apply_params(&ctx.config),
            &Patch::Apply(deployment),
        )
        .await?;
    Ok(())
}

/// Whether a canary Deployment may still have pods: canary pods are listed, or the last status
/// had a canary starting or under analysis.
fn canary_may_run(model: &QuantizedModel, pods: &[Pod]) -> bool {
    use crate::crd::CanaryPhase;
    pods.iter().any(is_canary)
        || model
            .status
            .as_ref()
            .and_then(|s| s.canary.as_ref())
            .is_some_and(|c| matches!(c.phase, CanaryPhase::Starting | CanaryPhase::Analysing))
}

fn is_canary(pod: &Pod) -> bool {
    pod.labels().get(resources::TRACK_LABEL).map(String::as_str) == Some(resources::CANARY)
}

/// Ends a canary: its Deployment goes to zero replicas (the operator may not delete
/// Deployments; the next canary reuses it). Its pods drain like any replaced pod.
async fn scale_canary_to_zero(
    name: &str,
    namespace: &str,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let zero = json!({"spec": {"replicas": 0}});
    match deployments
        .patch(
            &resources::canary_name(name),
            &PatchParams::default(),
            &Patch::Merge(&zero),
        )
        .await
    {
        Ok(_) => {
            info!(%namespace, %name, "canary scaled to zero");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(error) => Err(error),
    }
}

fn ready_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<&'a Pod> {
    pods.into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && rollout::ready(pod))
        .collect()
}

/// Each pod's `/metrics`, parsed.
async fn scrape(pods: &[&Pod], ctx: &Context) -> Vec<Result<PodMetrics, String>> {
    futures::future::join_all(pods.iter().map(|pod| async {
        let text = ctx.pods.get(pod, "/metrics").await?;
        Ok(pod_metrics::parse(&text))
    }))
    .await
}

/// Measures and judges the canary in force: its pods' failures, readiness, the quality gate
/// once they are Ready, and its and the stable pods' metrics once the window is over.
async fn judge_canary(
    model: &QuantizedModel,
    canary: &CanaryPlan,
    pods: &[Pod],
    now: &Time,
    ctx: &Context,
) -> canary::Verdict {
    let version = &canary.status.version;
    let canary_pods: Vec<&Pod> = pods
        .iter()
        .filter(|pod| {
            is_canary(pod) && pod.labels().get(resources::MODEL_VERSION_KEY) == Some(version)
        })
        .collect();
    if let Some((reason, message)) = rollout::pod_failure(&canary.spec, &canary_pods, now) {
        // A canary that cannot run fails like a rollout that cannot; the reason is its pods'.
        let reason = match reason.as_str() {
            status::IMAGE_PULL_BACK_OFF => status::IMAGE_PULL_BACK_OFF,
            status::CRASH_LOOP_BACK_OFF => status::CRASH_LOOP_BACK_OFF,
            rollout::NOT_READY => rollout::NOT_READY,
            _ => canary::CANARY_POD_FAILED,
        };
        return canary::fail(canary.status.clone(), reason, message);
    }
    let ready = ready_pods(canary_pods.iter().copied());
    let ready_count = i32::try_from(ready.len()).unwrap_or(i32::MAX);
    let quality = match &canary.settings.quality_gate {
        Some(gate) if canary::needs_quality_gate(&canary.settings, &canary.status, ready_count) => {
            Some(quality_gate(model, gate, &ready, ctx).await)
        }
        _ => None,
    };
    // An analysis that starts in this reconcile is not over in it (analysisSeconds >= 1).
    let (canary_metrics, stable_metrics);
    let metrics = if canary::window_over(&canary.settings, &canary.status, now) {
        let canary_read: Result<Vec<PodMetrics>, String> =
            scrape(&ready, ctx).await.into_iter().collect();
        let stable = ready_pods(pods.iter().filter(|pod| !is_canary(pod)));
        // The baseline is best effort: a stable pod that cannot be read is left out.
        stable_metrics = PodMetrics::sum(scrape(&stable, ctx).await.iter().flatten());
        match canary_read {
            Ok(read) => {
                canary_metrics = PodMetrics::sum(&read);
                Some(Ok((&canary_metrics, &stable_metrics)))
            }
            Err(error) => Some(Err(error)),
        }
    } else {
        None
    };
    canary::judge(
        &canary.settings,
        canary.spec.rollout.ready_timeout_seconds,
        canary.spec.model.task == Task::Rerank,
        &canary.status,
        &canary::Observed {
            ready_pods: ready_count,
            metrics,
            quality,
        },
        now,
    )
}

/// Sends the golden set of `gate` to every Ready canary pod: the lowest cosine (embeddings) or
/// rank agreement (rankings) any of them gave.
async fn quality_gate(
    model: &QuantizedModel,
    gate: &QualityGateSpec,
    pods: &[&Pod],
    ctx: &Context,
) -> Result<f64, String> {
    let namespace = model.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_map = config_maps
        .get(&gate.config_map)
        .await
        .map_err(|error| format!("reading ConfigMap {}: {error}", gate.config_map))?;
    let text = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(&gate.key))
        .ok_or_else(|| format!("ConfigMap {} has no key {}", gate.config_map, gate.key))?;
    let task = model.spec.model.task;
    let set = golden::parse(text, task)
        .map_err(|error| format!("ConfigMap {} key {}: {error}", gate.config_map, gate.key))?;
    let embed_request = golden::embed_request(&set);
    let mut lowest = f64::INFINITY;
    for pod in pods {
        let measured = match task {
            Task::Embed => {
                let answer = ctx.pods.post(pod, "/embed", embed_request.clone()).await?;
                golden::min_cosine(&set, &answer)?
            }
            Task::Rerank => {
                let mut low = f64::INFINITY;
                for ranking in &set.rankings {
                    let answer = ctx
                        .pods
                        .post(pod, "/rerank", golden::rerank_request(ranking))
                        .await?;
                    low = low.min(golden::rank_agreement(ranking, &answer)?);
                }
                low
            }
        };
        lowest = lowest.min(measured);
    }
    if lowest.is_finite() {
        Ok(lowest)
    } else {
        Err("no Ready canary pod to send the golden set to".to_owned())
    }
}

/// When to look at a judged canary again: at the end of its window, or shortly while it waits
/// for traffic or metrics; pod changes trigger reconciles of their own.
fn canary_recheck(canary: &CanaryPlan, status: &CanaryStatus, now: &Time) -> Duration {
    match canary::seconds_left(&canary.settings, status, now) {
        Some(left) if left > 0 => Duration::from_secs(left.unsigned_abs()),
        Some(_) => CANARY_RECHECK,
        None => ROLLOUT_RECHECK,
    }
}

/// The autoscaler's decision for `model`: a new sample of its Ready pods' load when one is due,
/// else the last decision.
async fn autoscale(
    model: &QuantizedModel,
    settings: &AutoscalingSpec,
    pods: &[Pod],
    now: &Time,
    ctx: &Context,
) -> Decision {
    let key = ObjectRef::from(model);
    let seconds = now.0.as_millisecond() as f64 / 1000.0;
    let (min, max) = autoscaler::bounds(settings);
    let current = model
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .map_or(model.spec.replicas, |a| a.desired_replicas)
        .clamp(min, max);
    if let Some((scaler, last)) = ctx
        .autoscalers
        .lock()
        .expect("autoscaler lock poisoned")
        .get(&key)
        && !scaler.due(seconds, AUTOSCALE_INTERVAL.as_secs_f64())
    {
        return last.clone();
    }
    let ready = ready_pods(pods);
    let read: Vec<f64> = scrape(&ready, ctx)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .map(|pod| pod.gauge(settings.metric))
        .collect();
    // Pods that could not be read are counted at the average of those that could.
    let total = (!read.is_empty())
        .then(|| read.iter().sum::<f64>() / read.len() as f64 * ready.len() as f64);
    let mut autoscalers = ctx.autoscalers.lock().expect("autoscaler lock poisoned");
    let (scaler, last) = autoscalers
        .entry(key)
        .or_insert_with(|| (Autoscaler::default(), Decision::default()));
    *last = scaler.sample(settings, current, total, seconds);
    let labels = [model.namespace().unwrap_or_default(), model.name_any()];
    let labels = [labels[0].as_str(), labels[1].as_str()];
    ctx.metrics
        .autoscaler_desired_replicas
        .with_label_values(&labels)
        .set(i64::from(last.desired));
    if let Some(signal) = last.signal {
        ctx.metrics
            .autoscaler_signal
            .with_label_values(&labels)
            .set(signal);
    }
    last.clone()
}

fn autoscaling_status(
    model: &QuantizedModel,
    settings: &AutoscalingSpec,
    decision: &Decision,
    status: &crate::crd::QuantizedModelStatus,
    now: &Time,
) -> AutoscalingStatus {
    let previous = model.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let changed = previous.is_some_and(|p| p.desired_replicas != decision.desired);
    AutoscalingStatus {
        metric: settings.metric,
        desired_replicas: decision.desired,
        current_replicas: status.ready_replicas,
        signal: decision
            .signal
            .map_or_else(|| "n/a".to_owned(), canary::figure),
        target_per_replica: canary::figure(settings.target_per_replica),
        last_scale_time: if changed {
            Some(now.clone())
        } else {
            previous.and_then(|p| p.last_scale_time.clone())
        },
        message: decision.message.clone(),
    }
}

fn apply_params(config: &OperatorConfig) -> PatchParams {
    PatchParams::apply(&config.field_manager).force()
}

/// Applies the Deployment, Service and PodDisruptionBudget; returns the Deployment as stored.
async fn apply(
    model: &QuantizedModel,
    desired: &DesiredState,
    namespace: &str,
    ctx: &Context,
) -> Result<Deployment, kube::Error> {
    let name = model.name_any();
    let params = apply_params(&ctx.config);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let deployment = deployments
        .patch(&name, &params, &Patch::Apply(&desired.deployment))
        .await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    services
        .patch(&name, &params, &Patch::Apply(&desired.service))
        .await?;

    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
    match &desired.pod_disruption_budget {
        Some(budget) => {
            budgets.patch(&name, &params, &Patch::Apply(budget)).await?;
        }
        // A budget exists only if an earlier generation had several replicas, so an unchanged
        // generation needs no delete call.
        None if spec_changed_since_last_status(model) => {
            match budgets.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(%namespace, %name, "deleted PodDisruptionBudget of a single-replica model")
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(error) => return Err(error),
            }
        }
        None => {}
    }
    Ok(deployment)
}

fn spec_changed_since_last_status(model: &QuantizedModel) -> bool {
    model.status.as_ref().and_then(|s| s.observed_generation) != model.metadata.generation
}

pub fn error_policy(model: Arc<QuantizedModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.metric_label()])
        .inc();
    let attempt = {
        let mut failures = ctx.failures.lock().expect("failure map lock poisoned");
        let count = failures.entry(ObjectRef::from(model.as_ref())).or_insert(0);
        *count += 1;
        *count
    };
    let delay = retry_delay(attempt);
    warn!(
        namespace = model.namespace().unwrap_or_default(),
        name = %model.name_any(),
        %error,
        attempt,
        retry_in_seconds = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` completes: cluster-wide when `namespaces` is empty,
/// otherwise one controller per namespace, so a namespaced install needs only Roles there.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: &[String],
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces
            .iter()
            .map(|namespace| Some(namespace.as_str()))
            .collect()
    };
    futures::future::join_all(
        scopes
            .into_iter()
            .map(|scope| run_scope(ctx.clone(), scope, shutdown.clone())),
    )
    .await;
}

/// Backoff of the controller's watches. One backoff pauses the merged stream of all five
/// watches, so after an apiserver outage every watch's 410/reconnect error adds a pause:
/// kube's default (up to 30 s, reset after 120 s quiet) kept the operator blind for minutes.
/// A 5 s cap is still gentle on a struggling apiserver.
fn trigger_backoff() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(exponential.into(), Duration::from_secs(30))
}

/// `Api::all` for the cluster-wide scope, else the namespace's.
fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    }
}

async fn run_scope(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Children are matched to their owner through owner references; the label keeps the
    // watches to objects this operator manages.
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        resources::MANAGED_BY_LABEL,
        resources::MANAGED_BY
    ));
    Controller::new(
        scoped::<QuantizedModel>(client.clone(), namespace),
        watcher::Config::default().any_semantic(),
    )
    .owns(
        scoped::<Deployment>(client.clone(), namespace),
        managed.clone(),
    )
    .owns(
        scoped::<Service>(client.clone(), namespace),
        managed.clone(),
    )
    .owns(
        scoped::<PodDisruptionBudget>(client.clone(), namespace),
        managed,
    )
    // Pods belong to ReplicaSets, not to the model: they map to it by their model label. A
    // pod that cannot pull its image or keeps crashing changes its status but not the
    // Deployment's, and Degraded must say so.
    .watches(
        scoped::<Pod>(client, namespace),
        watcher::Config::default().labels(&format!(
            "{}={}",
            resources::NAME_LABEL,
            resources::SERVER_NAME
        )),
        |pod| {
            let model = pod.labels().get(resources::MODEL_LABEL)?;
            Some(ObjectRef::<QuantizedModel>::new(model).within(&pod.namespace()?))
        },
    )
    .trigger_backoff(trigger_backoff())
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            warn!(%error, "controller error");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tokio::time::timeout;
    use tower_test::mock::{self, Handle};

    use super::*;
    use crate::crd::QuantizedModelStatus;
    use crate::testing::{merge, model, rolling_from_1_to_2};

    const APPLY_QUERY: &str = "?&force=true&fieldManager=qmodel-operator";

    /// A fake API server: each call expects one request and answers it (the ApiServerVerifier
    /// pattern of kube-rs/controller-rs). A request nobody answers stalls the reconcile, and the
    /// test times out.
    struct ApiServer(Handle<Request<Body>, Response<Body>>);

    impl ApiServer {
        /// Expects `method` on `uri`, answers `status` with `respond(request body)`, and returns
        /// the request body.
        async fn expect(
            &mut self,
            method: Method,
            uri: &str,
            status: StatusCode,
            respond: impl FnOnce(&Value) -> Value,
        ) -> Value {
            let (request, send) = self
                .0
                .next_request()
                .await
                .expect("the reconciler sent a request");
            assert_eq!(
                (request.method(), request.uri().to_string().as_str()),
                (&method, uri)
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let response = serde_json::to_vec(&respond(&body)).unwrap();
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(response))
                    .unwrap(),
            );
            body
        }

        /// Server-side apply of `kind` (plural `resource` of `api`) named bge in namespace ml;
        /// the stored object is the applied one plus `stored`.
        async fn apply(&mut self, api: &str, resource: &str, stored: Value) -> Value {
            let uri = format!("{api}/namespaces/ml/{resource}/bge{APPLY_QUERY}");
            self.expect(Method::PATCH, &uri, StatusCode::OK, |body| {
                let mut object = body.clone();
                merge(&mut object, stored);
                object
            })
            .await
        }

        async fn apply_deployment(&mut self, stored: Value) -> Value {
            self.apply("/apis/apps/v1", "deployments", stored).await
        }

        async fn apply_service(&mut self) -> Value {
            self.apply("/api/v1", "services", json!({})).await
        }

        async fn apply_status(&mut self) -> QuantizedModelStatus {
            let uri = format!(
                "/apis/serving.qmodel.dev/v1alpha1/namespaces/ml/quantizedmodels/bge/status{APPLY_QUERY}"
            );
            let body = self
                .expect(Method::PATCH, &uri, StatusCode::OK, |body| {
                    let mut stored = serde_json::to_value(model(json!({}))).unwrap();
                    merge(&mut stored, body.clone());
                    stored
                })
                .await;
            assert_eq!(body["kind"], "QuantizedModel");
            serde_json::from_value(body["status"].clone()).unwrap()
        }

        /// The list of the model's pods by its selector; answers with `pods`.
        async fn list_pods(&mut self, pods: Value) {
            let uri = "/api/v1/namespaces/ml/pods?&labelSelector=app.kubernetes.io%2Finstance%3Dbge%2Capp.kubernetes.io%2Fname%3Dqmodel-server%2Cserving.qmodel.dev%2Fmodel%3Dbge";
            self.expect(
                Method::GET,
                uri,
                StatusCode::OK,
                |_| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
            )
            .await;
        }

        async fn event(&mut self) -> Value {
            self.expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ml/events?",
                StatusCode::CREATED,
                Value::clone,
            )
            .await
        }
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    fn context(config: OperatorConfig) -> (Arc<Context>, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let ctx = Context::new(
            client,
            config,
            Arc::new(Metrics::default()),
            Some("operator-0".to_owned()),
        );
        (Arc::new(ctx), ApiServer(handle))
    }

    /// Runs one reconcile of `qm` against `scenario`; both must finish.
    async fn reconcile_with<F>(
        qm: QuantizedModel,
        ctx: &Arc<Context>,
        server: ApiServer,
        scenario: impl FnOnce(ApiServer) -> F,
    ) -> (Result<Action, Error>, ApiServer)
    where
        F: Future<Output = ApiServer>,
    {
        timeout(Duration::from_secs(5), async {
            tokio::join!(reconcile(Arc::new(qm), ctx.clone()), scenario(server))
        })
        .await
        .expect("reconcile and scenario finish: no unexpected or missing request")
    }

    /// [`reconcile_with`] on a fresh context.
    async fn reconcile_against<F>(
        qm: QuantizedModel,
        config: OperatorConfig,
        scenario: impl FnOnce(ApiServer) -> F,
    ) -> (Result<Action, Error>, Arc<Context>)
    where
        F: Future<Output = ApiServer>,
    {
        let (ctx, server) = context(config);
        let (result, _server) = reconcile_with(qm, &ctx, server, scenario).await;
        (result, ctx)
    }

    fn rolled_out(generation: i64, replicas: i32) -> Value {
        json!({
            "metadata": {"generation": generation},
            "status": {
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            },
        })
    }

    fn condition<'a>(status: &'a QuantizedModelStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[tokio::test]
    async fn create_applies_children_then_status_then_event() {
        let (result, _) = reconcile_against(
            model(json!({})),
            OperatorConfig::default(),
            |mut api| async move {
                let deployment = api
                    .apply_deployment(json!({"metadata": {"generation": 1}}))
                    .await;
                assert_eq!(deployment["kind"], "Deployment");
                assert_eq!(
                    deployment["metadata"]["ownerReferences"][0]["uid"],
                    "0b9e-uid"
                );
                assert_eq!(
                    deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                    "ghcr.io/qmodel/qmodel-server:1.0.0-int8"
                );
                let service = api.apply_service().await;
                assert_eq!(service["kind"], "Service");
                // A first reconcile clears any budget left from a multi-replica past.
                api.expect(
                    Method::DELETE,
                    "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/bge?",
                    StatusCode::NOT_FOUND,
                    |_| not_found(),
                )
                .await;
                api.list_pods(json!([])).await;
                let status = api.apply_status().await;
                assert_eq!(condition(&status, "Progressing"), ("True", "RollingOut"));
                assert_eq!(status.desired_version.as_deref(), Some("1.0.0"));
                assert_eq!(
                    status.endpoint.as_deref(),
                    Some("http://bge.ml.svc.cluster.local:8080")
                );
                let event = api.event().await;
                assert_eq!(
                    (event["reason"].as_str(), event["type"].as_str()),
                    (Some("Created"), Some("Normal"))
                );
                assert_eq!(event["regarding"]["name"], "bge");
                assert_eq!(event["reportingInstance"], "operator-0");
                api
            },
        )
        .await;
        assert_eq!(result.unwrap(), Action::requeue(ROLLOUT_RECHECK));
    }

    #[tokio::test]
    async fn version_update_applies_new_template_and_budget_and_reports_the_rollout() {
        let mut qm = model(json!({"replicas": 2, "model": {"version": "2.0.0"}}));
        qm.metadata.generation = Some(2);
        qm.status = Some(QuantizedModelStatus {
            observed_generation: Some(1),
            current_version: Some("1.0.0".into()),
            desired_version: Some("1.0.0".into()),
            image: Some("ghcr.io/qmodel/qmodel-server:1.0.0-int8".into()),
            ..QuantizedModelStatus::default()
        });
        let (result, _) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            let mut stored = rolled_out(5, 2);
            stored["status"]["updatedReplicas"] = json!(1);
            stored["status"]["replicas"] = json!(3);
            let deployment = api.apply_deployment(stored).await;
            assert_eq!(
                deployment["spec"]["template"]["metadata"]["annotations"]["serving.qmodel.dev/model-version"],
                "2.0.0"
            );
            api.apply_service().await;
            let budget = api.apply("/apis/policy/v1", "poddisruptionbudgets", json!({})).await;
            assert_eq!(budget["spec"]["maxUnavailable"], 1);
            api.list_pods(json!([])).await;
            let status = api.apply_status().await;
            assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
            assert_eq!(status.desired_version.as_deref(), Some("2.0.0"));
            assert_eq!((status.replicas, status.updated_replicas), (3, 1));
            assert_eq!(api.event().await["reason"], "Updated");
            assert_eq!(api.event().await["note"], "rolling out version 2.0.0 (from 1.0.0)");
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(ROLLOUT_RECHECK));
    }

    #[tokio::test]
    async fn settled_model_writes_no_status_and_no_events() {
        let mut qm = model(json!({}));
        // The status a previous reconcile wrote for this very generation.
        let desired = resources::desired_state(&qm, &OperatorConfig::default()).unwrap();
        let mut deployment = desired.deployment.clone();
        let stored = rolled_out(3, 1);
        deployment.metadata.generation = Some(3);
        deployment.status = serde_json::from_value(stored["status"].clone()).unwrap();
        let now = Time(Timestamp::now());
        qm.status = Some(status::status(
            &qm,
            &Observation::Applied {
                plan: &Plan::of(&qm),
                desired: &desired,
                deployment: &deployment,
                pods: &[],
            },
            &now,
        ));
        assert_eq!(
            condition(qm.status.as_ref().unwrap(), "Ready"),
            ("True", "Available")
        );

        let (result, _) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            api.apply_deployment(stored).await;
            api.apply_service().await;
            api.list_pods(json!([])).await;
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    }

    #[tokio::test]
    async fn stalled_rollout_is_reported_as_degraded() {
        let qm = rolling_from_1_to_2();
        let (result, _) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            let mut stored = rolled_out(4, 1);
            stored["status"]["replicas"] = json!(2);
            stored["status"]["conditions"] = json!([{
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"bge-5d4\" has timed out progressing.",
            }]);
            api.apply_deployment(stored).await;
            api.apply_service().await;
            api.list_pods(json!([])).await;
            let status = api.apply_status().await;
            assert_eq!(
                condition(&status, "Degraded"),
                ("True", "ProgressDeadlineExceeded")
            );
            assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
            let event = api.event().await;
            assert_eq!(
                (event["reason"].as_str(), event["type"].as_str()),
                (Some("RolloutStalled"), Some("Warning"))
            );
            assert_eq!(
                event["note"],
                "ReplicaSet \"bge-5d4\" has timed out progressing."
            );
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    }

    #[tokio::test]
    async fn a_crash_looping_new_version_is_degraded_with_its_termination_message() {
        let qm = rolling_from_1_to_2();
        let (result, _) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            let mut stored = rolled_out(4, 1);
            stored["status"]["replicas"] = json!(2);
            api.apply_deployment(stored).await;
            api.apply_service().await;
            let server = |version: &str, state: Value| {
                let mut container = json!({
                    "name": "server",
                    "image": format!("ghcr.io/qmodel/qmodel-server:{version}-int8"),
                    "imageID": "",
                    "ready": false,
                    "restartCount": 2,
                });
                merge(&mut container, state);
                json!({
                    "metadata": {
                        "name": format!("bge-{version}"),
                        "namespace": "ml",
                        "labels": {
                            "serving.qmodel.dev/model": "bge",
                            "serving.qmodel.dev/model-version": version,
                        },
                    },
                    "status": {"containerStatuses": [container]},
                })
            };
            api.list_pods(json!([
                server("1.0.0", json!({"ready": true, "state": {"running": {}}})),
                server("2.0.0", json!({
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": "qmodel-server: model.gguf: truncated"}},
                })),
            ]))
            .await;
            let status = api.apply_status().await;
            assert_eq!(condition(&status, "Degraded"), ("True", "CrashLoopBackOff"));
            assert_eq!(condition(&status, "Available"), ("True", "ReplicasAvailable"));
            let event = api.event().await;
            assert_eq!(
                (event["reason"].as_str(), event["type"].as_str()),
                (Some("CrashLoopBackOff"), Some("Warning"))
            );
            assert_eq!(
                event["note"],
                "pod bge-2.0.0 (version 2.0.0): container server exited with code 1: qmodel-server: model.gguf: truncated"
            );
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(ROLLOUT_RECHECK));
    }

    #[tokio::test]
    async fn a_crash_looping_new_version_is_rolled_back_to_the_last_good_one_at_once() {
        let qm = crate::testing::rolling_from_good_1_to_2();
        let (result, ctx) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            let mut stored = rolled_out(4, 1);
            stored["status"]["replicas"] = json!(2);
            let failed = api.apply_deployment(stored.clone()).await;
            assert_eq!(
                failed["spec"]["template"]["metadata"]["labels"]["serving.qmodel.dev/model-version"],
                "2.0.0"
            );
            api.apply_service().await;
            api.list_pods(json!([{
                "metadata": {
                    "name": "bge-new",
                    "namespace": "ml",
                    "labels": {"serving.qmodel.dev/model": "bge", "serving.qmodel.dev/model-version": "2.0.0"},
                },
                "status": {"containerStatuses": [{
                    "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                    "state": {"waiting": {"reason": "ImagePullBackOff"}},
                }]},
            }]))
            .await;
            // The same reconcile applies the last good spec again.
            let good = api.apply_deployment(stored).await;
            let template = &good["spec"]["template"];
            assert_eq!(template["metadata"]["labels"]["serving.qmodel.dev/model-version"], "1.0.0");
            assert_eq!(
                template["spec"]["containers"][0]["image"],
                "ghcr.io/qmodel/qmodel-server:1.0.0-int8"
            );
            api.apply_service().await;
            let status = api.apply_status().await;
            assert_eq!(condition(&status, "RolledBack"), ("True", "ImagePullBackOff"));
            assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
            assert_eq!(status.desired_version.as_deref(), Some("2.0.0"));
            let rollback = status.rollback.unwrap();
            assert_eq!((rollback.failed_version.as_str(), rollback.rolled_back_to.as_str()), ("2.0.0", "1.0.0"));
            let event = api.event().await;
            assert_eq!(
                (event["reason"].as_str(), event["type"].as_str()),
                (Some("RolledBack"), Some("Warning"))
            );
            api.event().await;
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(ROLLOUT_RECHECK));
        assert!(
            ctx.metrics
                .render()
                .contains("qmodel_operator_rollbacks_total 1")
        );
    }

    /// A model at 2.0.0 with a canary, while 1.0.0 is its last good version.
    fn canary_of_2_beside_good_1() -> QuantizedModel {
        let mut qm = crate::testing::rolling_from_good_1_to_2();
        qm.spec.rollout.canary = serde_json::from_value(json!({"replicas": 1})).unwrap();
        qm
    }

    async fn apply_canary(api: &mut ApiServer) -> Value {
        let uri = format!("/apis/apps/v1/namespaces/ml/deployments/bge-canary{APPLY_QUERY}");
        api.expect(Method::PATCH, &uri, StatusCode::OK, Value::clone)
            .await
    }

    #[tokio::test]
    async fn a_new_version_with_a_canary_starts_it_beside_the_last_good_one() {
        let qm = canary_of_2_beside_good_1();
        let (result, _) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            let stable = api.apply_deployment(rolled_out(3, 1)).await;
            assert_eq!(
                stable["spec"]["template"]["metadata"]["labels"]["serving.qmodel.dev/model-version"],
                "1.0.0",
                "the stable Deployment keeps the last good version"
            );
            api.apply_service().await;
            let canary = apply_canary(&mut api).await;
            assert_eq!(canary["spec"]["replicas"], 1);
            let template = &canary["spec"]["template"]["metadata"]["labels"];
            assert_eq!(template["serving.qmodel.dev/model-version"], "2.0.0");
            assert_eq!(template["serving.qmodel.dev/track"], "canary");
            assert_eq!(
                canary["spec"]["selector"]["matchLabels"]["serving.qmodel.dev/track"],
                "canary"
            );
            assert_eq!(canary["metadata"]["ownerReferences"][0]["uid"], "0b9e-uid");
            api.list_pods(json!([])).await;
            let status = api.apply_status().await;
            let canary = status.canary.clone().unwrap();
            assert_eq!(
                (canary.phase, canary.version.as_str()),
                (crate::crd::CanaryPhase::Starting, "2.0.0")
            );
            assert_eq!(condition(&status, "Progressing"), ("True", "CanaryAnalysis"));
            assert_eq!(condition(&status, "Ready"), ("False", "CanaryAnalysis"));
            assert_eq!(condition(&status, "Available"), ("True", "ReplicasAvailable"));
            assert_eq!(status.current_version.as_deref(), Some("1.0.0"));
            let event = api.event().await;
            assert_eq!(event["reason"], "CanaryStarted");
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(ROLLOUT_RECHECK));
    }

    #[tokio::test]
    async fn a_crash_looping_canary_is_scaled_to_zero_and_rolled_back() {
        let qm = canary_of_2_beside_good_1();
        let (result, ctx) = reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
            api.apply_deployment(rolled_out(3, 1)).await;
            api.apply_service().await;
            apply_canary(&mut api).await;
            api.list_pods(json!([{
                "metadata": {
                    "name": "bge-canary-1",
                    "namespace": "ml",
                    "labels": {
                        "serving.qmodel.dev/model": "bge",
                        "serving.qmodel.dev/model-version": "2.0.0",
                        "serving.qmodel.dev/track": "canary",
                    },
                },
                "status": {"containerStatuses": [{
                    "name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": "model.gguf: truncated"}},
                }]},
            }]))
            .await;
            // The rollback's apply of the last good spec, then the canary's end.
            api.apply_deployment(rolled_out(3, 1)).await;
            api.apply_service().await;
            let zero = api
                .expect(
                    Method::PATCH,
                    "/apis/apps/v1/namespaces/ml/deployments/bge-canary?",
                    StatusCode::OK,
                    Value::clone,
                )
                .await;
            assert_eq!(zero, json!({"spec": {"replicas": 0}}));
            let status = api.apply_status().await;
            let rollback = status.rollback.clone().unwrap();
            assert_eq!(rollback.reason, "CrashLoopBackOff");
            assert!(rollback.message.contains("model.gguf: truncated"), "{}", rollback.message);
            assert_eq!(
                status.canary.as_ref().unwrap().phase,
                crate::crd::CanaryPhase::RolledBack
            );
            assert_eq!(condition(&status, "RolledBack"), ("True", "CrashLoopBackOff"));
            assert_eq!(api.event().await["reason"], "RolledBack");
            api.event().await;
            api
        })
        .await;
        result.unwrap();
        assert_eq!(
            ctx.metrics
                .canary_verdicts
                .with_label_values(&["rolled_back"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn invalid_spec_applies_nothing_and_reports_why() {
        let qm = model(json!({"precision": "fp16", "gpu": {"profile": "a100"}}));
        let (result, ctx) =
            reconcile_against(qm, OperatorConfig::default(), |mut api| async move {
                let status = api.apply_status().await;
                assert_eq!(condition(&status, "Degraded"), ("True", "InvalidSpec"));
                assert_eq!(condition(&status, "Ready"), ("False", "InvalidSpec"));
                let event = api.event().await;
                assert_eq!(
                    (event["reason"].as_str(), event["type"].as_str()),
                    (Some("InvalidSpec"), Some("Warning"))
                );
                assert!(
                    event["note"]
                        .as_str()
                        .unwrap()
                        .contains(r#"GPU profile "a100" is not configured"#)
                );
                api
            })
            .await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(ctx.metrics.invalid_specs.get(), 1);
    }

    #[tokio::test]
    async fn api_error_fails_the_reconcile_before_status_and_backs_off_until_a_success() {
        let qm = model(json!({}));
        let (ctx, server) = context(OperatorConfig::default());
        let (result, server) = reconcile_with(qm.clone(), &ctx, server, |mut api| async move {
            let uri = format!("/apis/apps/v1/namespaces/ml/deployments/bge{APPLY_QUERY}");
            api.expect(Method::PATCH, &uri, StatusCode::FORBIDDEN, |_| {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"})
            })
            .await;
            api
        })
        .await;
        let error = result.unwrap_err();
        assert!(
            matches!(&error, Error::Kube(kube::Error::Api(status)) if status.is_forbidden()),
            "{error}"
        );
        let retry = |ctx: &Arc<Context>| error_policy(Arc::new(qm.clone()), &error, ctx.clone());
        assert_eq!(retry(&ctx), Action::requeue(Duration::from_secs(5)));
        assert_eq!(retry(&ctx), Action::requeue(Duration::from_secs(10)));
        assert_eq!(ctx.metrics.failures.with_label_values(&["kube"]).get(), 2);

        // Any successful reconcile of the same object (here: finding its spec invalid) resets
        // the backoff.
        let invalid = model(json!({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}));
        let (result, _server) = reconcile_with(invalid, &ctx, server, |mut api| async move {
            api.apply_status().await;
            api.event().await;
            api
        })
        .await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(retry(&ctx), Action::requeue(Duration::from_secs(5)));
    }

    #[test]
    fn retry_delay_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 7, 100]
            .map(|attempt| retry_delay(attempt).as_secs())
            .to_vec();
        assert_eq!(delays, [5, 10, 20, 40, 300, 300]);
    }
}
