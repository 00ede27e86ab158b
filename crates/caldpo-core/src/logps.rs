//! Sequence log-probabilities of completion tokens.
//!
//! Labels follow the Hugging Face convention: they are aligned with the input ids, so the
//! logit at position `t` predicts label `t + 1`, and prompt and padding positions carry
//! [`IGNORE_INDEX`]. The shift happens here; callers pass labels as the data crate builds them.
//!
//! Log-probabilities are computed in f32 whatever the dtype of the logits (f64 inputs stay
//! f64, so gradients can be checked against finite differences). Only the positions whose
//! label is a completion token are gathered, and the log-softmax normaliser is computed for
//! a bounded number of them at a time, so the full `[batch, seq_len, vocab]` log-softmax is
//! never materialised.
//!
//! # Memory
//!
//! Under `no_grad` (the reference model, evaluation) the peak extra memory is one chunk of
//! `[chunk_tokens, vocab]` f32 values, whatever the batch size. With gradients, autograd keeps
//! each chunk's f32 logits for the backward pass of the normaliser: `[completion tokens,
//! vocab]` f32 in all. Prompt and padding positions cost nothing, and from hidden states the
//! `[batch, seq_len, vocab]` logits never exist at all. tch 0.24 offers no custom autograd
//! functions, so a fused kernel that recomputes the softmax in the backward pass is out of reach.
//!
//! Measured with `examples/logps_memory.rs` (SmolLM2-135M sizes, f32 on the CPU, 1024-token
//! sequences whose second half is the completion), growth of the peak resident set for 1 and
//! 4 sequences: full log-softmax 292 and 2210 MiB without gradients, 486 and 2212 MiB with;
//! [`sequence_logps_from_hidden`] (1024-token chunks) 102 and 297 MiB without gradients (one
//! chunk: flat from the second sequence on), 298 and 877 MiB with.
//!
//! # Host syncs
//!
//! Each call syncs with the device twice, back to back: once to learn how many completion
//! tokens there are (it decides the number of chunks) and once to check that every completion
//! label is a token id of the vocabulary, since an out-of-range id would otherwise abort the
//! process with a device-side assertion on CUDA.

use tch::{Device, Kind, Tensor};

use crate::{ChosenRejected, Error, Result};

/// The label of a position that is not scored: prompt tokens and padding.
pub const IGNORE_INDEX: i64 = -100;

/// [`sequence_logps`] scores at most this many `vocab` entries per chunk (64 MiB of f32).
pub const LOGITS_CHUNK_ELEMENTS: i64 = 1 << 24;

/// Per-sequence log-probabilities of the completion tokens, and their mean logit.
///
/// Each field is a `[batch]` tensor on the device of the model output, in f32 (f64 when the
/// model output is f64). `sum` carries gradients back to the model; `token_count` and
/// `mean_logit` never do.
#[derive(Debug)]
pub struct SequenceLogps {
    /// Sum of the log-probabilities of the completion tokens.
    pub sum: Tensor,
    /// Number of completion tokens.
    pub token_count: Tensor,
    /// Mean logit over the vocabulary and the completion tokens (TRL's `logits/*`): the mean
    /// over the vocabulary at each completion position, averaged over those positions.
    pub mean_logit: Tensor,
}

impl SequenceLogps {
    /// Number of sequences.
    pub fn batch_size(&self) -> i64 {
        self.sum.size().first().copied().unwrap_or(0)
    }

    /// Mean log-probability per completion token: `sum / token_count`.
    ///
    /// A sequence without completion tokens has mean 0 rather than NaN; the data crate never
    /// produces one, and a NaN would poison a whole batch of metrics.
    pub fn mean(&self) -> Tensor {
        &self.sum / self.token_count.clamp_min(1.0)
    }

    /// Splits a batch of `2 * pairs` sequences into its chosen rows `[0, pairs)` and its
    /// rejected rows `[pairs, 2 * pairs)`, the layout of a padded pair batch.
    ///
    /// # Panics
    ///
    /// When the batch size is odd; [`SequenceLogps::try_split_pairs`] returns the error instead.
    pub fn split_pairs(&self) -> ChosenRejected<SequenceLogps> {
        match self.try_split_pairs() {
            Ok(pairs) => pairs,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`SequenceLogps::split_pairs`], with a typed error for an odd batch size.
    pub fn try_split_pairs(&self) -> Result<ChosenRejected<SequenceLogps>> {
        let batch = self.check("sequence log-probs", None)?;
        if batch % 2 != 0 {
            return Err(Error::Shape {
                what: "sequence log-probs",
                expected: "[2 * pairs] (chosen rows then rejected rows)".into(),
                actual: vec![batch],
            });
        }
        let pairs = batch / 2;
        let rows = |start: i64| SequenceLogps {
            sum: self.sum.narrow(0, start, pairs),
            token_count: self.token_count.narrow(0, start, pairs),
            mean_logit: self.mean_logit.narrow(0, start, pairs),
        };
        Ok(ChosenRejected { chosen: rows(0), rejected: rows(pairs) })
    }

    /// The same values, cut from the autograd graph.
    pub fn detach(&self) -> SequenceLogps {
        SequenceLogps {
            sum: self.sum.detach(),
            token_count: self.token_count.detach(),
            mean_logit: self.mean_logit.detach(),
        }
    }

    /// The same values on `device`.
    pub fn to_device(&self, device: Device) -> SequenceLogps {
        SequenceLogps {
            sum: self.sum.to_device(device),
            token_count: self.token_count.to_device(device),
            mean_logit: self.mean_logit.to_device(device),
        }
    }

    /// Checks that every field is a floating `[batch]` tensor on one device (of `batch`
    /// sequences when given) and returns the batch size.
    pub(crate) fn check(&self, what: &'static str, batch: Option<i64>) -> Result<i64> {
        let batch = batch.unwrap_or_else(|| self.batch_size());
        let device = self.sum.device();
        for field in [&self.sum, &self.token_count, &self.mean_logit] {
            if field.size() != [batch] {
                let expected = format!("[batch] = [{batch}] for every field");
                return Err(Error::Shape { what, expected, actual: field.size() });
            }
            if !is_float(field.kind()) {
                let expected = "a floating dtype".into();
                return Err(Error::Dtype { what, expected, actual: field.kind() });
            }
            if field.device() != device {
                return Err(Error::Device { what, expected: device, actual: field.device() });
            }
        }
        Ok(batch)
    }
}

/// Log-probabilities of the completion tokens of each sequence, from the model's logits.
///
/// `logits` is `[batch, seq_len, vocab]` in any floating dtype; `labels` is `[batch, seq_len]`
/// i64 on the same device, aligned with the input ids, [`IGNORE_INDEX`] outside the
/// completion. Positions are scored in chunks of at most [`LOGITS_CHUNK_ELEMENTS`] / `vocab`
/// tokens.
pub fn sequence_logps(logits: &Tensor, labels: &Tensor) -> Result<SequenceLogps> {
    let vocab = check_logits(logits, labels)?;
    logps_from_logits(logits, labels, (LOGITS_CHUNK_ELEMENTS / vocab).max(1))
}

/// Log-probabilities of the completion tokens of each sequence, from the final hidden states
/// (after the final norm) and the LM head weight.
///
/// `hidden` is `[batch, seq_len, hidden]`, `lm_head` is `[vocab, hidden]` in the same
/// floating dtype, `labels` is `[batch, seq_len]` i64 as for [`sequence_logps`]. Only the
/// completion positions go through the LM head, `chunk_tokens` of them at a time. The LM
/// head product runs in the input dtype, as the model's own head would; the normaliser and
/// everything after it run in f32.
pub fn sequence_logps_from_hidden(
    hidden: &Tensor,
    lm_head: &Tensor,
    labels: &Tensor,
    chunk_tokens: i64,
) -> Result<SequenceLogps> {
    let vocab = check_hidden(hidden, lm_head, labels)?;
    if chunk_tokens < 1 {
        return Err(Error::ChunkTokens(chunk_tokens));
    }
    let (batch, seq_len, width) = hidden.size3()?;
    let kind = compute_kind(hidden.kind());
    let tokens = CompletionTokens::locate(labels, vocab, kind)?;
    let states = hidden.reshape([batch * seq_len, width]);

    let head = lm_head.tr();
    let token_logps = tokens.map_chunks(chunk_tokens, kind, |rows, targets| {
        let logits = select_rows(&states, rows).matmul(&head).to_kind(kind);
        label_logps(&logits, targets)
    });

    // The mean over the vocabulary of h . W_v is h . mean_v(W_v): one dot product per token
    // instead of a pass over `vocab` logits. It is a metric, so it carries no gradient.
    let token_mean_logits = tch::no_grad(|| {
        let mean_row = lm_head.mean_dim(0, false, kind);
        select_rows(&states, &tokens.rows).to_kind(kind).matmul(&mean_row)
    });
    Ok(tokens.into_sequences(&token_logps, &token_mean_logits))
}

/// [`sequence_logps`] with an explicit chunk size, after the inputs have been checked.
fn logps_from_logits(logits: &Tensor, labels: &Tensor, chunk_tokens: i64) -> Result<SequenceLogps> {
    let (batch, seq_len, vocab) = logits.size3()?;
    let kind = compute_kind(logits.kind());
    let tokens = CompletionTokens::locate(labels, vocab, kind)?;
    let rows_of_logits = logits.reshape([batch * seq_len, vocab]);

    let mut mean_logit_chunks = Vec::new();
    let token_logps = tokens.map_chunks(chunk_tokens, kind, |rows, targets| {
        let chunk = select_rows(&rows_of_logits, rows).to_kind(kind);
        mean_logit_chunks.push(tch::no_grad(|| chunk.mean_dim(-1, false, kind)));
        label_logps(&chunk, targets)
    });

    let token_mean_logits = cat_or_empty(&mean_logit_chunks, kind, logits.device());
    Ok(tokens.into_sequences(&token_logps, &token_mean_logits))
}

/// Rows `rows` of `xs` along dimension 0.
///
/// Advanced indexing rather than `index_select`: on the CPU, libtorch's `index_select` copies
/// `[341, 49152]` f32 rows about 15 times slower (1.9 s against 0.1 s).
fn select_rows(xs: &Tensor, rows: &Tensor) -> Tensor {
    xs.index(&[Some(rows)])
}

/// `log softmax(logits)[target]` for each row: `[tokens, vocab]`, `[tokens]` -> `[tokens]`.
fn label_logps(logits: &Tensor, targets: &Tensor) -> Tensor {
    let label_logits = logits.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
    label_logits - logits.logsumexp([1], false)
}

/// The completion tokens of a batch: which input position predicts each, and what.
struct CompletionTokens {
    batch: i64,
    /// Number of scored positions per sequence: `seq_len - 1` (the last position predicts
    /// nothing).
    positions: i64,
    /// For each completion token, the row `b * seq_len + t` of the position `t` that predicts
    /// it in the flattened `[batch * seq_len]` model output; i64 `[tokens]`.
    rows: Tensor,
    /// For each completion token, its index `b * positions + t` in the `[batch, positions]`
    /// grid of shifted positions; i64 `[tokens]`.
    grid_index: Tensor,
    /// For each completion token, its label (the token id it predicts); i64 `[tokens]`.
    targets: Tensor,
    /// Completion tokens per sequence; `[batch]` in the compute dtype.
    token_count: Tensor,
}

impl CompletionTokens {
    /// Finds the completion tokens of `[batch, seq_len]` labels and checks their ids.
    fn locate(labels: &Tensor, vocab: i64, kind: Kind) -> Result<Self> {
        let (batch, seq_len) = labels.size2()?;
        let first_scored = seq_len.min(1);
        let positions = seq_len - first_scored;
        let scored = labels.narrow(1, first_scored, positions).ne(IGNORE_INDEX);
        let token_count = scored.sum_dim_intlist(1, false, kind);

        // Host sync: `nonzero` must learn how many completion tokens there are, and that
        // number decides how many chunks run.
        let coordinates = scored.nonzero();
        let (sequence, position) = (coordinates.select(1, 0), coordinates.select(1, 1));
        let rows = &sequence * seq_len + &position;
        let grid_index = &sequence * positions + &position;
        let targets = select_rows(&labels.reshape([-1]), &(&rows + 1));
        check_label_range(&targets, vocab)?;
        Ok(Self { batch, positions, rows, grid_index, targets, token_count })
    }

    /// Number of completion tokens in the batch.
    fn len(&self) -> i64 {
        self.rows.size()[0]
    }

    /// Runs `score(rows, targets)` on consecutive chunks of at most `chunk_tokens` completion
    /// tokens and concatenates the per-token results.
    fn map_chunks(
        &self,
        chunk_tokens: i64,
        kind: Kind,
        mut score: impl FnMut(&Tensor, &Tensor) -> Tensor,
    ) -> Tensor {
        let mut chunks = Vec::new();
        for start in (0..self.len()).step_by(chunk_tokens as usize) {
            let length = chunk_tokens.min(self.len() - start);
            let rows = self.rows.narrow(0, start, length);
            chunks.push(score(&rows, &self.targets.narrow(0, start, length)));
        }
        cat_or_empty(&chunks, kind, self.rows.device())
    }

    /// Sums per-token values into per-sequence values.
    ///
    /// The tokens are written into a dense `[batch, positions]` grid and summed along each
    /// row, which adds in position order on every device; a scatter-add would be
    /// nondeterministic on CUDA.
    fn sum_per_sequence(&self, per_token: &Tensor) -> Tensor {
        let options = (per_token.kind(), per_token.device());
        let grid = Tensor::zeros([self.batch * self.positions], options);
        let grid = grid.index_copy(0, &self.grid_index, per_token);
        grid.view([self.batch, self.positions]).sum_dim_intlist(1, false, per_token.kind())
    }

    fn into_sequences(self, token_logps: &Tensor, token_mean_logits: &Tensor) -> SequenceLogps {
        let sum = self.sum_per_sequence(token_logps);
        let mean_logit = self.sum_per_sequence(token_mean_logits) / self.token_count.clamp_min(1.0);
        SequenceLogps { sum, token_count: self.token_count, mean_logit }
    }
}

/// Checks that every completion label is a token id in `[0, vocab)`.
fn check_label_range(targets: &Tensor, vocab: i64) -> Result<()> {
    if targets.numel() == 0 {
        return Ok(());
    }
    // Host sync: the bounds of the completion labels. It follows the sync in `locate` with
    // nothing queued in between, so it adds one short round trip.
    let bounds = Tensor::stack(&[targets.min(), targets.max()], 0).to_device(Device::Cpu);
    let bounds = Vec::<i64>::try_from(&bounds)?;
    let (min, max) = (bounds[0], bounds[1]);
    if min < 0 || max >= vocab {
        return Err(Error::LabelOutOfRange { min, max, vocab });
    }
    Ok(())
}

/// Concatenates along dimension 0, or returns an empty `[0]` tensor when there is nothing.
fn cat_or_empty(parts: &[Tensor], kind: Kind, device: Device) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0], (kind, device))
    } else {
        Tensor::cat(parts, 0)
    }
}

/// The dtype log-probs are computed in: f64 stays f64, everything else becomes f32.
fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

const FLOAT_KINDS: &str = "f32, f64, f16 or bf16";

/// Checks logits and labels; returns the vocabulary size.
fn check_logits(logits: &Tensor, labels: &Tensor) -> Result<i64> {
    let size = logits.size();
    if size.len() != 3 || size[2] < 1 {
        let expected = "[batch, seq_len, vocab] with vocab >= 1".into();
        return Err(Error::Shape { what: "logits", expected, actual: size });
    }
    check_float("logits", logits)?;
    check_labels(labels, size[0], size[1], logits.device())?;
    Ok(size[2])
}

/// Checks hidden states, LM head and labels; returns the vocabulary size.
fn check_hidden(hidden: &Tensor, lm_head: &Tensor, labels: &Tensor) -> Result<i64> {
    let size = hidden.size();
    if size.len() != 3 {
        let expected = "[batch, seq_len, hidden]".into();
        return Err(Error::Shape { what: "hidden", expected, actual: size });
    }
    check_float("hidden", hidden)?;
    let head_size = lm_head.size();
    if head_size.len() != 2 || head_size[1] != size[2] || head_size[0] < 1 {
        let expected = format!("[vocab, hidden] = [vocab >= 1, {}]", size[2]);
        return Err(Error::Shape { what: "lm_head", expected, actual: head_size });
    }
    if lm_head.kind() != hidden.kind() {
        let expected = format!("{:?} (the dtype of hidden)", hidden.kind());
        return Err(Error::Dtype { what: "lm_head", expected, actual: lm_head.kind() });
    }
    if lm_head.device() != hidden.device() {
        let (expected, actual) = (hidden.device(), lm_head.device());
        return Err(Error::Device { what: "lm_head", expected, actual });
    }
    check_labels(labels, size[0], size[1], hidden.device())?;
    Ok(head_size[0])
}

fn check_float(what: &'static str, xs: &Tensor) -> Result<()> {
    if is_float(xs.kind()) {
        Ok(())
    } else {
        Err(Error::Dtype { what, expected: FLOAT_KINDS.into(), actual: xs.kind() })
    }
}

fn check_labels(labels: &Tensor, batch: i64, seq_len: i64, device: Device) -> Result<()> {
    if labels.size() != [batch, seq_len] {
        let expected = format!("[batch, seq_len] = [{batch}, {seq_len}]");
        return Err(Error::Shape { what: "labels", expected, actual: labels.size() });
    }
    if labels.kind() != Kind::Int64 {
        let expected = "i64".into();
        return Err(Error::Dtype { what: "labels", expected, actual: labels.kind() });
    }
    if labels.device() != device {
        return Err(Error::Device { what: "labels", expected: device, actual: labels.device() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(xs: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&xs.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap()
    }

    fn assert_close(actual: &Tensor, expected: &[f64], tolerance: f64) {
        let actual = values(actual);
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() <= tolerance * (1.0 + e.abs()), "{actual:?} vs {expected:?}");
        }
    }

    fn labels(rows: &[[i64; 4]]) -> Tensor {
        Tensor::from_slice2(rows)
    }

    /// Logits `ln(c)` for counts `c` that sum to 10 at every position, so the probability of
    /// token `v` at position `t` is `c[t][v] / 10`. Both sequences share them.
    fn counted_logits() -> Tensor {
        let counts = [
            [1.0, 2.0, 3.0, 4.0],
            [4.0, 3.0, 2.0, 1.0],
            [1.0, 1.0, 1.0, 7.0],
            [2.0, 2.0, 2.0, 4.0],
        ];
        let rows: Vec<f64> = counts.iter().flatten().map(|c: &f64| c.ln()).collect();
        Tensor::from_slice(&rows).view([1, 4, 4]).repeat([2, 1, 1])
    }

    // Sequence 0, labels [3, -100, 2, 3]: label 0 has no predicting position and label 1 is
    // ignored; label 2 (= 2) is predicted at position 1 with p = 2/10 and label 3 (= 3) at
    // position 2 with p = 7/10, so sum = ln 0.14 over 2 tokens. Without the shift it would
    // read positions 2 and 3: ln(1/10 * 4/10).
    // Sequence 1, labels [-100, 0, 1, -100]: token 0 at position 0 (p = 1/10), token 1 at
    // position 1 (p = 3/10): sum = ln 0.03 over 2 tokens.
    // Mean logits: position 0 and 1 have mean ln(24)/4, position 2 ln(7)/4, so sequence 0
    // has (ln 24 + ln 7)/8 = ln(168)/8 and sequence 1 ln(24)/4.
    fn expected_counted() -> [Vec<f64>; 3] {
        [
            vec![0.14f64.ln(), 0.03f64.ln()],
            vec![2.0, 2.0],
            vec![168f64.ln() / 8.0, 24f64.ln() / 4.0],
        ]
    }

    fn counted_labels() -> Tensor {
        labels(&[[3, IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 0, 1, IGNORE_INDEX]])
    }

    #[test]
    fn hand_computed_logps_shift_labels_and_skip_ignored_positions() {
        let [sum, count, mean_logit] = expected_counted();
        for chunk_tokens in [1, 3, 100] {
            let logps = logps_from_logits(&counted_logits(), &counted_labels(), chunk_tokens);
            let logps = logps.unwrap();
            assert_close(&logps.sum, &sum, 1e-12);
            assert_close(&logps.token_count, &count, 0.0);
            assert_close(&logps.mean_logit, &mean_logit, 1e-12);
            assert_close(&logps.mean(), &[sum[0] / 2.0, sum[1] / 2.0], 1e-12);
        }
    }

    #[test]
    fn hand_computed_logps_from_hidden_states() {
        // With the identity as LM head the hidden states are the logits.
        let [sum, count, mean_logit] = expected_counted();
        let head = Tensor::eye(4, (Kind::Double, Device::Cpu));
        for chunk_tokens in [1, 2, 4] {
            let logps = sequence_logps_from_hidden(
                &counted_logits(),
                &head,
                &counted_labels(),
                chunk_tokens,
            )
            .unwrap();
            assert_close(&logps.sum, &sum, 1e-12);
            assert_close(&logps.token_count, &count, 0.0);
            assert_close(&logps.mean_logit, &mean_logit, 1e-12);
        }
    }

    /// Random `[batch, seq_len]` labels: a prompt of random length, a completion, padding.
    fn random_labels(batch: i64, seq_len: i64, vocab: i64) -> Tensor {
        let tokens = Tensor::randint(vocab, [batch, seq_len], (Kind::Int64, Device::Cpu));
        let position = Tensor::arange(seq_len, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let prompt_end = Tensor::randint(seq_len / 2, [batch, 1], (Kind::Int64, Device::Cpu));
        let pad_start =
            Tensor::randint_low(seq_len / 2, seq_len + 1, [batch, 1], (Kind::Int64, Device::Cpu));
        let scored = position.ge_tensor(&prompt_end).logical_and(&position.lt_tensor(&pad_start));
        tokens.where_self(&scored, &Tensor::from(IGNORE_INDEX))
    }

    /// The textbook computation: full log-softmax, gather, mask, sum.
    fn naive(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let seq_len = labels.size()[1];
        let targets = labels.narrow(1, 1, seq_len - 1);
        let scored = targets.ne(IGNORE_INDEX);
        let safe_targets = targets.where_self(&scored, &Tensor::from(0i64));
        let logits = logits.narrow(1, 0, seq_len - 1).to_kind(Kind::Double);
        let per_token = logits.log_softmax(-1, None).gather(2, &safe_targets.unsqueeze(2), false);
        let mask = scored.to_kind(Kind::Double);
        let sum = (per_token.squeeze_dim(2) * &mask).sum_dim_intlist(1, false, Kind::Double);
        let token_mean = logits.mean_dim(-1, false, Kind::Double) * &mask;
        let mean_logit = token_mean.sum_dim_intlist(1, false, Kind::Double)
            / mask.sum_dim_intlist(1, false, Kind::Double).clamp_min(1.0);
        (sum, mean_logit)
    }

    #[test]
    fn chunked_paths_equal_the_full_log_softmax() {
        tch::manual_seed(7);
        let (batch, seq_len, width, vocab) = (3, 9, 6, 11);
        let options = (Kind::Double, Device::Cpu);
        let hidden = Tensor::randn([batch, seq_len, width], options);
        let head = Tensor::randn([vocab, width], options);
        let labels = random_labels(batch, seq_len, vocab);
        let logits = hidden.matmul(&head.tr());
        let (sum, mean_logit) = naive(&logits, &labels);
        let (sum, mean_logit) = (values(&sum), values(&mean_logit));

        for chunk_tokens in [1, 2, 5, 1000] {
            let from_logits = logps_from_logits(&logits, &labels, chunk_tokens).unwrap();
            assert_close(&from_logits.sum, &sum, 1e-12);
            assert_close(&from_logits.mean_logit, &mean_logit, 1e-12);
            let from_hidden =
                sequence_logps_from_hidden(&hidden, &head, &labels, chunk_tokens).unwrap();
            assert_close(&from_hidden.sum, &sum, 1e-12);
            assert_close(&from_hidden.mean_logit, &mean_logit, 1e-12);
        }
        let public = sequence_logps(&logits.to_kind(Kind::Float), &labels).unwrap();
        assert_eq!(public.sum.kind(), Kind::Float);
        assert_close(&public.sum, &sum, 1e-5);
    }

    /// Checks d(weights . f(x)) / dx against central differences, element by element.
    fn check_gradient(input: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
        let weights = Tensor::from_slice(&[0.7, -1.3, 0.4]);
        let objective = |xs: &Tensor| -> f64 {
            let out = f(xs);
            (out * weights.narrow(0, 0, input.size()[0].min(3))).sum(Kind::Double).double_value(&[])
        };
        let xs = input.detach().set_requires_grad(true);
        let out = f(&xs) * weights.narrow(0, 0, input.size()[0].min(3));
        out.sum(Kind::Double).backward();
        let analytic = values(&xs.grad().reshape([-1]));

        let flat = input.detach().reshape([-1]);
        let step = 1e-6;
        for (i, &grad) in analytic.iter().enumerate() {
            let shifted = |delta: f64| {
                let moved = flat.copy();
                let _ = moved.get(i as i64).fill_(flat.double_value(&[i as i64]) + delta);
                objective(&moved.view(input.size().as_slice()))
            };
            let numeric = (shifted(step) - shifted(-step)) / (2.0 * step);
            assert!((numeric - grad).abs() < 1e-7, "element {i}: {numeric} vs {grad}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        tch::manual_seed(11);
        let options = (Kind::Double, Device::Cpu);
        let (batch, seq_len, width, vocab) = (3, 5, 4, 7);
        let labels = random_labels(batch, seq_len, vocab);
        let hidden = Tensor::randn([batch, seq_len, width], options);
        let head = Tensor::randn([vocab, width], options);

        let logits = hidden.matmul(&head.tr());
        check_gradient(&logits, |xs| logps_from_logits(xs, &labels, 2).unwrap().sum);
        check_gradient(&hidden, |xs| {
            sequence_logps_from_hidden(xs, &head, &labels, 3).unwrap().sum
        });
        // The LM head is [vocab, width]; the helper weights the first rows of any output, so
        // differentiate the per-sequence sums through the head as well.
        check_gradient(&head, |ws| {
            sequence_logps_from_hidden(&hidden, ws, &labels, 2).unwrap().sum
        });
    }

    #[test]
    fn half_precision_long_responses_stay_finite_and_match_f32() {
        // 1000 completion tokens whose label logit is -80 among N(0, 4) logits over 256
        // tokens: each log-prob is about -80 - ln(256) - 2 = -87.5, the sum about -87 500,
        // beyond f16's largest finite value (65 504).
        tch::manual_seed(3);
        let (batch, seq_len, vocab) = (2, 1001, 256);
        let labels = Tensor::randint(vocab, [batch, seq_len], (Kind::Int64, Device::Cpu));
        let _ = labels.get(0).get(0).fill_(IGNORE_INDEX);
        let logits = Tensor::randn([batch, seq_len, vocab], (Kind::Float, Device::Cpu)) * 2.0;
        let shifted = labels.narrow(1, 1, seq_len - 1).unsqueeze(2);
        let target_logits =
            Tensor::full([batch, seq_len - 1, 1], -80.0, (Kind::Float, Device::Cpu));
        let _ = logits.narrow(1, 0, seq_len - 1).scatter_(2, &shifted, &target_logits);

        for kind in [Kind::BFloat16, Kind::Half] {
            let low = logits.to_kind(kind);
            let reference = sequence_logps(&low.to_kind(Kind::Float), &labels).unwrap();
            let logps = sequence_logps(&low, &labels).unwrap();
            assert_eq!(logps.sum.kind(), Kind::Float);
            let sums = values(&logps.sum);
            assert!(sums.iter().all(|s| s.is_finite() && *s < -80_000.0), "{kind:?}: {sums:?}");
            assert_close(&logps.sum, &values(&reference.sum), 1e-6);
            assert_close(&logps.mean_logit, &values(&reference.mean_logit), 1e-6);
        }

        // The same sum accumulated in f16 overflows: the test above would catch a path that
        // forgot to upcast.
        let naive_half = logits.to_kind(Kind::Half).log_softmax(-1, None).sum(Kind::Half);
        assert!(naive_half.double_value(&[]).is_infinite());
    }

    #[test]
    fn half_precision_hidden_states_match_their_own_logits_in_f32() {
        tch::manual_seed(5);
        let (batch, seq_len, width, vocab) = (2, 300, 16, 64);
        let labels = random_labels(batch, seq_len, vocab);
        let hidden = (Tensor::randn([batch, seq_len, width], (Kind::Float, Device::Cpu)) * 3.0)
            .to_kind(Kind::BFloat16);
        let head =
            Tensor::randn([vocab, width], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let logits = hidden.matmul(&head.tr()).to_kind(Kind::Float);
        let reference = sequence_logps(&logits, &labels).unwrap();
        let logps = sequence_logps_from_hidden(&hidden, &head, &labels, 37).unwrap();
        assert_eq!(logps.sum.kind(), Kind::Float);
        // The bf16 products of a chunk may round differently from those of the whole batch
        // (other blocking), by at most one bf16 ulp of each logit; the sums agree to 1e-2.
        assert_close(&logps.sum, &values(&reference.sum), 1e-2);
        assert_close(&logps.mean_logit, &values(&reference.mean_logit), 1e-2);
    }

    #[test]
    fn sequences_without_completion_tokens_give_zeros() {
        let logits = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
        let labels = Tensor::full([2, 3], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        let logps = sequence_logps(&logits, &labels).unwrap();
        for field in [&logps.sum, &logps.token_count, &logps.mean_logit, &logps.mean()] {
            assert_close(field, &[0.0, 0.0], 0.0);
        }
        let one_token = sequence_logps(&logits.narrow(1, 0, 1), &labels.narrow(1, 0, 1)).unwrap();
        assert_close(&one_token.sum, &[0.0, 0.0], 0.0);
    }

    #[test]
    fn only_the_sum_carries_gradients() {
        let logits = Tensor::randn([2, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let logps = sequence_logps(&logits, &counted_labels()).unwrap();
        assert!(logps.sum.requires_grad());
        assert!(!logps.token_count.requires_grad());
        assert!(!logps.mean_logit.requires_grad());
        assert!(!logps.detach().sum.requires_grad());
    }

    #[test]
    fn split_pairs_takes_chosen_rows_first() {
        let logps = SequenceLogps {
            sum: Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0]),
            token_count: Tensor::from_slice(&[1.0, 1.0, 2.0, 2.0]),
            mean_logit: Tensor::from_slice(&[0.1, 0.2, 0.3, 0.4]),
        };
        let pairs = logps.split_pairs();
        assert_close(&pairs.chosen.sum, &[1.0, 2.0], 0.0);
        assert_close(&pairs.rejected.sum, &[3.0, 4.0], 0.0);
        assert_close(&pairs.rejected.mean(), &[1.5, 2.0], 0.0);
        assert_close(&pairs.chosen.mean_logit, &[0.1, 0.2], 0.0);

        let odd = SequenceLogps {
            sum: Tensor::from_slice(&[1.0, 2.0, 3.0]),
            token_count: Tensor::from_slice(&[1.0, 1.0, 1.0]),
            mean_logit: Tensor::from_slice(&[0.0, 0.0, 0.0]),
        };
        let error = odd.try_split_pairs().unwrap_err();
        assert!(matches!(error, Error::Shape { ref actual, .. } if actual == &[3]), "{error}");
    }

    #[test]
    fn bad_inputs_give_typed_errors_with_expected_and_actual() {
        let cpu = Device::Cpu;
        let logits = Tensor::zeros([2, 4, 5], (Kind::Float, cpu));
        let labels = Tensor::zeros([2, 4], (Kind::Int64, cpu));

        let error = sequence_logps(&logits.view([8, 5]), &labels).unwrap_err();
        assert!(matches!(error, Error::Shape { what: "logits", .. }), "{error}");
        assert!(error.to_string().contains("[8, 5]"), "{error}");

        let error = sequence_logps(&logits, &labels.view([4, 2])).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("[2, 4]") && message.contains("[4, 2]"), "{message}");

        let error = sequence_logps(&logits, &labels.to_kind(Kind::Int)).unwrap_err();
        assert!(matches!(error, Error::Dtype { what: "labels", actual: Kind::Int, .. }));

        let error = sequence_logps(&logits.to_kind(Kind::Int64), &labels).unwrap_err();
        assert!(matches!(error, Error::Dtype { what: "logits", actual: Kind::Int64, .. }));

        let out_of_range = labels.copy().fill_(5);
        let error = sequence_logps(&logits, &out_of_range).unwrap_err();
        assert!(matches!(error, Error::LabelOutOfRange { min: 5, max: 5, vocab: 5 }), "{error}");
        let negative = labels.copy().fill_(-3);
        let error = sequence_logps(&logits, &negative).unwrap_err();
        assert!(matches!(error, Error::LabelOutOfRange { min: -3, .. }), "{error}");

        let hidden = Tensor::zeros([2, 4, 3], (Kind::Float, cpu));
        let head = Tensor::zeros([5, 3], (Kind::Float, cpu));
        let error = sequence_logps_from_hidden(&hidden, &head, &labels, 0).unwrap_err();
        assert!(matches!(error, Error::ChunkTokens(0)));
        let error = sequence_logps_from_hidden(&hidden, &head.tr(), &labels, 4).unwrap_err();
        assert!(matches!(error, Error::Shape { what: "lm_head", .. }), "{error}");
        assert!(error.to_string().contains("[vocab >= 1, 3]"), "{error}");
        let error = sequence_logps_from_hidden(&hidden, &head.to_kind(Kind::Double), &labels, 4)
            .unwrap_err();
        assert!(matches!(error, Error::Dtype { what: "lm_head", actual: Kind::Double, .. }));
    }
}
