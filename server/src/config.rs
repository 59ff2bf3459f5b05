//! `serve` configuration: every flag also comes from an environment variable, named as
//! text-embeddings-inference names it where TEI has the setting. Boolean variables take
//! true/false, 1/0, yes/no or on/off.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, RangedU64ValueParser};

use crate::backend::DeviceKind;

pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16384;
pub const DEFAULT_MAX_BATCH_REQUESTS: usize = 64;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
pub const DEFAULT_MAX_CLIENT_BATCH_SIZE: usize = 32;
pub const DEFAULT_PAYLOAD_LIMIT: usize = 2_000_000;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model artifact directory (made by `qmodel-server quantize`).
    #[arg(long = "model", env = "MODEL_DIR")]
    pub model_dir: PathBuf,

    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// Port of the gRPC API (TEI's `tei.v1`), on the same host; off when unset.
    #[arg(long, env = "GRPC_PORT")]
    pub grpc_port: Option<u16>,

    /// `cuda` needs a build with the `cuda` feature.
    #[arg(long, env = "DEVICE", value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,

    /// Threads for CPU inference; when unset, the CPUs the container may use (its cgroup CPU
    /// limit and CPU affinity), not the node's core count.
    #[arg(long, env = "INFERENCE_THREADS", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub inference_threads: Option<usize>,

    /// Seconds between SIGTERM and draining: `/ready` answers 503 at once while requests are
    /// still served, so load balancers (Kubernetes endpoints) stop sending new ones first.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "0", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "JSON_OUTPUT", value_parser = BoolishValueParser::new())]
    pub json_output: bool,

    #[command(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    pub prompts: PromptArgs,
}

/// The prompt put before text inputs whose request names none.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PromptArgs {
    /// One of the model's prompts (`/info` lists them) [default: the checkpoint's
    /// `default_prompt_name`].
    #[arg(long, env = "DEFAULT_PROMPT_NAME", conflicts_with = "default_prompt")]
    pub default_prompt_name: Option<String>,

    /// A prompt text of your own.
    #[arg(long, env = "DEFAULT_PROMPT")]
    pub default_prompt: Option<String>,
}

/// What the HTTP layer and the queue enforce.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Tokens per batch (inputs x their length); at least the model's input limit.
    #[arg(long, env = "MAX_BATCH_TOKENS", default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,

    /// Inputs per batch.
    #[arg(long, env = "MAX_BATCH_REQUESTS", default_value_t = DEFAULT_MAX_BATCH_REQUESTS)]
    pub max_batch_requests: usize,

    /// Requests in flight (queued or computing); beyond it the server answers 429 at once.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub max_concurrent_requests: usize,

    /// Inputs per request.
    #[arg(long, env = "MAX_CLIENT_BATCH_SIZE", default_value_t = DEFAULT_MAX_CLIENT_BATCH_SIZE)]
    pub max_client_batch_size: usize,

    /// Truncate over-long inputs when a request does not say (otherwise they get a 422).
    #[arg(long, env = "AUTO_TRUNCATE", value_parser = BoolishValueParser::new())]
    pub auto_truncate: bool,

    /// Largest request body, in bytes.
    #[arg(long, env = "PAYLOAD_LIMIT", default_value_t = DEFAULT_PAYLOAD_LIMIT)]
    pub payload_limit: usize,

    /// When set, every route but /health, /ready and /metrics needs `Authorization: Bearer <key>`.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Seconds a request may take (tokenization, queue and inference) before a 504.
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = parse_seconds)]
    pub request_timeout: Option<Duration>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let seconds: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{e}"))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_batch_requests: DEFAULT_MAX_BATCH_REQUESTS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_client_batch_size: DEFAULT_MAX_CLIENT_BATCH_SIZE,
            auto_truncate: false,
            payload_limit: DEFAULT_PAYLOAD_LIMIT,
            api_key: None,
            request_timeout: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// The flag <-> environment variable table that the README documents.
    #[test]
    fn every_flag_has_its_tei_style_environment_variable() {
        let table: Vec<(String, String)> = Cli::command()
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_str()?.to_owned();
                Some((arg.get_long()?.to_owned(), env))
            })
            .collect();
        let expected = [
            ("model", "MODEL_DIR"),
            ("host", "HOST"),
            ("port", "PORT"),
            ("grpc-port", "GRPC_PORT"),
            ("device", "DEVICE"),
            ("inference-threads", "INFERENCE_THREADS"),
            ("shutdown-grace", "SHUTDOWN_GRACE"),
            ("json-output", "JSON_OUTPUT"),
            ("max-batch-tokens", "MAX_BATCH_TOKENS"),
            ("max-batch-requests", "MAX_BATCH_REQUESTS"),
            ("max-concurrent-requests", "MAX_CONCURRENT_REQUESTS"),
            ("max-client-batch-size", "MAX_CLIENT_BATCH_SIZE"),
            ("auto-truncate", "AUTO_TRUNCATE"),
            ("payload-limit", "PAYLOAD_LIMIT"),
            ("api-key", "API_KEY"),
            ("request-timeout", "REQUEST_TIMEOUT"),
            ("default-prompt-name", "DEFAULT_PROMPT_NAME"),
            ("default-prompt", "DEFAULT_PROMPT"),
        ]
        .map(|(flag, env)| (flag.to_owned(), env.to_owned()));
        assert_eq!(table, expected);
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "serve",
            "--model",
            "m",
            "--port",
            "9",
            "--auto-truncate",
            "--request-timeout",
            "1.5",
        ])
        .unwrap();
        assert_eq!(cli.serve.port, 9);
        assert!(cli.serve.limits.auto_truncate);
        assert_eq!(
            cli.serve.limits.request_timeout,
            Some(Duration::from_millis(1500))
        );
        assert!(parse_seconds("-1").is_err() && parse_seconds("soon").is_err());
        assert_eq!(cli.serve.grpc_port, None);
        let both = [
            "serve",
            "--model",
            "m",
            "--default-prompt-name",
            "query",
            "--default-prompt",
            "q: ",
        ];
        assert!(Cli::try_parse_from(both).is_err());
        assert_eq!(cli.serve.shutdown_grace, Duration::ZERO);
        assert_eq!(cli.serve.inference_threads, None);
        let graced = Cli::try_parse_from([
            "serve",
            "--model",
            "m",
            "--shutdown-grace",
            "5",
            "--inference-threads",
            "2",
        ])
        .unwrap();
        assert_eq!(graced.serve.shutdown_grace, Duration::from_secs(5));
        assert_eq!(graced.serve.inference_threads, Some(2));
        assert!(
            Cli::try_parse_from(["serve", "--model", "m", "--inference-threads", "0"]).is_err()
        );
    }
}
