//! The GGUF reader and the tokenizer on the real default model (SmolLM2-135M-Instruct Q4_1,
//! fetched once by `mlxd::default_model::ensure`), checked against an independent reference:
//! token ids that Hugging Face transformers' GGUF conversion produced from the same file
//! (tests/reference/make_tokenizer_ids.py wrote tests/reference/smollm2_tokenizer_ids.json).
//! Also: what MLX's own GGUF loader makes of each tensor type that `check_loadable` accepts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mlxd::gguf::{self, GgmlType, GgufError, MLX_LOADABLE};
use mlxd::tokenizer::{StreamDecoder, Tokenizer};
use sha2::Digest;

/// The default model's GGUF, fetched at most once per test binary (tests run in parallel).
fn model() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| mlxd::default_model::ensure().expect("fetching the default model"))
}

#[test]
fn real_header_parses() {
    let path = model();
    let meta = gguf::read_header(path).unwrap();
    assert_eq!(meta.version, 3);
    assert_eq!(meta.architecture().unwrap(), "llama");
    assert_eq!(meta.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(meta.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(meta.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(meta.get_u32("llama.vocab_size").unwrap(), 49_152);
    assert_eq!(meta.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49_152);
    assert_eq!(meta.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), 49_152);
    assert_eq!(meta.tensors.len(), 272);

    let count = |t: GgmlType| meta.tensors.iter().filter(|i| i.ggml_type == t).count();
    assert_eq!((count(GgmlType::Q4_1), count(GgmlType::Q8_0), count(GgmlType::F32)), (210, 1, 61));
    meta.check_loadable().unwrap();

    let embed = meta.tensor("token_embd.weight").unwrap();
    assert_eq!((embed.shape(), embed.ggml_type), (vec![49_152, 576], GgmlType::Q8_0));
    // The tensors tile the data section: the last one ends where the file does.
    let end = meta.tensors.iter().map(|t| meta.data_offset + t.offset + t.n_bytes()).max().unwrap();
    assert_eq!(end, meta.file_len);
}

#[test]
fn truncated_real_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(model()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = gguf::read_header(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.gguf: tensor `") && e.contains("truncated download"), "{e}");
}

#[derive(serde::Deserialize)]
struct Reference {
    gguf_sha256: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/smollm2_tokenizer_ids.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn token_ids_match_the_transformers_reference() {
    let path = model();
    let reference = reference();
    let digest: String =
        sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, reference.gguf_sha256, "the reference ids were made from another file");

    let tok = Tokenizer::from_gguf(&gguf::read_header(path).unwrap()).unwrap();
    assert!(reference.cases.len() >= 15);
    for case in &reference.cases {
        let ids = tok.encode(&case.text, true).unwrap();
        assert_eq!(ids, case.ids, "encoding {:?}", case.text);
        assert_eq!(tok.decode(&ids, false).unwrap(), case.text, "decoding {:?}", case.text);

        let mut stream = StreamDecoder::with_special(&tok, false);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{:?}: a piece split a character: {piece:?}", case.text);
            streamed += &piece;
        }
        streamed += &stream.finish().unwrap();
        assert_eq!(streamed, case.text, "streaming {:?}", case.text);
    }
}

#[test]
fn real_tokenizer_special_tokens() {
    let tok = Tokenizer::from_gguf(&gguf::read_header(model()).unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!((tok.bos_id(), tok.eos_ids(), tok.pad_id(), tok.add_bos()), (Some(1), &[2][..], Some(2), false));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    // Control tokens are dropped when special tokens are skipped, and only then.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

/// A GGUF with one tensor named `name` and no metadata; the data bytes are arbitrary.
fn gguf_with_tensor(name: &str, dims: &[u64], ggml_type: GgmlType) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((name.len() as u64).to_le_bytes());
    out.extend(name.as_bytes());
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(ggml_type.id().to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.resize(out.len().div_ceil(32) * 32, 0);
    let n: u64 = dims.iter().product();
    out.extend((0..n / ggml_type.block_size() * ggml_type.type_size()).map(|i| (i % 61) as u8));
    out
}

#[test]
fn unsupported_tensor_type_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q6k.gguf");
    std::fs::write(&path, gguf_with_tensor("blk.0.ffn_down.weight", &[256, 4], GgmlType::Q6_K)).unwrap();
    let meta = gguf::read_header(&path).unwrap();
    let e = meta.check_loadable().unwrap_err();
    assert!(matches!(e, GgufError::Unloadable { ggml_type: GgmlType::Q6_K, .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `blk.0.ffn_down.weight` has type Q6_K, which MLX cannot load \
             (supported: F32, F16, BF16, Q4_0, Q4_1, Q4_K, Q8_0)",
            path.display()
        )
    );
    assert!(meta.tensors[0].check_loadable().unwrap_err().to_string().starts_with("tensor `blk.0.ffn_down.weight`"));
}

/// What `mlx_load_gguf` returns for one tensor `t.weight` of each type: `name:dtype[shape]`.
fn mlx_loads(dir: &Path, ggml_type: GgmlType) -> Vec<String> {
    let path = dir.join(format!("{ggml_type}.gguf"));
    std::fs::write(&path, gguf_with_tensor("t.weight", &[256, 2], ggml_type)).unwrap();
    let file = mlx_rs::io::GgufFile::load(&path).unwrap_or_else(|e| panic!("MLX refused {ggml_type}: {e}"));
    let mut arrays: Vec<String> =
        file.arrays().unwrap().iter().map(|(k, a)| format!("{k}:{:?}{:?}", a.dtype(), a.shape())).collect();
    arrays.sort();
    arrays
}

/// Pins down what the MLX we link does with each type `check_loadable` lets through, so a
/// change in MLX shows up here rather than as a wrong model.
#[test]
fn mlx_loads_every_type_check_loadable_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let dense = |dtype: &str| vec![format!("t.weight:{dtype}[2, 256]")];
    let quantized = |packed: i32| {
        vec![
            "t.biases:Float16[2, 8]".to_string(),
            "t.scales:Float16[2, 8]".into(),
            format!("t.weight:Uint32[2, {packed}]"),
        ]
    };
    for t in MLX_LOADABLE {
        let want = match t {
            GgmlType::F32 => dense("Float32"),
            // MLX has no bfloat16 path for GGUF: BF16 arrives as float16 (range above 65504 lost).
            GgmlType::F16 | GgmlType::BF16 => dense("Float16"),
            // Kept 4-bit: 8 weights per u32, one scale and bias per 32 weights.
            GgmlType::Q4_0 | GgmlType::Q4_1 => quantized(32),
            GgmlType::Q8_0 => quantized(64),
            // Not kept quantized: dequantized to dense float16 (4x the memory of the file).
            GgmlType::Q4_K => dense("Float16"),
            other => panic!("no expectation for {other}"),
        };
        assert_eq!(mlx_loads(dir.path(), t), want, "{t}");
    }
    // MLX would dequantize these to float16 as it does Q4_K; `check_loadable` refuses them.
    for t in [GgmlType::Q2_K, GgmlType::Q6_K] {
        assert!(!t.is_mlx_loadable());
        assert_eq!(mlx_loads(dir.path(), t), dense("Float16"), "{t}");
    }
    // Types newer than MLX's GGUF library vanish without an error: the reason to check first.
    for t in [GgmlType::TQ2_0, GgmlType::MXFP4] {
        assert!(mlx_loads(dir.path(), t).is_empty(), "{t}");
    }
}
