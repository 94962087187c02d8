//! Unit tests of `gguf.rs`.
use super::*;

/// Builds GGUF bytes; values are written exactly as the format lays them out.
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    fn raw_kv(&mut self, key: &str, value_type: u32, value: &[u8]) -> &mut Self {
        string(&mut self.kv, key);
        self.kv.extend(value_type.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn str_kv(&mut self, key: &str, value: &str) -> &mut Self {
        let mut v = Vec::new();
        string(&mut v, value);
        self.raw_kv(key, 8, &v)
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType) -> &mut Self {
        let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(0);
        let offset = self.data.len().div_ceil(32) * 32;
        self.data.resize(offset + (n / ggml_type.block_size() * ggml_type.type_size()) as usize, 0x11);
        string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ggml_type.id().to_le_bytes());
        self.infos.extend((offset as u64).to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn bytes(&self, version: u32) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        if self.n_tensors > 0 {
            out.resize(out.len().div_ceil(32) * 32, 0);
            out.extend(&self.data);
        }
        out
    }
}

fn array(element_type: u32, n: u64, elements: &[u8]) -> Vec<u8> {
    let mut v = element_type.to_le_bytes().to_vec();
    v.extend(n.to_le_bytes());
    v.extend(elements);
    v
}

/// One key of every value type, nested arrays included, and two tensors.
fn sample() -> Writer {
    let mut w = Writer::default();
    let mut strings = Vec::new();
    for s in ["a", "héllo", ""] {
        string(&mut strings, s);
    }
    let inner1 = array(4, 2, &[1, 0, 0, 0, 2, 0, 0, 0]);
    let inner2 = array(8, 1, &{
        let mut s = Vec::new();
        string(&mut s, "x");
        s
    });
    w.raw_kv("u8", 0, &[200])
        .raw_kv("i8", 1, &[0xfe])
        .raw_kv("u16", 2, &60000u16.to_le_bytes())
        .raw_kv("i16", 3, &(-300i16).to_le_bytes())
        .raw_kv("u32", 4, &4_000_000_000u32.to_le_bytes())
        .raw_kv("i32", 5, &(-5i32).to_le_bytes())
        .raw_kv("f32", 6, &1.5f32.to_le_bytes())
        .raw_kv("bool", 7, &[1])
        .str_kv("general.architecture", "llama")
        .raw_kv("u64", 10, &(1u64 << 40).to_le_bytes())
        .raw_kv("i64", 11, &(-7i64).to_le_bytes())
        .raw_kv("f64", 12, &0.25f64.to_le_bytes())
        .raw_kv("strs", 9, &array(8, 3, &strings))
        .raw_kv("i32s", 9, &array(5, 2, &[0xff, 0xff, 0xff, 0xff, 3, 0, 0, 0]))
        .raw_kv("u8s", 9, &array(0, 3, &[1, 2, 3]))
        .raw_kv("nested", 9, &array(9, 2, &[inner1, inner2].concat()))
        .tensor("blk.0.attn_q.weight", &[64, 2], GgmlType::Q4_1)
        .tensor("output_norm.weight", &[64], GgmlType::F32);
    w
}

#[test]
fn parses_every_value_type() {
    for version in [2, 3] {
        let f = parse(&sample().bytes(version)).unwrap();
        assert_eq!(f.version, version);
        assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-2)));
        assert_eq!(f.get("u16"), Some(&GgufValue::U16(60000)));
        assert_eq!(f.get("i16"), Some(&GgufValue::I16(-300)));
        assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_i32("i32").unwrap(), -5);
        assert_eq!(f.get_f32("f32").unwrap(), 1.5);
        assert!(f.get_bool("bool").unwrap());
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(f.get_i64("i64").unwrap(), -7);
        assert_eq!(f.get_f32("f64").unwrap(), 0.25);
        assert_eq!(f.get_str_array("strs").unwrap(), ["a", "héllo", ""]);
        assert_eq!(f.get_i32_array("i32s").unwrap(), [-1, 3]);
        assert_eq!(f.get_u32_array("u8s").unwrap(), [1, 2, 3]);
        assert_eq!(f.get_f32_array("u8s").unwrap(), [1.0, 2.0, 3.0]);
        let nested = GgufArray::Array(vec![GgufArray::U32(vec![1, 2]), GgufArray::String(vec!["x".into()])]);
        assert_eq!(f.get("nested"), Some(&GgufValue::Array(nested)));
        assert_eq!(f.metadata().len(), 16);
        assert_eq!(f.metadata()[0].0, "u8");

        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            (q.dims.as_slice(), q.shape(), q.ggml_type, q.offset),
            (&[64, 2][..], vec![2, 64], GgmlType::Q4_1, 0)
        );
        assert_eq!(q.n_bytes(), 4 * 20);
        let norm = &f.tensors[1];
        assert_eq!((norm.offset, norm.n_bytes()), (96, 256));
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.data_offset + 96 + 256, f.file_len);
        f.check_loadable().unwrap();
    }
}

#[test]
fn numbers_convert_across_widths_and_report_types() {
    let f = parse(&sample().bytes(3)).unwrap();
    assert_eq!(f.get_u64("u8").unwrap(), 200);
    assert_eq!(f.get_i64("u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_f32("i16").unwrap(), -300.0);
    assert_eq!(f.opt_u32("absent").unwrap(), None);
    let msg = |e: GgufError| e.to_string();
    assert_eq!(
        msg(f.get_u32("i32").unwrap_err()),
        "<memory>: metadata key `i32` holds -5, which does not fit in u32"
    );
    assert_eq!(
        msg(f.get_u8("u16").unwrap_err()),
        "<memory>: metadata key `u16` holds 60000, which does not fit in u8"
    );
    assert_eq!(
        msg(f.get_u32("strs").unwrap_err()),
        "<memory>: metadata key `strs` has type array of string, expected u32"
    );
    assert_eq!(msg(f.get_str("bool").unwrap_err()), "<memory>: metadata key `bool` has type bool, expected string");
    assert_eq!(
        msg(f.get_str_array("i32s").unwrap_err()),
        "<memory>: metadata key `i32s` has type array of i32, expected an array of string"
    );
    assert_eq!(
        msg(f.get_u32_array("i32s").unwrap_err()),
        "<memory>: metadata key `i32s` holds an element -1, which does not fit in u32"
    );
    assert_eq!(msg(f.get_bool("nope").unwrap_err()), "<memory>: metadata key `nope` is missing");
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().bytes(3);
    for n in 0..bytes.len() {
        let e = parse(&bytes[..n]).expect_err("a truncated file parsed");
        assert!(
            matches!(e, GgufError::Truncated { .. } | GgufError::Malformed { .. } | GgufError::BadTensor { .. }),
            "{n}: {e}"
        );
    }
}

#[test]
fn truncation_message_names_the_key() {
    let mut w = Writer::default();
    w.raw_kv("bool", 7, &[1]);
    let bytes = w.bytes(3);
    let type_at = bytes.windows(4).position(|w| w == b"bool").unwrap() + 4;
    let e = parse(&bytes[..type_at + 2]).unwrap_err().to_string();
    assert_eq!(e, format!("<memory>: truncated at byte {type_at} while reading metadata key `bool`"));
}

#[test]
fn corrupt_bytes_never_panic() {
    let bytes = sample().bytes(3);
    // Every byte of the header set to a few hostile values: each parse must return.
    let header_len = parse(&bytes).unwrap().data_offset as usize;
    for i in 4..header_len {
        for v in [0x00, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] = v;
            let _ = parse(&b);
        }
    }
    // And a few thousand random multi-byte corruptions (xorshift, so no RNG crate).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..4000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = 4 + (next() as usize) % (header_len - 4);
            b[i] = next() as u8;
        }
        let _ = parse(&b);
    }
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

#[test]
fn huge_declared_lengths_are_refused_before_allocating() {
    let problem = |b: &[u8]| match parse(b).unwrap_err() {
        GgufError::Malformed { problem, .. } => problem,
        e => panic!("unexpected {e}"),
    };
    assert!(problem(&header(u64::MAX, 0)).starts_with("tensor count 18446744073709551615 needs"));
    assert!(problem(&header(0, 1 << 40)).starts_with("metadata count 1099511627776 needs"));

    let mut b = header(0, 1);
    b.extend(u64::MAX.to_le_bytes());
    b.extend([0; 16]);
    assert!(problem(&b).starts_with("key length 18446744073709551615 exceeds the limit"));

    let mut b = header(0, 1);
    string(&mut b, "k");
    b.extend(8u32.to_le_bytes());
    b.extend(1000u64.to_le_bytes());
    b.extend([0; 16]);
    assert_eq!(problem(&b), "string length 1000 needs 1000 bytes but only 16 are left");

    for (element_type, n) in [(8u32, 1u64 << 20), (0, 1 << 30), (9, 3)] {
        let mut b = header(0, 1);
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(array(element_type, n, &[0; 24]));
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("metadata key `tokenizer.ggml.tokens`"), "{e}");
    }

    // Arrays nested past the limit.
    let mut nested = array(0, 0, &[]);
    for _ in 0..MAX_ARRAY_DEPTH {
        nested = array(9, 1, &nested);
    }
    let mut b = header(0, 1);
    string(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    b.extend(nested);
    assert!(problem(&b).contains("nested deeper"));
}

#[test]
fn bad_tensor_infos_are_refused() {
    let mut w = Writer::default();
    w.tensor("t", &[1, 1, 1, 1, 1], GgmlType::F32);
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("tensor `t`: 5 dimensions, more than ggml's 4"));

    let mut w = Writer::default();
    w.tensor("t", &[33], GgmlType::F32);
    let mut b = w.bytes(3);
    let type_at = 24 + 8 + 1 + 4 + 8;
    b[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(parse(&b).unwrap_err().to_string().contains("tensor `t`: unknown ggml type id 99"));
    b[type_at..type_at + 4].copy_from_slice(&GgmlType::Q8_0.id().to_le_bytes());
    assert!(parse(&b).unwrap_err().to_string().contains("a multiple of 32, but a row has 33"));

    let mut w = Writer::default();
    w.tensor("t", &[u64::MAX, 2], GgmlType::F32);
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("overflow the element count"));

    let mut w = Writer::default();
    w.tensor("a", &[8], GgmlType::F32).tensor("a", &[8], GgmlType::F32);
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("appears twice"));

    let mut w = Writer::default();
    w.tensor("big", &[1024], GgmlType::F32);
    let b = w.bytes(3);
    let e = parse(&b[..b.len() - 1]).unwrap_err().to_string();
    assert!(e.contains("tensor `big` needs bytes") && e.contains("truncated download"), "{e}");
}

#[test]
fn header_errors_are_specific() {
    assert_eq!(
        parse(b"GGML\x03\0\0\0").unwrap_err().to_string(),
        "<memory>: not a GGUF file (starts with [71, 71, 77, 76], expected \"GGUF\")"
    );
    let mut v1 = header(0, 0);
    v1[4] = 1;
    assert_eq!(parse(&v1).unwrap_err().to_string(), "<memory>: GGUF version 1 is not supported (only 2 and 3)");
    let mut be = header(0, 0);
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(parse(&be).unwrap_err().to_string().contains("big-endian"));

    let mut w = Writer::default();
    w.raw_kv("general.alignment", 4, &48u32.to_le_bytes());
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("power of two"));
    let mut w = Writer::default();
    w.raw_kv("b", 7, &[2]);
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("bool has value 2"));
    let mut w = Writer::default();
    w.raw_kv("k", 13, &[]);
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("unknown value type 13"));
    let mut w = Writer::default();
    w.str_kv("k", "1").str_kv("k", "2");
    assert!(parse(&w.bytes(3)).unwrap_err().to_string().contains("metadata key `k`: the key appears twice"));
}

#[test]
fn custom_alignment_moves_the_data_section() {
    let mut w = Writer::default();
    w.raw_kv("general.alignment", 4, &64u32.to_le_bytes());
    let mut b = w.bytes(3);
    b.extend([0; 64]);
    let f = parse(&b).unwrap();
    assert_eq!(f.alignment, 64);
}

#[test]
fn unsupported_tensor_type_is_named() {
    let mut w = sample();
    w.tensor("blk.0.ffn_down.weight", &[256, 2], GgmlType::Q6_K);
    let e = parse(&w.bytes(3)).unwrap().check_loadable().unwrap_err();
    assert_eq!(
        e.to_string(),
        "<memory>: tensor `blk.0.ffn_down.weight` has type Q6_K, which MLX cannot load \
         (supported: F32, F16, BF16, Q4_0, Q4_1, Q4_K, Q8_0)"
    );
}

#[test]
fn type_table_is_consistent() {
    for id in 0..64 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.id(), id);
            assert!(t.block_size() >= 1 && t.type_size() >= 1, "{t}");
        }
    }
    assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
    assert_eq!(GgmlType::BF16.to_string(), "BF16");
}
