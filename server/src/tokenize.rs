//! Tokenization with the limits the API promises: inputs longer than the model's limit are
//! either truncated (`truncate: true`, from the right or the left) or refused with the token
//! count, never silently cut. Inputs may also arrive as token ids, checked against the vocabulary.

use std::path::Path;

use crate::backend::Encoding;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenizeError {
    #[error("input has {tokens} tokens, more than the model's limit of {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("token id {id} is not in the vocabulary (ids are 0..{vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("tokenization failed: {0}")]
    Failed(String),
}

/// Which end of an over-long input is cut (TEI's `truncation_direction`; both spellings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum TruncationDirection {
    #[default]
    #[serde(rename = "right", alias = "Right")]
    Right,
    #[serde(rename = "left", alias = "Left")]
    Left,
}

/// What to do with an input over the model's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    /// Refuse it with its token count.
    No,
    /// Cut it at this end, keeping the special tokens.
    At(TruncationDirection),
}

impl Truncate {
    pub fn new(truncate: bool, direction: TruncationDirection) -> Self {
        if truncate {
            Self::At(direction)
        } else {
            Self::No
        }
    }
}

/// `true`: cut from the right, the default direction.
impl From<bool> for Truncate {
    fn from(truncate: bool) -> Self {
        Self::new(truncate, TruncationDirection::Right)
    }
}

/// One input to encode: text, or token ids used as they are (no special tokens added), as
/// OpenAI and TEI take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// One token of `/tokenize`'s answer; offsets are byte positions in the input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub special: bool,
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

pub struct Tokenizer {
    /// Never truncates: it tells how long an input really is.
    inner: tokenizers::Tokenizer,
    /// Cut to `max_input_tokens` from the right, and from the left, keeping the special
    /// tokens; used only for inputs that are too long and may be truncated.
    truncating_right: tokenizers::Tokenizer,
    truncating_left: tokenizers::Tokenizer,
    max_input_tokens: usize,
    vocab_size: usize,
}

impl Tokenizer {
    pub fn from_file(path: &Path, max_input_tokens: usize) -> anyhow::Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Truncation and padding are ours to decide per request; the batcher pads.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let truncating = |direction| {
            let mut t = inner.clone();
            t.with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_input_tokens,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                direction,
                ..Default::default()
            }))
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            anyhow::Ok(t)
        };
        Ok(Self {
            truncating_right: truncating(tokenizers::TruncationDirection::Right)?,
            truncating_left: truncating(tokenizers::TruncationDirection::Left)?,
            vocab_size: inner.get_vocab_size(true),
            inner,
            max_input_tokens,
        })
    }

    pub fn max_input_tokens(&self) -> usize {
        self.max_input_tokens
    }

    /// Token ids are `0..vocab_size` (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Encodes one text with special tokens (`[CLS] text [SEP]`).
    pub fn encode(
        &self,
        text: &str,
        truncate: impl Into<Truncate>,
    ) -> Result<Encoding, TokenizeError> {
        self.limited(text, truncate.into())
    }

    /// Encodes one input: a text (after `prompt`, as sentence-transformers prepends it) with
    /// special tokens, or token ids as they are, checked against the vocabulary.
    pub fn encode_input(
        &self,
        input: &Input,
        prompt: Option<&str>,
        truncate: Truncate,
    ) -> Result<Encoding, TokenizeError> {
        match (input, prompt) {
            (Input::Text(text), None) => self.limited(text.as_str(), truncate),
            (Input::Text(text), Some(prompt)) => self.limited(format!("{prompt}{text}"), truncate),
            (Input::Ids(ids), _) => self.encode_ids(ids, truncate),
        }
    }

    /// Every id is in the vocabulary, or the first that is not.
    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizeError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizeError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    fn encode_ids(&self, ids: &[u32], truncate: Truncate) -> Result<Encoding, TokenizeError> {
        self.check_ids(ids)?;
        let max = self.max_input_tokens;
        let ids = match truncate {
            _ if ids.len() <= max => ids,
            Truncate::No => {
                return Err(TokenizeError::TooLong {
                    tokens: ids.len(),
                    max,
                });
            }
            Truncate::At(TruncationDirection::Right) => &ids[..max],
            Truncate::At(TruncationDirection::Left) => &ids[ids.len() - max..],
        };
        Ok(Encoding {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
        })
    }

    /// The text of token ids, for `/decode`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizeError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizeError::Failed(e.to_string()))
    }

    /// Encodes a (query, text) pair for a cross-encoder (`[CLS] q [SEP] t [SEP]`). When
    /// truncating, the longer side is cut first, as Hugging Face's `longest_first` does.
    pub fn encode_pair(
        &self,
        query: &str,
        text: &str,
        truncate: impl Into<Truncate>,
    ) -> Result<Encoding, TokenizeError> {
        self.limited((query, text), truncate.into())
    }

    /// The tokens of one text, for `/tokenize`.
    pub fn tokens(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<Token>, TokenizeError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizeError::Failed(e.to_string()))?;
        let special = encoding.get_special_tokens_mask();
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(special)
            .map(|(((&id, text), &(start, stop)), &special)| {
                let special = special == 1;
                Token {
                    id,
                    text: text.clone(),
                    special,
                    start: (!special).then_some(start),
                    stop: (!special).then_some(stop),
                }
            })
            .collect())
    }

    fn limited<'s, I>(&self, input: I, truncate: Truncate) -> Result<Encoding, TokenizeError>
    where
        I: Into<tokenizers::EncodeInput<'s>> + Clone,
    {
        let failed = |e: tokenizers::Error| TokenizeError::Failed(e.to_string());
        let mut encoding = self.inner.encode(input.clone(), true).map_err(failed)?;
        let tokens = encoding.len();
        if tokens > self.max_input_tokens {
            let truncating = match truncate {
                Truncate::No => {
                    return Err(TokenizeError::TooLong {
                        tokens,
                        max: self.max_input_tokens,
                    });
                }
                Truncate::At(TruncationDirection::Right) => &self.truncating_right,
                Truncate::At(TruncationDirection::Left) => &self.truncating_left,
            };
            encoding = truncating.encode(input, true).map_err(failed)?;
        }
        Ok(Encoding {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm(max: usize) -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/cache/all-MiniLM-L6-v2/tokenizer.json");
        assert!(
            path.exists(),
            "{} is missing: run models/fetch first",
            path.display()
        );
        Tokenizer::from_file(&path, max).unwrap()
    }

    #[test]
    fn encodes_with_special_tokens() {
        let tok = minilm(256);
        let e = tok.encode("Hello world", false).unwrap();
        assert_eq!(e.ids.first(), Some(&101)); // [CLS]
        assert_eq!(e.ids.last(), Some(&102)); // [SEP]
        assert_eq!(e.ids.len(), 4);
        assert!(e.type_ids.iter().all(|&t| t == 0));
    }

    #[test]
    fn too_long_is_refused_or_truncated_keeping_special_tokens() {
        let tok = minilm(8);
        let text = "one two three four five six seven eight nine ten";
        assert_eq!(
            tok.encode(text, false),
            Err(TokenizeError::TooLong { tokens: 12, max: 8 })
        );
        let e = tok.encode(text, true).unwrap();
        assert_eq!(e.ids.len(), 8);
        assert_eq!(e.ids.last(), Some(&102));
    }

    #[test]
    fn pairs_carry_segment_ids_and_truncate_longest_first() {
        let tok = minilm(12);
        let e = tok
            .encode_pair(
                "short query",
                "a much longer passage of text that goes on and on",
                true,
            )
            .unwrap();
        assert_eq!(e.ids.len(), 12);
        assert_eq!(e.ids.iter().filter(|&&id| id == 102).count(), 2);
        assert_eq!(e.type_ids[..4], [0, 0, 0, 0]);
        assert_eq!(*e.type_ids.last().unwrap(), 1);
    }

    #[test]
    fn left_truncation_keeps_the_end_and_the_special_tokens() {
        let tok = minilm(6);
        let text = "one two three four five six seven";
        let right = tok.encode(text, true).unwrap();
        let left = tok
            .encode(text, Truncate::At(TruncationDirection::Left))
            .unwrap();
        let ids = |t: &str| tok.encode(t, false).unwrap().ids;
        assert_eq!(right.ids, ids("one two three four"));
        assert_eq!(left.ids, ids("four five six seven"));
    }

    #[test]
    fn token_ids_are_checked_and_cut_but_get_no_special_tokens() {
        let tok = minilm(4);
        let encode = |ids: &[u32], truncate| {
            tok.encode_input(&Input::Ids(ids.to_vec()), Some("query: "), truncate)
        };
        assert_eq!(encode(&[7, 8, 9], Truncate::No).unwrap().ids, vec![7, 8, 9]);
        let long = [1, 2, 3, 4, 5, 6];
        assert_eq!(
            encode(&long, Truncate::No),
            Err(TokenizeError::TooLong { tokens: 6, max: 4 })
        );
        let right = Truncate::At(TruncationDirection::Right);
        let left = Truncate::At(TruncationDirection::Left);
        assert_eq!(encode(&long, right).unwrap().ids, vec![1, 2, 3, 4]);
        assert_eq!(encode(&long, left).unwrap().ids, vec![3, 4, 5, 6]);
        assert_eq!(
            encode(&[5, 30522], Truncate::No),
            Err(TokenizeError::UnknownId {
                id: 30522,
                vocab_size: 30522
            })
        );
        assert_eq!(tok.decode(&[101, 7592, 102], true).unwrap(), "hello");
        assert!(tok.decode(&[u32::MAX], true).is_err());
    }

    #[test]
    fn tokens_report_offsets_of_real_tokens_only() {
        let tok = minilm(256);
        let tokens = tok.tokens("Héllo", true).unwrap();
        assert!(tokens[0].special && tokens[0].start.is_none());
        assert!(!tokens[1].special);
        assert_eq!(tokens[1].start, Some(0));
    }
}
