//! Many models at once (issue 5, check 9). Its own test binary, so nothing else loads the
//! cluster while it is timed.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use qmodel_e2e::{TestEnv, condition, model, wait_for};
use serde_json::json;

const MODELS: usize = 200;

#[tokio::test]
async fn two_hundred_models_all_become_ready() {
    let env = TestEnv::new("scale").await;
    let mut operator = env.operator("op");
    operator.wait_ready().await;

    let start = Instant::now();
    futures::stream::iter(0..MODELS)
        .map(|i| {
            let env = &env;
            async move {
                env.apply_model(&model(&format!("m{i:03}"), "v1", "int8", json!({})))
                    .await
            }
        })
        .buffer_unordered(50)
        .try_collect::<Vec<_>>()
        .await
        .expect("creating the models");
    let created = start.elapsed();

    let models = env.models();
    wait_for("every model Ready", Duration::from_secs(300), || async {
        let list = models
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let ready = list
            .items
            .iter()
            .filter(|m| condition(m, "Ready")["status"] == "True")
            .count();
        if ready == MODELS {
            Ok(())
        } else {
            Err(format!("{ready}/{MODELS} Ready"))
        }
    })
    .await;
    let all_ready = start.elapsed();
    let pods = env
        .api::<Pod>()
        .list(&ListParams::default())
        .await
        .expect("pods");
    assert_eq!(pods.items.len(), MODELS, "one pod per model");
    // Benchmark figures, not assertions: they depend on the machine.
    println!(
        "BENCHMARK scale: {MODELS} QuantizedModels applied in {:.1}s, all Ready after {:.1}s; \
         operator peak RSS {:.1} MiB",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        operator.peak_rss_kib() as f64 / 1024.0
    );
}
