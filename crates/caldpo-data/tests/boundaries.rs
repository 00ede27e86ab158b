//! Special tokens at the prompt/response boundary, truncation, and the invariants every
//! loaded pair keeps.

mod common;

use caldpo_data::{PairDataset, PairExample, IGNORE_INDEX};
use common::{config, data, load, tokenizer};

// Special token ids of the fixture tokenizers (make_fixtures.py adds them first):
// chatml: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2; llama: <unk> 0, <s> 1, </s> 2.
const IM_START: i64 = 1;
const IM_END: i64 = 2;
const BOS: i64 = 1;
const EOS: i64 = 2;

fn count(ids: &[i64], id: i64) -> usize {
    ids.iter().filter(|&&x| x == id).count()
}

fn response(example: &PairExample, chosen: bool) -> &[i64] {
    let sequence = if chosen { &example.chosen } else { &example.rejected };
    &sequence.input_ids[example.prompt_len..]
}

/// Invariants of every kept pair: shared prompt ids, labels exactly on the response, at
/// least one labelled token, within max_length.
fn check_invariants(dataset: &PairDataset, max_length: usize, max_prompt_length: usize) {
    for example in &dataset.examples {
        let n = example.prompt_len;
        assert!(n >= 1 && n <= max_prompt_length);
        assert_eq!(example.chosen.input_ids[..n], example.rejected.input_ids[..n]);
        for sequence in [&example.chosen, &example.rejected] {
            assert!(sequence.len() > n && sequence.len() <= max_length);
            assert_eq!(sequence.labels.len(), sequence.input_ids.len());
            assert!(sequence.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
            assert_eq!(sequence.labels[n..], sequence.input_ids[n..]);
        }
        assert_ne!(example.chosen.input_ids, example.rejected.input_ids);
        assert_eq!(example.len(), example.chosen.len().max(example.rejected.len()));
    }
}

#[test]
fn invariants_hold_for_every_fixture_and_limit() {
    for (name, template) in [("chatml", "auto"), ("chatml", "no_eos.jinja"), ("llama", "auto")] {
        let tokenizer = tokenizer(name, template);
        for (max_length, max_prompt_length) in [(4096, 2048), (64, 32), (16, 8), (2, 1)] {
            let limits = config(max_length, max_prompt_length);
            let dataset = load(&data("conversational.jsonl"), &limits, &tokenizer);
            check_invariants(&dataset, max_length, max_prompt_length);
        }
    }
}

#[test]
fn chatml_response_ends_with_one_im_end_and_drops_the_newline_after_it() {
    let dataset =
        load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer("chatml", "auto"));
    for example in &dataset.examples {
        for chosen in [true, false] {
            let response = response(example, chosen);
            assert_eq!(response.last(), Some(&IM_END));
            assert_eq!(count(response, IM_END), 1);
            assert_eq!(count(response, IM_START), 0);
        }
        // The prompt ends with the generation prompt "<|im_start|>assistant\n".
        let tokenizer = tokenizer("chatml", "auto");
        let prompt = tokenizer.decode(&example.chosen.input_ids[..example.prompt_len]).unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
        assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt:?}");
    }
}

#[test]
fn template_without_eos_still_ends_each_response_with_one() {
    let tokenizer = tokenizer("chatml", "no_eos.jinja");
    let dataset = load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer);
    for example in &dataset.examples {
        for chosen in [true, false] {
            let response = response(example, chosen);
            assert_eq!(response.last(), Some(&IM_END));
            assert_eq!(count(response, IM_END), 1);
        }
    }
    // The template's own turn separator "\n" stays labelled before the appended token:
    // pair 0's chosen response is "4" + "\n" + <|im_end|>.
    let text = tokenizer.decode(response(&dataset.examples[0], true)).unwrap();
    assert_eq!(text, "4\n<|im_end|>");
}

#[test]
fn bos_appears_once_whether_the_template_or_the_tokenizer_writes_it() {
    // The llama template starts with {{ bos_token }} and the tokenizer's post-processor
    // would add <s> too: the prompt must start with exactly one.
    let templated =
        load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer("llama", "auto"));
    // no_eos.jinja writes no BOS: the tokenizer's own <s> is put in front, once.
    let untemplated = load(
        &data("conversational.jsonl"),
        &config(4096, 2048),
        &tokenizer("llama", "no_eos.jinja"),
    );
    let plain = load(&data("explicit.jsonl"), &config(4096, 2048), &tokenizer("llama", "none"));
    for dataset in [&templated, &untemplated, &plain] {
        for example in &dataset.examples {
            assert_eq!(example.chosen.input_ids[0], BOS);
            assert_ne!(example.chosen.input_ids[1], BOS);
            for chosen in [true, false] {
                assert_eq!(count(response(example, chosen), BOS), 0);
                assert_eq!(response(example, chosen).last(), Some(&EOS));
            }
        }
    }
    // In the llama template each earlier assistant turn closes with </s>, so pair 1's prompt
    // (one earlier assistant turn) holds exactly one </s>.
    let pair = &templated.examples[1];
    assert_eq!(count(&pair.chosen.input_ids[..pair.prompt_len], EOS), 1);
}

#[test]
fn twenty_times_longer_rejected_response_is_cut_alone() {
    let tokenizer = tokenizer("chatml", "auto");
    let full = load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer);
    let cut = load(&data("conversational.jsonl"), &config(64, 32), &tokenizer);
    // Pair 2 ("Say hi."): chosen "Hi there." and a rejected response 20 times as long.
    let (whole, short) = (&full.examples[2], &cut.examples[2]);
    assert!(response(whole, false).len() >= 10 * response(whole, true).len());
    // The 86-token prompt keeps its last 32 tokens; each response keeps up to 64 - 32.
    assert_eq!(whole.prompt_len, 86);
    assert_eq!(short.prompt_len, 32);
    assert_eq!(short.chosen.input_ids[..32], whole.chosen.input_ids[86 - 32..86]);
    assert_eq!(response(short, true), response(whole, true));
    assert_eq!(response(short, false), &response(whole, false)[..32]);
    assert_eq!(short.rejected.len(), 64);
    assert!(short.chosen.len() < 64);
    assert!(cut.report.truncated >= 1);
}

#[test]
fn prompt_longer_than_max_length_keeps_its_end() {
    let tokenizer = tokenizer("chatml", "auto");
    let full = load(&data("conversational.jsonl"), &config(4096, 2048), &tokenizer);
    let cut = load(&data("conversational.jsonl"), &config(64, 32), &tokenizer);
    // Pair 3's prompt is the 110-sentence LONG_PROMPT: over a thousand tokens.
    let (whole, short) = (&full.examples[3], &cut.examples[3]);
    assert!(whole.prompt_len > 1000);
    assert_eq!(short.prompt_len, 32);
    let end = &whole.chosen.input_ids[whole.prompt_len - 32..whole.prompt_len];
    assert_eq!(&short.chosen.input_ids[..32], end);
    assert_eq!(response(short, true), response(whole, true));
    assert_eq!(response(short, false), response(whole, false));
}

#[test]
fn very_long_line_loads() {
    // explicit.jsonl holds the LONG_PROMPT pair on one line of several kilobytes.
    let longest_line = std::fs::read_to_string(data("explicit.jsonl"))
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    assert!(longest_line > 5000, "{longest_line}");
    let dataset = load(&data("explicit.jsonl"), &config(4096, 2048), &tokenizer("chatml", "auto"));
    assert!(dataset.examples.iter().any(|e| e.prompt_len > 1000));
}

#[test]
fn pair_ids_are_stable_across_file_formats_and_tokenizers() {
    let chatml = tokenizer("chatml", "auto");
    let ids = |file: &str,
               tokenizer: &caldpo_data::PairTokenizer,
               max: (usize, usize)|
     -> Vec<u64> {
        load(&data(file), &config(max.0, max.1), tokenizer).examples.iter().map(|e| e.id).collect()
    };
    let reference = ids("conversational.jsonl", &chatml, (4096, 2048));
    assert_eq!(ids("conversational.parquet", &chatml, (4096, 2048)), reference);
    assert_eq!(ids("conversational.jsonl", &chatml, (64, 32)), reference);
    assert_eq!(
        ids("conversational.jsonl", &tokenizer("llama", "auto"), (4096, 2048))[..3],
        reference[..3]
    );
    let mut unique = reference.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), reference.len());
}

#[test]
fn generation_prompt_and_eos_ids() {
    let chatml = tokenizer("chatml", "auto");
    let ids = chatml.encode_prompt("What is 2+2?").unwrap();
    let text = chatml.decode(&ids).unwrap();
    // The SmolLM2 template adds its default system turn when there is none.
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(chatml.eos_token_ids(), [IM_END]);
    assert_eq!(chatml.pad_token_id(), IM_END);
    let llama = tokenizer("llama", "auto");
    assert_eq!(llama.eos_token_ids(), [EOS]);
    // No pad_token in the llama fixture's config: padding falls back to the EOS.
    assert_eq!(llama.pad_token_id(), EOS);
    let plain = tokenizer("llama", "none").encode_prompt("Hi").unwrap();
    assert_eq!(plain[0], BOS);
    assert_eq!(tokenizer("llama", "none").decode(&plain[1..]).unwrap(), "Hi");
    assert_ne!(chatml.fingerprint(), tokenizer("chatml", "none").fingerprint());
    assert_ne!(chatml.fingerprint(), llama.fingerprint());
    assert_eq!(chatml.fingerprint(), tokenizer("chatml", "auto").fingerprint());
}

#[test]
fn plain_text_keeps_hh_transcripts_and_writes_messages_as_one() {
    let tokenizer = tokenizer("chatml", "none");
    // hh.jsonl row 0 is "\n\nHuman: What is 2+2?\n\nAssistant: 4" against "... 5": the prompt
    // is the raw text up to the last "\n\nAssistant:", the response the rest plus the EOS.
    let hh = load(&data("hh.jsonl"), &config(4096, 2048), &tokenizer);
    let pair = &hh.examples[0];
    let prompt = tokenizer.decode(&pair.chosen.input_ids[..pair.prompt_len]).unwrap();
    assert_eq!(prompt, "\n\nHuman: What is 2+2?\n\nAssistant:");
    assert_eq!(tokenizer.decode(response(pair, true)).unwrap(), " 4<|im_end|>");
    // sharegpt.json row 1 has a system field and two user turns around an assistant one.
    let sharegpt = load(&data("sharegpt.json"), &config(4096, 2048), &tokenizer);
    let pair = &sharegpt.examples[1];
    let prompt = tokenizer.decode(&pair.chosen.input_ids[..pair.prompt_len]).unwrap();
    assert_eq!(
        prompt,
        "Réponds en français 🇫🇷\n\nHuman: Bonjour, ça va ?\n\nAssistant: Oui !\n\nHuman: \
         日本語で答えて\n\nAssistant:"
    );
    assert_eq!(tokenizer.decode(response(pair, false)).unwrap(), " No.<|im_end|>");
}
