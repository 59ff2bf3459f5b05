//! Dynamic batching on the real int8 MiniLM: 64 concurrent clients share batches and still get
//! exactly what each input gets alone.

mod http_support;

use http_support::common::cosine;
use http_support::{app, metric, post, sentences};
use qmodel_server::config::Limits;
use qmodel_server::http::router;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_clients_get_batch_invariant_results() {
    let router = router(&app(Limits::default(), true).await);
    let texts = sentences(64);

    // Each input alone, one request at a time: batches of one.
    let mut alone = Vec::new();
    for text in &texts {
        alone.push(
            post(&router, "/embed", json!({"inputs": text}))
                .await
                .embeddings()[0]
                .clone(),
        );
    }

    // Then all 64 at once, of eight lengths, batched together by the queue.
    let clients: Vec<_> = texts
        .iter()
        .map(|text| {
            let router = router.clone();
            let body = json!({"inputs": text});
            tokio::spawn(async move { post(&router, "/embed", body).await.embeddings() })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let together = client.await.unwrap();
        assert_eq!(together.len(), 1);
        // Bit for bit: the queue never pads (see queue::plan_batches).
        assert!(
            together[0] == alone[i],
            "input {i} differs when batched with others: cosine {}",
            cosine(&together[0], &alone[i])
        );
    }
    let text = String::from_utf8(
        http_support::call(&router, axum::http::Method::GET, "/metrics", "", None)
            .await
            .body,
    )
    .unwrap();
    let batches = metric(&text, "qmodel_batch_size_count");
    let inputs = metric(&text, "qmodel_batch_size_sum");
    assert_eq!(inputs, 1.0 + 64.0 + 64.0, "warm-up + alone + together");
    // The 64 solo requests ran as 64 batches; the concurrent ones must have shared some.
    assert!(
        batches < 1.0 + 64.0 + 64.0,
        "no batching happened: {batches} batches for {inputs} inputs"
    );
}
