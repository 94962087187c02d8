//! The on-device sampling pipeline (issue 4), checked on the CPU against definitions written
//! out here in plain Rust: each filter's surviving set, each penalty's output, logprobs, the
//! distribution of draws (chi-square), seeding, batching, validation, and the host-read gate.

use mlx_rs::{Array, Dtype};
use mlxd::sampling::{
    read_ids, read_logprobs, sample_batch, sample_batch_inspect, sample_batch_with_logprobs, set_chunked_top_k,
    set_compiled, thread_host_read_stats, SamplingError, SamplingParams, SequenceSampler, MAX_HOST_READ_ELEMENTS,
};
use std::collections::{BTreeMap, HashSet};

/// Fixed logits with no near-ties, so no threshold below sits on a rounding boundary.
const LOGITS: [f32; 12] = [2.3, -1.1, 0.7, 3.1, 0.05, -0.4, 1.6, -2.5, 0.9, 2.8, -0.8, 1.2];

/// Reads a small or large test array (tests are outside the gate's jurisdiction).
fn host_f32(a: &Array) -> Vec<f32> {
    let a = a.as_type::<f32>().unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn row(values: &[f32]) -> Array {
    Array::from_slice(values, &[1, values.len() as i32])
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

fn sampler(p: &SamplingParams, vocab: usize, prompt: &[u32]) -> SequenceSampler {
    SequenceSampler::new(p, vocab, prompt).expect("valid params")
}

fn one_token(a: &Array) -> u32 {
    read_ids(a).expect("read")[0]
}

// ---------------------------------------------------------------------------------------------
// Plain-Rust definitions.

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Indices by descending value.
fn by_value_desc(x: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap());
    idx
}

/// Probabilities of the tempered logits renormalized over `keep` (0 elsewhere).
fn renormalized(scaled: &[f64], keep: &[bool]) -> Vec<f64> {
    let masked: Vec<f64> = scaled.iter().zip(keep).map(|(&s, &k)| if k { s } else { f64::NEG_INFINITY }).collect();
    softmax(&masked)
}

/// Which tokens survive temperature, top-k, top-p, min-p and typical-p, in that order, each
/// filter seeing the renormalized distribution the previous ones left.
fn reference_keep(logits: &[f32], p: &SamplingParams) -> Vec<bool> {
    let t = p.temperature as f64;
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let order = by_value_desc(&scaled);
    let mut keep = vec![true; logits.len()];
    if p.top_k > 0 {
        for &i in &order[p.top_k as usize..] {
            keep[i] = false;
        }
    }
    if p.top_p < 1.0 {
        let probs = renormalized(&scaled, &keep);
        let mut mass = 0.0;
        for &i in &order {
            if mass >= p.top_p as f64 {
                keep[i] = false;
            }
            mass += probs[i];
        }
    }
    if p.min_p > 0.0 {
        let probs = softmax(&scaled);
        let best = probs.iter().cloned().fold(0.0, f64::max);
        for i in 0..keep.len() {
            if probs[i] < p.min_p as f64 * best {
                keep[i] = false;
            }
        }
    }
    if p.typical_p < 1.0 {
        let probs = renormalized(&scaled, &keep);
        let entropy: f64 = probs.iter().filter(|&&q| q > 0.0).map(|&q| -q * q.ln()).sum();
        let kept: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
        let distance = |i: usize| (-probs[i].ln() - entropy).abs();
        let mut by_distance = kept.clone();
        by_distance.sort_by(|&a, &b| distance(a).partial_cmp(&distance(b)).unwrap());
        let mut mass = 0.0;
        let mut chosen = HashSet::new();
        for &i in &by_distance {
            if mass >= p.typical_p as f64 {
                break;
            }
            chosen.insert(i);
            mass += probs[i];
        }
        for i in kept {
            if !chosen.contains(&i) {
                keep[i] = false;
            }
        }
    }
    keep
}

/// The distribution a sampler with `p` should draw from.
fn reference_distribution(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / p.temperature as f64).collect();
    renormalized(&scaled, &reference_keep(logits, p))
}

/// Logit bias, then the repetition penalty over the last N of prompt + generated, then
/// presence/frequency over generated tokens (OpenAI's formula).
fn reference_processed(logits: &[f32], p: &SamplingParams, prompt: &[u32], generated: &[u32]) -> Vec<f32> {
    let mut l = logits.to_vec();
    for (&t, &b) in &p.logit_bias {
        l[t as usize] += b;
    }
    if p.repetition_penalty != 1.0 {
        let all: Vec<u32> = prompt.iter().chain(generated).cloned().collect();
        let window: HashSet<u32> = all[all.len().saturating_sub(p.repetition_context_size)..].iter().cloned().collect();
        for t in window {
            let x = &mut l[t as usize];
            *x = if *x < 0.0 { *x * p.repetition_penalty } else { *x / p.repetition_penalty };
        }
    }
    let mut counts = vec![0f32; l.len()];
    for &t in generated {
        counts[t as usize] += 1.0;
    }
    for (x, &c) in l.iter_mut().zip(&counts) {
        let present = if c > 0.0 { 1.0 } else { 0.0 };
        *x -= p.presence_penalty * present + p.frequency_penalty * c;
    }
    l
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    x.iter().map(|&v| v as f64 - m - s.ln()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w}");
    }
}

// ---------------------------------------------------------------------------------------------
// Filters and penalties against the definitions.

/// The survivors and their tempered values for one configuration, from the real graph.
fn device_candidates(p: &SamplingParams, logits: &[f32]) -> Vec<f32> {
    let mut s = sampler(p, logits.len(), &[]);
    let out = sample_batch_inspect(&row(logits), &mut [&mut s]).expect("sample");
    host_f32(&out.candidates)
}

fn check_filter(p: SamplingParams, what: &str) {
    check_filter_on(&LOGITS, p, what)
}

fn check_filter_on(logits: &[f32], p: SamplingParams, what: &str) {
    let got = device_candidates(&p, logits);
    let keep = reference_keep(logits, &p);
    let got_keep: Vec<bool> = got.iter().map(|v| v.is_finite()).collect();
    assert_eq!(got_keep, keep, "{what}: surviving set");
    assert!(keep.iter().any(|&k| !k) || what == "temperature only", "{what}: the case should remove something");
    for (i, &k) in keep.iter().enumerate() {
        if k {
            let want = logits[i] / p.temperature;
            assert!((got[i] - want).abs() < 1e-5, "{what}: tempered logit {i}: got {}, want {want}", got[i]);
        }
    }
}

#[test]
fn each_filter_keeps_what_its_definition_keeps() {
    check_filter(params(|p| p.temperature = 0.8), "temperature only");
    check_filter(params(|p| (p.temperature, p.top_k) = (0.8, 4)), "top-k");
    check_filter(params(|p| (p.temperature, p.top_p) = (0.8, 0.7)), "top-p");
    check_filter(params(|p| (p.temperature, p.top_p) = (2.5, 0.7)), "top-p, hot");
    check_filter(params(|p| (p.temperature, p.min_p) = (0.8, 0.15)), "min-p");
    check_filter(params(|p| (p.temperature, p.min_p) = (2.0, 0.3)), "min-p, hot");
    check_filter(params(|p| (p.temperature, p.typical_p) = (1.0, 0.6)), "typical-p");
    check_filter(params(|p| (p.temperature, p.typical_p) = (1.7, 0.5)), "typical-p, hot");
    check_filter(
        params(|p| (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) = (1.3, 8, 0.95, 0.05, 0.9)),
        "all four",
    );
    check_filter(params(|p| (p.temperature, p.top_k, p.top_p) = (1.1, 6, 0.8)), "top-k then top-p (renormalized)");

    // A vocabulary wider than the truncation bucket (16): only the best candidates are sorted.
    let wide: Vec<f32> = (0..40).map(|i| ((i * 29) % 41) as f32 * 0.13 - 2.5 + i as f32 * 0.001).collect();
    check_filter_on(&wide, params(|p| (p.temperature, p.top_k) = (0.9, 5)), "top-k, truncated");
    check_filter_on(
        &wide,
        params(|p| (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) = (1.4, 12, 0.9, 0.2, 0.95)),
        "all four, truncated",
    );
    check_filter_on(&wide, params(|p| (p.temperature, p.top_p) = (0.6, 0.85)), "top-p, full sort");
}

#[test]
fn filters_match_uncompiled_graph() {
    let p = params(|p| (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) = (1.3, 8, 0.95, 0.05, 0.9));
    let compiled = device_candidates(&p, &LOGITS);
    set_compiled(false);
    let eager = device_candidates(&p, &LOGITS);
    set_compiled(true);
    assert_eq!(
        compiled.iter().map(|v| v.is_finite()).collect::<Vec<_>>(),
        eager.iter().map(|v| v.is_finite()).collect::<Vec<_>>()
    );
    assert_close(
        &compiled.iter().filter(|v| v.is_finite()).cloned().collect::<Vec<_>>(),
        &eager.iter().filter(|v| v.is_finite()).cloned().collect::<Vec<_>>(),
        1e-6,
        "compiled vs eager",
    );
}

/// Runs `generated` through `accept` after `prompt`, then returns the graph's processed logits.
fn device_processed(p: &SamplingParams, prompt: &[u32], generated: &[u32]) -> Vec<f32> {
    let mut s = sampler(p, LOGITS.len(), prompt);
    for &t in generated {
        s.accept(&Array::from_slice(&[t], &[1])).expect("accept");
    }
    let out = sample_batch_inspect(&row(&LOGITS), &mut [&mut s]).expect("sample");
    host_f32(&out.processed)
}

#[test]
fn each_penalty_matches_its_definition() {
    let prompt = [3u32, 0, 5, 9, 3];
    let generated = [1u32, 9, 9, 7, 1, 9];
    let cases = [
        ("logit bias", params(|p| p.logit_bias = BTreeMap::from([(3, -2.5), (7, 4.0), (11, 0.25)]))),
        ("repetition penalty", params(|p| p.repetition_penalty = 1.3)),
        ("repetition penalty, short window", params(|p| (p.repetition_penalty, p.repetition_context_size) = (1.5, 4))),
        ("presence penalty", params(|p| p.presence_penalty = 0.7)),
        ("frequency penalty", params(|p| p.frequency_penalty = 0.4)),
        ("negative presence + frequency", params(|p| (p.presence_penalty, p.frequency_penalty) = (-0.5, -0.3))),
        (
            "all penalties",
            params(|p| {
                p.logit_bias = BTreeMap::from([(2, 1.0), (9, -1.0)]);
                p.repetition_penalty = 1.2;
                p.repetition_context_size = 7;
                p.presence_penalty = 0.5;
                p.frequency_penalty = 0.25;
            }),
        ),
    ];
    for (what, p) in cases {
        let want = reference_processed(&LOGITS, &p, &prompt, &generated);
        assert_ne!(want, LOGITS.to_vec(), "{what}: the case should change something");
        assert_close(&device_processed(&p, &prompt, &generated), &want, 1e-6, what);
    }
}

#[test]
fn repetition_window_slides_over_prompt_and_output() {
    // Window of 4 over [1 2 3 4 5 6 | 7 3 9] is {6, 7, 3, 9}: 5 has left it, 3 came back.
    let p = params(|p| (p.repetition_penalty, p.repetition_context_size) = (2.0, 4));
    let got = device_processed(&p, &[1, 2, 3, 4, 5, 6], &[7, 3, 9]);
    let want = reference_processed(&LOGITS, &p, &[1, 2, 3, 4, 5, 6], &[7, 3, 9]);
    assert_close(&got, &want, 1e-6, "sliding window");
    assert_eq!(got[5], LOGITS[5], "token 5 is outside the window");
    assert_eq!(got[3], LOGITS[3] / 2.0, "token 3 re-entered the window");
}

#[test]
fn sampled_tokens_update_the_penalty_state() {
    // Greedy with a strong frequency penalty: the sampler's own picks must be counted.
    let p = params(|p| p.frequency_penalty = 2.0);
    let mut s = sampler(&p, LOGITS.len(), &[]);
    let mut generated = Vec::new();
    for _ in 0..6 {
        let out = sample_batch_inspect(&row(&LOGITS), &mut [&mut s]).expect("sample");
        let want = reference_processed(&LOGITS, &p, &[], &generated);
        assert_close(&host_f32(&out.processed), &want, 1e-6, "processed after own picks");
        let t = one_token(&out.tokens);
        let argmax = (0..want.len()).max_by(|&a, &b| want[a].partial_cmp(&want[b]).unwrap()).unwrap();
        assert_eq!(t as usize, argmax, "greedy picks the penalized argmax");
        generated.push(t);
    }
    assert!(generated.iter().collect::<HashSet<_>>().len() > 1, "the penalty moved the argmax: {generated:?}");
}

// ---------------------------------------------------------------------------------------------
// Randomness.

fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = sampler(p, logits.len(), &[]);
    let logits = row(logits);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let chunk = (n - out.len()).min(200);
        let picks: Vec<Array> = (0..chunk).map(|_| s.sample(&logits).expect("sample")).collect();
        out.extend(read_ids(&mlx_rs::ops::concatenate(&picks, 0).unwrap()).expect("read"));
    }
    out
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let flat = [0.0f32; 16];
    let seeded = |seed| params(|p| (p.temperature, p.seed) = (1.0, Some(seed)));
    let a = draws(&seeded(7), &flat, 64);
    let b = draws(&seeded(7), &flat, 64);
    let c = draws(&seeded(8), &flat, 64);
    assert_eq!(a, b, "same seed");
    assert_ne!(a, c, "different seeds");
    assert!(a.iter().collect::<HashSet<_>>().len() > 8, "draws spread over the vocabulary: {a:?}");
    // Filters do not disturb the seeding either.
    let filtered = |seed| params(|p| (p.temperature, p.top_k, p.top_p, p.seed) = (0.9, 10, 0.95, Some(seed)));
    assert_eq!(draws(&filtered(3), &LOGITS, 64), draws(&filtered(3), &LOGITS, 64));
    assert_ne!(draws(&filtered(3), &LOGITS, 64), draws(&filtered(4), &LOGITS, 64));
}

/// Chi-square critical values at p = 0.001, by degrees of freedom.
const CHI2_999: [f64; 11] = [0.0, 10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588];

fn chi_square(p: &SamplingParams, logits: &[f32], n: usize) {
    let expected = reference_distribution(logits, p);
    let got = draws(p, logits, n);
    let mut counts = vec![0usize; logits.len()];
    for t in got {
        counts[t as usize] += 1;
    }
    let mut stat = 0.0;
    let mut cells = 0;
    for (i, (&c, &e)) in counts.iter().zip(&expected).enumerate() {
        if e == 0.0 {
            assert_eq!(c, 0, "token {i} was filtered out but drawn {c} times");
            continue;
        }
        let e = e * n as f64;
        stat += (c as f64 - e).powi(2) / e;
        cells += 1;
    }
    let df = cells - 1;
    assert!(
        stat < CHI2_999[df],
        "chi-square {stat:.2} >= {} (df {df}); counts {counts:?}, expected {expected:?}",
        CHI2_999[df]
    );
}

#[test]
fn temperature_draws_follow_the_tempered_softmax() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0];
    chi_square(&params(|p| (p.temperature, p.seed) = (0.7, Some(1234))), &logits, 20_000);
}

#[test]
fn top_p_draws_follow_the_renormalized_nucleus() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0, 1.4, -2.0];
    let p = params(|p| (p.temperature, p.top_p, p.seed) = (1.5, 0.8, Some(99)));
    let kept = reference_keep(&logits, &p).iter().filter(|&&k| k).count();
    assert!(kept > 2 && kept < logits.len(), "the case keeps a strict subset ({kept})");
    chi_square(&p, &logits, 20_000);
}

// ---------------------------------------------------------------------------------------------
// Batching.

/// `rows` rows of `v` logits, each row its own pattern with no ties.
fn varied_logits(rows: usize, v: usize) -> Vec<Vec<f32>> {
    (0..rows).map(|r| (0..v).map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.31 - 2.0 + (i as f32 * 0.01)).collect()).collect()
}

#[test]
fn a_batch_gives_each_row_what_it_gets_alone() {
    let v = 32usize;
    let table = varied_logits(3, v);
    let rows = [
        params(|p| {
            (p.temperature, p.top_k, p.top_p, p.seed) = (0.8, 5, 0.9, Some(1));
            p.repetition_penalty = 1.3;
            p.logprobs = Some(3);
        }),
        params(|p| {
            p.presence_penalty = 0.6;
            p.frequency_penalty = 0.3;
            p.logit_bias = BTreeMap::from([(4, 2.0), (30, -1.0)]);
            p.logprobs = Some(1);
        }),
        params(|p| {
            (p.temperature, p.min_p, p.typical_p, p.seed) = (1.2, 0.1, 0.9, Some(3));
            (p.repetition_penalty, p.repetition_context_size) = (1.1, 8);
        }),
    ];
    let prompt = [1u32, 2, 3, 4, 4];
    let steps = 12;

    let alone: Vec<(Vec<u32>, Vec<f32>)> = rows
        .iter()
        .zip(&table)
        .map(|(p, logits)| {
            let mut s = sampler(p, v, &prompt);
            let (mut ids, mut lps) = (Vec::new(), Vec::new());
            for _ in 0..steps {
                let out = s.sample_with_logprobs(&row(logits)).expect("sample");
                ids.push(one_token(&out.tokens));
                if let Some(lp) = out.logprobs {
                    lps.extend(read_logprobs(&lp.chosen).unwrap());
                }
            }
            (ids, lps)
        })
        .collect();

    for compiled in [true, false] {
        set_compiled(compiled);
        let mut samplers: Vec<SequenceSampler> = rows.iter().map(|p| sampler(p, v, &prompt)).collect();
        let flat: Vec<f32> = table.concat();
        let logits = Array::from_slice(&flat, &[3, v as i32]);
        let mut got: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); 3];
        for _ in 0..steps {
            let mut refs: Vec<&mut SequenceSampler> = samplers.iter_mut().collect();
            let out = sample_batch_with_logprobs(&logits, &mut refs).expect("sample");
            let ids = read_ids(&out.tokens).unwrap();
            let chosen = read_logprobs(&out.logprobs.expect("logprobs").chosen).unwrap();
            for r in 0..3 {
                got[r].0.push(ids[r]);
                if rows[r].logprobs.is_some() {
                    got[r].1.push(chosen[r]);
                }
            }
        }
        set_compiled(true);
        for r in 0..3 {
            assert_eq!(got[r].0, alone[r].0, "row {r} tokens (compiled: {compiled})");
            assert_close(&got[r].1, &alone[r].1, 1e-5, &format!("row {r} logprobs (compiled: {compiled})"));
        }
    }
    assert!(alone[0].0 != alone[2].0, "rows differ, so the comparison means something");
}

/// Rows leave and the batch goes on (a finished request), and a row steps alone after being
/// batched: each row still draws what it draws alone. (A steady batch steps from the state
/// its last step left stacked; a changed one takes each row's state out first.)
#[test]
fn rows_draw_the_same_when_the_batch_changes_under_them() {
    let v = 32usize;
    let table = varied_logits(3, v);
    let rows = [
        params(|p| {
            (p.temperature, p.top_k, p.seed) = (0.9, 8, Some(7));
            (p.repetition_penalty, p.repetition_context_size) = (1.4, 4);
        }),
        params(|p| (p.temperature, p.top_p, p.seed, p.presence_penalty) = (1.1, 0.95, Some(8), 0.5)),
        params(|p| {
            (p.temperature, p.seed) = (0.7, Some(9));
            (p.repetition_penalty, p.repetition_context_size, p.frequency_penalty) = (1.2, 16, 0.2);
        }),
    ];
    let prompt = [1u32, 2, 3, 2, 1];
    let alone: Vec<Vec<u32>> = rows
        .iter()
        .zip(&table)
        .map(|(p, logits)| {
            let mut s = sampler(p, v, &prompt);
            (0..16).map(|_| one_token(&s.sample(&row(logits)).expect("sample"))).collect()
        })
        .collect();
    let mut samplers: Vec<SequenceSampler> = rows.iter().map(|p| sampler(p, v, &prompt)).collect();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 3];
    // (rows stepping together, steps)
    for (members, steps) in [(vec![0usize, 1, 2], 6), (vec![0, 2], 5), (vec![2, 0], 2), (vec![2], 3)] {
        let flat: Vec<f32> = members.iter().flat_map(|&m| table[m].clone()).collect();
        let logits = Array::from_slice(&flat, &[members.len() as i32, v as i32]);
        for _ in 0..steps {
            // The members, in their order.
            let mut all: Vec<Option<&mut SequenceSampler>> = samplers.iter_mut().map(Some).collect();
            let mut refs: Vec<&mut SequenceSampler> =
                members.iter().map(|&m| all[m].take().expect("distinct members")).collect();
            let ids = read_ids(&sample_batch(&logits, &mut refs).expect("sample")).unwrap();
            for (k, &m) in members.iter().enumerate() {
                got[m].push(ids[k]);
            }
        }
    }
    for r in 0..3 {
        assert_eq!(got[r][..], alone[r][..got[r].len()], "row {r}");
    }
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [13, 6, 16]);
}

#[test]
fn batch_of_greedy_and_sampled_rows_is_one_call() {
    let greedy = params(|_| {});
    let hot = params(|p| (p.temperature, p.top_k, p.seed) = (1.0, 3, Some(5)));
    let mut a = sampler(&greedy, LOGITS.len(), &[]);
    let mut b = sampler(&hot, LOGITS.len(), &[]);
    let logits = Array::from_slice(&[LOGITS, LOGITS].concat(), &[2, LOGITS.len() as i32]);
    let before = thread_host_read_stats();
    for _ in 0..20 {
        let ids = read_ids(&sample_batch(&logits, &mut [&mut a, &mut b]).unwrap()).unwrap();
        assert_eq!(ids[0], 3, "greedy row picks the argmax");
        assert!([3, 9, 0].contains(&ids[1]), "top-3 row stays in the top 3: {}", ids[1]);
    }
    let after = thread_host_read_stats();
    assert_eq!((after.reads - before.reads, after.bytes - before.bytes), (20, 20 * 2 * 4));
}

// ---------------------------------------------------------------------------------------------
// Logprobs.

#[test]
fn logprobs_equal_a_plain_log_softmax() {
    let logits: Vec<f32> = (0..40).map(|i| ((i * 37) % 23) as f32 * 0.4 - 3.0 + i as f32 * 0.003).collect();
    for (what, p) in [
        ("greedy", params(|p| p.logprobs = Some(5))),
        ("sampled", params(|p| (p.temperature, p.top_p, p.seed, p.logprobs) = (0.9, 0.9, Some(2), Some(20)))),
        (
            "after penalties",
            params(|p| (p.frequency_penalty, p.logit_bias, p.logprobs) = (0.5, BTreeMap::from([(1, 3.0)]), Some(4))),
        ),
        ("chosen only", params(|p| p.logprobs = Some(0))),
    ] {
        let mut s = sampler(&p, logits.len(), &[]);
        let mut generated = Vec::new();
        for _ in 0..3 {
            let out = s.sample_with_logprobs(&row(&logits)).expect("sample");
            let token = one_token(&out.tokens);
            let lp = out.logprobs.expect("asked for logprobs");
            let want = log_softmax(&reference_processed(&logits, &p, &[], &generated));
            let chosen = read_logprobs(&lp.chosen).unwrap();
            assert!(
                (chosen[0] as f64 - want[token as usize]).abs() < 1e-5,
                "{what}: chosen {chosen:?} vs {}",
                want[token as usize]
            );
            let n = p.logprobs.unwrap() as usize;
            let ids = read_ids(&lp.top_ids).unwrap();
            let values = read_logprobs(&lp.top_logprobs).unwrap();
            assert_eq!((ids.len(), values.len()), (n, n), "{what}: width");
            let order = by_value_desc(&want);
            assert_eq!(ids, order[..n].iter().map(|&i| i as u32).collect::<Vec<_>>(), "{what}: top ids");
            for (&id, &v) in ids.iter().zip(&values) {
                assert!((v as f64 - want[id as usize]).abs() < 1e-5, "{what}: logprob of {id}");
            }
            generated.push(token);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

#[test]
fn validation_errors_name_the_field_and_the_bound() {
    let v = 49152;
    let check = |p: SamplingParams, field: &str, message: &str| {
        let e = p.validate(v).expect_err(field);
        assert_eq!(e.to_string(), message);
        assert_eq!(e.field(), Some(field));
        assert!(e.code() == "invalid_parameter" || e.code() == "token_out_of_vocabulary");
        let e = SequenceSampler::new(&p, v, &[]).expect_err("constructor validates");
        assert_eq!(e.to_string(), message);
    };
    check(params(|p| p.top_p = 1.5), "top_p", "`top_p` must be in (0, 1], got 1.5");
    check(params(|p| p.top_p = 0.0), "top_p", "`top_p` must be in (0, 1], got 0");
    check(params(|p| p.temperature = -1.0), "temperature", "`temperature` must be in [0, inf), got -1");
    check(params(|p| p.temperature = f32::NAN), "temperature", "`temperature` must be in [0, inf), got NaN");
    check(params(|p| p.top_k = 50_000), "top_k", "`top_k` must be in [0, 49152], got 50000");
    check(params(|p| p.min_p = 1.2), "min_p", "`min_p` must be in [0, 1], got 1.2");
    check(params(|p| p.typical_p = -0.1), "typical_p", "`typical_p` must be in (0, 1], got -0.1");
    check(
        params(|p| p.repetition_penalty = 0.0),
        "repetition_penalty",
        "`repetition_penalty` must be in (0, inf), got 0",
    );
    check(
        params(|p| p.repetition_context_size = 0),
        "repetition_context_size",
        "`repetition_context_size` must be in [1, 4096], got 0",
    );
    check(params(|p| p.presence_penalty = 2.5), "presence_penalty", "`presence_penalty` must be in [-2, 2], got 2.5");
    check(
        params(|p| p.frequency_penalty = -3.0),
        "frequency_penalty",
        "`frequency_penalty` must be in [-2, 2], got -3",
    );
    check(
        params(|p| p.logit_bias = BTreeMap::from([(999_999, 1.0)])),
        "logit_bias",
        "`logit_bias` token 999999 is outside the vocabulary (size 49152)",
    );
    check(
        params(|p| p.logit_bias = BTreeMap::from([(5, 150.0)])),
        "logit_bias",
        "`logit_bias` must be in [-100, 100], got 150 for token 5",
    );
    check(params(|p| p.logprobs = Some(21)), "logprobs", "`logprobs` must be in [0, 20], got 21");
    assert_eq!(params(|p| p.top_p = 1.5).validate(v).unwrap_err().code(), "invalid_parameter");
    assert_eq!(
        params(|p| p.logit_bias = BTreeMap::from([(999_999, 1.0)])).validate(v).unwrap_err().code(),
        "token_out_of_vocabulary"
    );
    assert!(SamplingParams::default().validate(v).is_ok());
}

#[test]
fn params_deserialize_with_defaults_off_and_unknown_fields_refused() {
    let p: SamplingParams = serde_json::from_str("{}").unwrap();
    assert_eq!(p, SamplingParams::default());
    let p: SamplingParams =
        serde_json::from_str(r#"{"temperature": 0.7, "top_p": 0.9, "logit_bias": {"5": -100, "17": 2.5}, "seed": 42}"#)
            .unwrap();
    assert_eq!(p.logit_bias, BTreeMap::from([(5, -100.0), (17, 2.5)]));
    assert_eq!((p.temperature, p.top_p, p.seed, p.top_k), (0.7, 0.9, Some(42), 0));
    let e = serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.7}"#).unwrap_err();
    assert!(e.to_string().contains("temprature"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The host-read gate.

#[test]
fn the_read_gate_refuses_vocabulary_sized_arrays() {
    let logits = Array::zeros::<f32>(&[2, 49152]).unwrap();
    let ids = Array::zeros::<u32>(&[2, 49152]).unwrap();
    let before = thread_host_read_stats();
    for (what, result) in [
        ("f32 [B, V] as ids", read_ids(&logits).map(|_| ())),
        ("u32 [B, V] as ids", read_ids(&ids).map(|_| ())),
        ("f32 [B, V] as logprobs", read_logprobs(&logits).map(|_| ())),
        ("f32 [3] as ids", read_ids(&Array::from_slice(&[1.0f32, 2.0, 3.0], &[3])).map(|_| ())),
        ("one too many", read_ids(&Array::zeros::<u32>(&[MAX_HOST_READ_ELEMENTS as i32 + 1]).unwrap()).map(|_| ())),
    ] {
        let e: SamplingError = result.expect_err(what);
        assert_eq!(e.code(), "host_read_refused", "{what}");
    }
    let after = thread_host_read_stats();
    assert_eq!((after.reads, after.refused - before.refused), (before.reads, 5));

    let ok = read_ids(&Array::from_slice(&[7u32, 8, 9], &[3])).unwrap();
    assert_eq!(ok, vec![7, 8, 9]);
    let last = thread_host_read_stats();
    assert_eq!((last.reads - after.reads, last.bytes - after.bytes), (1, 12));
    assert_eq!(read_ids(&Array::from_slice(&[5i32, 6], &[2])).unwrap(), vec![5, 6]);
}

/// A decode loop over a fake model (logits = row `token` of a fixed `[V, V]` table, all on
/// the device): for every built-in sampler, each step moves exactly one `u32` to the host.
#[test]
fn decode_reads_one_id_per_step_for_every_sampler() {
    let v = 64usize;
    let table: Vec<f32> = (0..v * v).map(|i| ((i * 2654435761usize) % 1000) as f32 / 250.0 - 2.0).collect();
    let table = Array::from_slice(&table, &[v as i32, v as i32]);
    let configs = [
        ("greedy", params(|_| {})),
        ("temperature", params(|p| p.temperature = 0.8)),
        ("top-k", params(|p| (p.temperature, p.top_k) = (0.8, 10))),
        ("top-p", params(|p| (p.temperature, p.top_p) = (0.8, 0.9))),
        ("min-p", params(|p| (p.temperature, p.min_p) = (0.8, 0.05))),
        ("typical-p", params(|p| (p.temperature, p.typical_p) = (0.8, 0.9))),
        ("repetition", params(|p| p.repetition_penalty = 1.1)),
        ("presence/frequency", params(|p| (p.presence_penalty, p.frequency_penalty) = (0.5, 0.5))),
        ("logit bias", params(|p| p.logit_bias = BTreeMap::from([(3, 5.0)]))),
        (
            "everything",
            params(|p| {
                (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) = (0.7, 50, 0.9, 0.05, 0.95);
                (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) = (1.1, 0.2, 0.2);
                p.logit_bias = BTreeMap::from([(1, -1.0)]);
            }),
        ),
    ];
    let steps = 16u64;
    for (what, p) in configs {
        let mut s = sampler(&p, v, &[1, 2, 3]);
        let mut y = Array::from_slice(&[3u32], &[1]);
        let before = thread_host_read_stats();
        for _ in 0..steps {
            let logits = table.take_axis(&y, 0).unwrap(); // [1, V], never leaves the device
            y = s.sample(&logits).expect("sample");
            let id = read_ids(&y).expect("read")[0];
            assert!((id as usize) < v);
        }
        let after = thread_host_read_stats();
        assert_eq!(after.reads - before.reads, steps, "{what}: reads");
        assert_eq!(after.bytes - before.bytes, steps * 4, "{what}: bytes");
        assert_eq!(after.refused, before.refused, "{what}: refused reads");
        assert_eq!(after.copies, before.copies, "{what}: reads that needed a device copy first");
    }
    assert_eq!(Array::zeros::<u32>(&[1]).unwrap().dtype(), Dtype::Uint32);
}

/// Top-k candidates found through the best chunks (the default) are those one partition of the
/// whole vocabulary finds: the same k tokens, and never a dropped token above a kept one, also
/// when the threshold falls inside a run of ties.
#[test]
fn chunked_top_k_keeps_what_a_full_partition_keeps() {
    let v = 32_768usize;
    let distinct: Vec<f32> = (0..v).map(|i| ((i * 2_654_435_761usize) % 1_000_003) as f32 / 100_000.0).collect();
    let tied: Vec<f32> = distinct.iter().map(|x| (x * 2.0).round() / 2.0).collect(); // many equal values
    for (what, logits) in [("distinct", &distinct), ("tied", &tied)] {
        for k in [1u32, 7, 16, 50, 128] {
            let p = params(|p| (p.temperature, p.top_k, p.seed) = (1.0, k, Some(1)));
            set_chunked_top_k(true);
            let chunked = device_candidates(&p, logits);
            set_chunked_top_k(false);
            let full = device_candidates(&p, logits);
            set_chunked_top_k(true);
            for (how, got) in [("chunked", &chunked), ("full partition", &full)] {
                let kept: Vec<usize> = (0..v).filter(|&i| got[i].is_finite()).collect();
                assert_eq!(kept.len(), k as usize, "{what} k={k} {how}: kept {}", kept.len());
                let lowest_kept = kept.iter().map(|&i| logits[i]).fold(f32::INFINITY, f32::min);
                let highest_dropped =
                    (0..v).filter(|&i| !got[i].is_finite()).map(|i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
                assert!(
                    lowest_kept >= highest_dropped,
                    "{what} k={k} {how}: kept {lowest_kept} < dropped {highest_dropped}"
                );
            }
            if what == "distinct" {
                assert_eq!(
                    chunked.iter().map(|x| x.is_finite()).collect::<Vec<_>>(),
                    full.iter().map(|x| x.is_finite()).collect::<Vec<_>>(),
                    "k={k}: the same tokens"
                );
            }
        }
    }
}
