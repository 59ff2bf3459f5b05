//! sentence-transformers prompts: named texts put before an input (e5's `"query: "`, bge's
//! query instruction), read at quantize time from the checkpoint's
//! `config_sentence_transformers.json` and kept in the artifact's manifest.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The checkpoint's sentence-transformers configuration file.
pub const CONFIG_FILE: &str = "config_sentence_transformers.json";

/// `prompts` and `default_prompt_name`, as sentence-transformers writes them; both absent in
/// manifests written before prompts were kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompts {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_prompt_name: Option<String>,
}

impl Prompts {
    /// Reads them from a checkpoint directory; none when it has no such file. A default name
    /// that is not one of the prompts is an error, as sentence-transformers makes it.
    pub fn read_checkpoint(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let prompts: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sentence-transformers config", path.display()))?;
        if let Some(name) = &prompts.default_prompt_name {
            anyhow::ensure!(
                prompts.prompts.contains_key(name),
                "{}: default_prompt_name {name:?} is not one of its prompts {:?}",
                path.display(),
                prompts.names()
            );
        }
        Ok(prompts)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.prompts.get(name).map(String::as_str)
    }

    pub fn names(&self) -> Vec<&str> {
        self.prompts.keys().map(String::as_str).collect()
    }

    /// The text of `default_prompt_name`, if the checkpoint names one.
    pub fn default_prompt(&self) -> Option<&str> {
        self.default_prompt_name
            .as_deref()
            .and_then(|n| self.get(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sentence_transformers_prompts_and_refuses_an_unknown_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Prompts::read_checkpoint(dir.path()).unwrap(),
            Prompts::default()
        );
        let write = |json: &str| std::fs::write(dir.path().join(CONFIG_FILE), json).unwrap();
        write(
            r#"{"prompts": {"query": "query: ", "passage": "passage: "},
                "default_prompt_name": "query", "similarity_fn_name": "cosine"}"#,
        );
        let prompts = Prompts::read_checkpoint(dir.path()).unwrap();
        assert_eq!(prompts.get("passage"), Some("passage: "));
        assert_eq!(prompts.default_prompt(), Some("query: "));
        assert_eq!(prompts.names(), ["passage", "query"]);
        write(r#"{"prompts": {"query": "q: "}, "default_prompt_name": "doc"}"#);
        let e = Prompts::read_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"doc\""), "{e}");
    }
}
