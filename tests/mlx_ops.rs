//! The MLX operations mlxd builds on, checked against values computed here by hand or by plain
//! Rust loops. They run on whatever device MLX defaults to: the CPU in CI, the GPU where
//! `LD_LIBRARY_PATH` selects MLX's CUDA library (docs/platforms.md records such a run).

mod common;

use common::pseudo;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::{argmax, take_along_axis, topk, IndexOp};
use mlx_rs::ops::{self, argpartition, cumsum, dequantize, matmul, quantize, quantized_matmul, softmax_axis};
use mlx_rs::transforms::{async_eval, compile::compile, eval};
use mlx_rs::{random, Array, Dtype, Stream};

fn vec_f32(a: &Array) -> Vec<f32> {
    a.eval().expect("eval");
    a.as_slice::<f32>().to_vec()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= tol, "{what}[{i}]: got {g}, want {w} (rel err {err:e} > {tol:e})");
    }
}

/// MLX's CUDA backend runs f32 matmuls in TF32 (10-bit mantissa): relative errors near 1e-3
/// there, 1e-6 on the CPU. Measured on an H100: 5.4e-4 for a 33-long dot product.
fn matmul_tolerance() -> f32 {
    if mlx_rs::Device::default().to_string().contains("gpu") { 3e-3 } else { 1e-5 }
}

fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

#[test]
fn matmul_small_and_against_loops() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
    let b = Array::from_slice(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]);
    assert_eq!(vec_f32(&matmul(&a, &b).unwrap()), vec![19.0, 22.0, 43.0, 50.0]);

    let (m, k, n) = (7, 33, 5);
    let (x, y) = (pseudo(m * k, 1), pseudo(k * n, 2));
    let got = matmul(Array::from_slice(&x, &[m as i32, k as i32]), Array::from_slice(&y, &[k as i32, n as i32])).unwrap();
    assert_close(&vec_f32(&got), &naive_matmul(&x, &y, m, k, n), matmul_tolerance(), "matmul");
}

#[test]
fn take_and_put_along_axis() {
    let a = Array::from_slice(&[10.0f32, 20.0, 30.0, 40.0, 50.0, 60.0], &[2, 3]);
    let idx = Array::from_slice(&[2i32, 0, 1, 1], &[2, 2]);
    assert_eq!(vec_f32(&take_along_axis(&a, &idx, 1).unwrap()), vec![30.0, 10.0, 50.0, 50.0]);

    let zeros = ops::zeros::<f32>(&[2, 3]).unwrap();
    let idx = Array::from_slice(&[1i32, 2], &[2, 1]);
    let vals = Array::from_slice(&[7.0f32, 9.0], &[2, 1]);
    let put = zeros.put_along_axis(&idx, &vals, 1).unwrap();
    assert_eq!(vec_f32(&put), vec![0.0, 7.0, 0.0, 0.0, 0.0, 9.0]);
}

#[test]
fn argpartition_topk_argmax() {
    let a = Array::from_slice(&[5.0f32, 1.0, 4.0, 2.0, 3.0], &[5]);
    let part = argpartition(&a, 1).unwrap();
    part.eval().unwrap();
    let mut first_two: Vec<i32> = part.as_slice::<u32>().iter().take(2).map(|&i| i as i32).collect();
    first_two.sort();
    assert_eq!(first_two, vec![1, 3], "indices of the two smallest values");

    let mut top = vec_f32(&topk(&a, 2).unwrap());
    top.sort_by(|x, y| x.partial_cmp(y).unwrap());
    assert_eq!(top, vec![4.0, 5.0]);

    let am = argmax(&a, None).unwrap();
    assert_eq!(am.item_cast::<u32>(), 0);
}

#[test]
fn cumsum_forward_reverse_exclusive() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[4]);
    assert_eq!(vec_f32(&cumsum(&a, 0, None, None).unwrap()), vec![1.0, 3.0, 6.0, 10.0]);
    assert_eq!(vec_f32(&cumsum(&a, 0, true, None).unwrap()), vec![10.0, 9.0, 7.0, 4.0]);
    assert_eq!(vec_f32(&cumsum(&a, 0, None, false).unwrap()), vec![0.0, 1.0, 3.0, 6.0]);
}

#[test]
fn softmax_matches_definition() {
    let x = [1.0f32, 2.0, 3.0, -4.0];
    let z: f32 = x.iter().map(|v| v.exp()).sum();
    let want: Vec<f32> = x.iter().map(|v| v.exp() / z).collect();
    let got = softmax_axis(Array::from_slice(&x, &[1, 4]), -1, None).unwrap();
    assert_close(&vec_f32(&got), &want, 1e-6, "softmax");
}

#[test]
fn categorical_is_deterministic_for_a_key() {
    let logits = Array::from_slice(&pseudo(4 * 50, 3), &[4, 50]);
    let draw = |seed| {
        let key = random::key(seed).unwrap();
        let s = random::categorical(&logits, -1, None, &key).unwrap();
        s.eval().unwrap();
        s.as_slice::<u32>().to_vec()
    };
    assert_eq!(draw(7), draw(7), "same key, same samples");
    let others: Vec<Vec<u32>> = (100..110).map(draw).collect();
    assert!(others.iter().any(|o| *o != draw(7)), "ten other keys never differ from key 7");

    // A single finite logit per row leaves nothing to chance.
    let mut masked = vec![f32::NEG_INFINITY; 2 * 5];
    masked[3] = 0.0;
    masked[5 + 1] = 0.0;
    let s = random::categorical(Array::from_slice(&masked, &[2, 5]), -1, None, &random::key(1).unwrap()).unwrap();
    s.eval().unwrap();
    assert_eq!(s.as_slice::<u32>(), &[3, 1]);
}

#[test]
fn compiled_closure_equals_eager() {
    let f = |x: &Array| -> Array {
        let y = ops::multiply(x, Array::from_f32(2.0)).unwrap();
        ops::add(&y, ops::exp(x).unwrap()).unwrap()
    };
    let mut compiled = compile(f, None);
    let x = Array::from_slice(&[0.0f32, 1.0, -1.0], &[3]);
    let want: Vec<f32> = [0.0f32, 1.0, -1.0].iter().map(|v| 2.0 * v + v.exp()).collect();
    for _ in 0..3 {
        assert_close(&vec_f32(&compiled(&x).unwrap()), &want, 1e-6, "compiled");
    }
    assert_close(&vec_f32(&f(&x)), &want, 1e-6, "eager");
}

#[test]
fn async_eval_on_a_dedicated_stream() {
    let stream = Stream::new();
    let (a, b) = mlx_rs::with_stream(&stream, || {
        let a = ops::arange::<_, f32>(None, 1000, None).unwrap();
        let s = ops::sum(&a, None).unwrap();
        (s, ops::multiply(&a, &a).unwrap())
    });
    async_eval([&a, &b]).unwrap();
    eval([&a, &b]).unwrap();
    assert_eq!(a.item_cast::<f32>(), 499_500.0);
    assert_eq!(b.index(999).item_cast::<f32>(), 998_001.0);
}

#[test]
fn fast_rms_norm() {
    let (rows, d) = (3, 8);
    let x = pseudo(rows * d, 4);
    let w = pseudo(d, 5);
    let eps = 1e-5f32;
    let mut want = vec![0.0; rows * d];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for i in 0..d {
            want[r * d + i] = row[i] * inv * w[i];
        }
    }
    let got = fast::rms_norm(Array::from_slice(&x, &[rows as i32, d as i32]), Some(&Array::from_slice(&w, &[d as i32])), eps).unwrap();
    assert_close(&vec_f32(&got), &want, 1e-5, "rms_norm");
}

#[test]
fn fast_rope_split_halves_with_offset() {
    // Non-traditional RoPE (Llama / Qwen layout): dimension i pairs with i + d/2.
    let (t, d, offset, base) = (3usize, 8usize, 5i32, 10_000f32);
    let x = pseudo(t * d, 6);
    let mut want = x.clone();
    let half = d / 2;
    for p in 0..t {
        let pos = (p as i32 + offset) as f32;
        for i in 0..half {
            let theta = pos * base.powf(-(2.0 * i as f32) / d as f32);
            let (a, b) = (x[p * d + i], x[p * d + i + half]);
            want[p * d + i] = a * theta.cos() - b * theta.sin();
            want[p * d + i + half] = a * theta.sin() + b * theta.cos();
        }
    }
    let arr = Array::from_slice(&x, &[1, 1, t as i32, d as i32]);
    let got = fast::rope(&arr, d as i32, false, base, 1.0, offset, None).unwrap();
    assert_close(&vec_f32(&got), &want, 1e-4, "rope");
}

#[test]
fn fast_sdpa_causal_gqa() {
    // 4 query heads share 2 KV heads; causal over 3 positions.
    let (hq, hk, t, d) = (4usize, 2usize, 3usize, 8usize);
    let (q, k, v) = (pseudo(hq * t * d, 7), pseudo(hk * t * d, 8), pseudo(hk * t * d, 9));
    let scale = 1.0 / (d as f32).sqrt();
    let mut want = vec![0.0f32; hq * t * d];
    for h in 0..hq {
        let kh = h / (hq / hk);
        for i in 0..t {
            let scores: Vec<f32> = (0..=i)
                .map(|j| (0..d).map(|c| q[(h * t + i) * d + c] * k[(kh * t + j) * d + c]).sum::<f32>() * scale)
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for c in 0..d {
                want[(h * t + i) * d + c] = (0..=i).map(|j| e[j] / z * v[(kh * t + j) * d + c]).sum();
            }
        }
    }
    let shape = |h: usize| [1, h as i32, t as i32, d as i32];
    let got = fast::scaled_dot_product_attention(
        Array::from_slice(&q, &shape(hq)),
        Array::from_slice(&k, &shape(hk)),
        Array::from_slice(&v, &shape(hk)),
        scale,
        ScaledDotProductAttentionMask::Causal,
        None,
    )
    .unwrap();
    assert_close(&vec_f32(&got), &want, 1e-5, "sdpa");
}

#[test]
fn quantize_and_quantized_matmul() {
    let (m, k, n) = (3usize, 128usize, 16usize);
    let x = pseudo(m * k, 10);
    let w = pseudo(n * k, 11); // [out, in], as checkpoints store linear weights
    let wa = Array::from_slice(&w, &[n as i32, k as i32]);
    let (wq, scales, biases) = quantize(&wa, 64, 4).unwrap();
    assert_eq!(wq.dtype(), Dtype::Uint32);
    assert_eq!(wq.shape(), &[n as i32, (k / 8) as i32], "eight 4-bit values per u32");

    let deq = dequantize(&wq, &scales, &biases, 64, 4).unwrap();
    let deq_v = vec_f32(&deq);
    // 4 bits over a group of 64: MLX snaps one edge of the range onto the grid, so the error
    // stays within one step of (max - min) / 15 of that group.
    for (g, (orig, back)) in w.chunks(64).zip(deq_v.chunks(64)).enumerate() {
        let (lo, hi) = orig.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        let step = (hi - lo) / 15.0;
        for (i, (a, b)) in orig.iter().zip(back).enumerate() {
            assert!((a - b).abs() <= step + 1e-5, "group {g} [{i}]: {a} vs {b}, step {step}");
        }
    }
    let xa = Array::from_slice(&x, &[m as i32, k as i32]);
    let got = quantized_matmul(&xa, &wq, &scales, &biases, true, 64, 4).unwrap();
    let mut deq_t = vec![0.0; k * n];
    for r in 0..n {
        for c in 0..k {
            deq_t[c * n + r] = deq_v[r * k + c];
        }
    }
    assert_close(&vec_f32(&got), &naive_matmul(&x, &deq_t, m, k, n), matmul_tolerance().max(1e-4), "quantized_matmul");
}

#[test]
fn safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let a = Array::from_slice(&pseudo(12, 12), &[3, 4]);
    let b = Array::from_slice(&[1i32, -2, 3], &[3]).as_dtype(Dtype::Bfloat16).unwrap();
    Array::save_safetensors([("a", &a), ("layers.0.b", &b)], None, &path).unwrap();
    let loaded = Array::load_safetensors(&path).unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded["a"].shape(), &[3, 4]);
    assert_eq!(vec_f32(&loaded["a"]), vec_f32(&a));
    assert_eq!(loaded["layers.0.b"].dtype(), Dtype::Bfloat16);
    let b32 = loaded["layers.0.b"].as_dtype(Dtype::Float32).unwrap();
    assert_eq!(vec_f32(&b32), vec![1.0, -2.0, 3.0]);
}

#[test]
fn mlx_errors_are_results_not_aborts() {
    let a = ops::zeros::<f32>(&[2, 3]).unwrap();
    let err = matmul(&a, &a).expect_err("[2,3] @ [2,3] must fail");
    let msg = err.to_string();
    assert!(msg.contains("matmul") || msg.contains("shape"), "message names the problem: {msg}");
    // The process and MLX stay usable after the error.
    let ok = matmul(&a, ops::zeros::<f32>(&[3, 2]).unwrap()).unwrap();
    assert_eq!(ok.shape(), &[2, 2]);
    let err = a.reshape(&[7]).expect_err("6 elements cannot become 7");
    assert!(!err.to_string().is_empty());
}
