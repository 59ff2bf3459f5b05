//! Fixtures shared by the unit tests.

use serde_json::{Value, json};

use crate::crd::{QuantizedModel, QuantizedModelStatus};

/// A stored model (name, namespace, uid and generation set) with `spec` merged over a minimal
/// int8 embedding spec.
pub fn model(spec: Value) -> QuantizedModel {
    let mut base = json!({
        "model": {"name": "bge-small", "version": "1.0.0", "task": "embed"},
        "precision": "int8",
    });
    merge(&mut base, spec);
    serde_json::from_value(json!({
        "apiVersion": "serving.qmodel.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": {"name": "bge", "namespace": "ml", "uid": "0b9e-uid", "generation": 1},
        "spec": base,
    }))
    .expect("fixture is a valid QuantizedModel")
}

/// JSON merge of `patch` into `base`: objects merge key by key, anything else replaces.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// A model whose spec moved to 2.0.0 while 1.0.0 is what runs: a rollout under way.
pub fn rolling_from_1_to_2() -> QuantizedModel {
    let mut qm = model(json!({"model": {"version": "2.0.0"}}));
    qm.status = Some(QuantizedModelStatus {
        observed_generation: Some(1),
        current_version: Some("1.0.0".into()),
        desired_version: Some("2.0.0".into()),
        image: Some("ghcr.io/qmodel/qmodel-server:2.0.0-int8".into()),
        ..QuantizedModelStatus::default()
    });
    qm
}

/// [`rolling_from_1_to_2`] where 1.0.0 had fully rolled out: a rollback has somewhere to go.
pub fn rolling_from_good_1_to_2() -> QuantizedModel {
    let mut qm = rolling_from_1_to_2();
    let status = qm.status.as_mut().expect("the fixture has a status");
    status.last_good_version = Some("1.0.0".into());
    status.last_good_spec = Some(crate::rollout::template_spec(&model(json!({})).spec));
    qm
}
