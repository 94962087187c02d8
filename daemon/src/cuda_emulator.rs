//! Runs mlxd's CUDA kernels on the CPU, so tests compare what they compute with MLX operations
//! on machines without a GPU ([`crate::runtime::emulate_cuda_kernels`]).
//!
//! Each kernel is wrapped as MLX 0.32 wraps it (its header, `namespace mlx::core::cu`, one
//! pointer per input and output, `NAME_shape` / `NAME_strides` / `NAME_ndim` where the body
//! mentions them, the template arguments as `constexpr` values and type aliases), with
//! [`SHIM`] standing in for MLX's device headers and CUDA's built-ins, compiled by the system's
//! C++ compiler into a shared library, loaded, and launched on the calling thread: the blocks one
//! after another, a block's CUDA threads as fibers (`ucontext`) that each run until they reach a
//! barrier. So `__shared__` variables are function statics (one block at a time uses them),
//! `__syncthreads` is a barrier of the block's live threads (any call site, as the hardware's
//! barrier 0 is), warp shuffles go through a per-warp buffer and barrier, a barrier that can never
//! open aborts with the reason, atomics are C++ atomics, `bfloat16` and
//! `half` convert as the device types do, the tensor cores' `mma.sync` m16n8k16 is translated into
//! a warp-wide exchange of its fragments, laid out as the PTX ISA defines them, and `%nsmid` (the
//! fused decode block's SM count) reads as unlimited. What it cannot show: timing, and races between blocks
//! (they never run at once here, so a kernel that waits for another block to run concurrently
//! would spin forever rather than pass).
//!
//! Evaluation is eager: [`run`] evaluates its inputs and returns evaluated outputs, so kernels
//! called inside a compiled MLX function (the sampling step, unless `set_compiled(false)`)
//! cannot be emulated. Needs a C++20 compiler with `std::atomic_ref` and `_Float16`, and
//! `ucontext.h` (`$CXX`, else `c++`): GCC 12 on Linux x86_64 here; not tried with Apple clang.

use crate::ffi::{KernelSource, TemplateArg};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// MLX's device headers and CUDA's built-ins, for a C++20 host compiler.
const SHIM: &str = r#"
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
// One block runs at a time, so a function's statics are its block's shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
// Kernels that declare dynamic shared memory take a static buffer here instead.
#define MLXD_EMULATED 1

namespace cooperative_groups {}

namespace mlxd_emu {
struct Dim { unsigned int x, y, z; };

// Each CUDA thread of a block is a fiber on the launching OS thread: it runs until it reaches a
// barrier (or returns), then the next one runs; a barrier opens when every fiber that has not
// returned waits at it (the block's for __syncthreads, the warp's for shuffles).
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::Runnable;
};

constexpr size_t kStack = 256 * 1024;

struct Launch {
  Dim grid, block;
  std::function<void()> kernel;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::vector<std::array<unsigned long long, 32>> exchange;
  std::vector<std::array<std::array<unsigned int, 6>, 32>> fragments;
};

inline thread_local Launch* launch_state = nullptr;
inline thread_local Dim thread_idx, block_idx;
inline thread_local unsigned int lane = 0, warp = 0;

inline void enter(int t) {
  auto& s = *launch_state;
  s.current = t;
  const Dim b = s.block;
  thread_idx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
  lane = t % 32;
  warp = t / 32;
}

inline void fiber_main() {
  launch_state->kernel();
  launch_state->fibers[launch_state->current].state = State::Done;
}  // returns to the scheduler (uc_link)

inline void wait_at(State at) {
  auto& s = *launch_state;
  Fiber& f = s.fibers[s.current];
  f.state = at;
  swapcontext(&f.context, &s.scheduler);
}

inline void run_block(Launch& s) {
  const int threads = (int)s.fibers.size();
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.state = State::Runnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = &s.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < threads; ++t) {
      if (s.fibers[t].state != State::Runnable) continue;
      enter(t);
      swapcontext(&s.scheduler, &s.fibers[t].context);
      ran = true;
    }
    bool live = false, block_open = true, opened = false;
    for (auto& f : s.fibers) {
      if (f.state == State::Done) continue;
      live = true;
      if (f.state != State::AtBlockBarrier) block_open = false;
    }
    if (!live) return;
    if (block_open) {
      for (auto& f : s.fibers) if (f.state == State::AtBlockBarrier) f.state = State::Runnable;
      opened = true;
    }
    for (int w = 0; w * 32 < threads; ++w) {
      bool waiting = false, open = true;
      for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t) {
        const State st = s.fibers[t].state;
        if (st == State::Done) continue;
        if (st == State::AtWarpBarrier) waiting = true; else open = false;
      }
      if (waiting && open) {
        for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t)
          if (s.fibers[t].state == State::AtWarpBarrier) s.fibers[t].state = State::Runnable;
        opened = true;
      }
    }
    if (!ran && !opened) {
      // A real GPU would hang or misbehave too; here the test ends with a reason instead.
      std::fprintf(stderr, "mlxd CUDA emulation: deadlock, some live thread never reaches the barrier the "
                           "others wait at (a __syncthreads or warp shuffle in divergent code?)\n");
      std::abort();
    }
  }
}

template <class Kernel>
void launch(Dim grid, Dim block, Kernel kernel) {
  Launch s;
  s.grid = grid;
  s.block = block;
  s.kernel = kernel;
  const int threads = (int)(block.x * block.y * block.z);
  s.fibers.resize(threads);
  for (auto& f : s.fibers) f.stack.reset(new char[kStack]);
  s.exchange.resize((threads + 31) / 32);
  s.fragments.resize((threads + 31) / 32);
  Launch* outer = launch_state;
  launch_state = &s;
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) {
        block_idx = {x, y, z};
        run_block(s);
      }
  launch_state = outer;
}

inline void warp_barrier() { wait_at(State::AtWarpBarrier); }

template <class T>
T shuffle(T v, unsigned int from) {
  auto& slots = launch_state->exchange[warp];
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
  std::memcpy(&slots[lane], &v, sizeof(T));
  warp_barrier();
  T out = v;
  if (from < 32u) std::memcpy(&out, &slots[from], sizeof(T));
  warp_barrier();
  return out;
}
// The lanes of `mask` whose value equals this lane's (this lane included), as __match_any_sync.
template <class T>
unsigned int match_any(unsigned int mask, T v) {
  auto& slots = launch_state->exchange[warp];
  static_assert(sizeof(T) <= sizeof(unsigned long long), "match of a wide type");
  unsigned long long mine = 0;
  std::memcpy(&mine, &v, sizeof(T));
  slots[lane] = mine;
  warp_barrier();
  const Dim b = launch_state->block;
  const unsigned int threads = b.x * b.y * b.z;
  const unsigned int lanes = std::min(32u, threads - warp * 32u);
  unsigned int out = 0;
  for (unsigned int l = 0; l < lanes; ++l)
    if (((mask >> l) & 1u) && slots[l] == mine) out |= 1u << l;
  warp_barrier();
  return out;
}
}  // namespace mlxd_emu

#define threadIdx mlxd_emu::thread_idx
#define blockIdx mlxd_emu::block_idx
#define blockDim (mlxd_emu::launch_state->block)
#define gridDim (mlxd_emu::launch_state->grid)
#define warpSize 32

inline void __syncthreads() { mlxd_emu::wait_at(mlxd_emu::State::AtBlockBarrier); }
inline void __syncwarp(unsigned int = 0xffffffffu) { mlxd_emu::warp_barrier(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __shfl_down_sync(unsigned int, T v, int d) { return mlxd_emu::shuffle(v, mlxd_emu::lane + d); }
template <class T> inline T __shfl_up_sync(unsigned int, T v, int d) {
  return mlxd_emu::shuffle(v, mlxd_emu::lane >= (unsigned int)d ? mlxd_emu::lane - d : 32u);
}
template <class T> inline T __shfl_xor_sync(unsigned int, T v, int m) { return mlxd_emu::shuffle(v, mlxd_emu::lane ^ m); }
template <class T> inline T __shfl_sync(unsigned int, T v, int src) { return mlxd_emu::shuffle(v, (unsigned int)src & 31u); }
template <class T> inline unsigned int __match_any_sync(unsigned int mask, T v) { return mlxd_emu::match_any(mask, v); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }

template <class T, class U> inline T atomicAdd(T* p, U v) { return std::atomic_ref<T>(*p).fetch_add((T)v); }
template <class T, class U> inline T atomicSub(T* p, U v) { return std::atomic_ref<T>(*p).fetch_sub((T)v); }
template <class T, class U> inline T atomicOr(T* p, U v) { return std::atomic_ref<T>(*p).fetch_or((T)v); }
template <class T, class U> inline T atomicAnd(T* p, U v) { return std::atomic_ref<T>(*p).fetch_and((T)v); }
template <class T, class U> inline T atomicExch(T* p, U v) { return std::atomic_ref<T>(*p).exchange((T)v); }
template <class T, class U> inline T atomicMax(T* p, U v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < (T)v && !a.compare_exchange_weak(old, (T)v)) {}
  return old;
}
template <class T, class U> inline T atomicMin(T* p, U v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while ((T)v < old && !a.compare_exchange_weak(old, (T)v)) {}
  return old;
}
template <class T, class U> inline T atomicCAS(T* p, U expected, U desired) {
  T e = (T)expected;
  std::atomic_ref<T>(*p).compare_exchange_strong(e, (T)desired);
  return e;
}

template <class A, class B> inline auto min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline auto max(A a, B b) { return a < b ? b : a; }

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) bits = 0x7fc0;
    else bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return __uint_as_float((uint32_t)bits << 16); }
};
struct __half {
  _Float16 value;
  __half() = default;
  __half(float f) : value((_Float16)f) {}
  operator float() const { return (float)value; }
};

struct uint4 { unsigned int x, y, z, w; };
// Not 16-byte aligned here: MLX's CPU arrays start 8 bytes into their allocation, where
// cudaMalloc's are 256-byte aligned; the kernels' 16-byte loads keep offsets in multiples of 16.
struct float4 { float x, y, z, w; };
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline void __trap() { std::abort(); }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace mlxd_emu {
inline float half_of(unsigned int reg, int high, bool bf16) {
  const uint16_t bits = (uint16_t)(high ? reg >> 16 : reg & 0xffffu);
  if (bf16) return __uint_as_float((uint32_t)bits << 16);
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return (float)h;
}

// PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`: the warp's fragments, laid out as
// the PTX ISA defines them (lane = 4 * group + t; A's registers hold rows group / group + 8 at
// columns 2t, 2t + 1 and 2t + 8, 2t + 9; B's hold rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column
// group; D's rows group / group + 8 at columns 2t, 2t + 1), gathered through the warp's buffer.
inline void mma_m16n8k16(bool bf16, float& d0, float& d1, float& d2, float& d3, unsigned int a0, unsigned int a1,
                         unsigned int a2, unsigned int a3, unsigned int b0, unsigned int b1) {
  auto& f = launch_state->fragments[warp];
  const unsigned int mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(f[lane].data(), mine, sizeof(mine));
  warp_barrier();
  auto a = [&](int r, int c) {
    const int reg = (r >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0);
    return half_of(f[4 * (r % 8) + (c % 8) / 2][reg], c % 2, bf16);
  };
  auto b = [&](int r, int c) { return half_of(f[4 * c + (r % 8) / 2][4 + (r >= 8 ? 1 : 0)], r % 2, bf16); };
  const int g = (int)lane / 4, t = (int)lane % 4;
  float* out[4] = {&d0, &d1, &d2, &d3};
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), c = 2 * t + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += a(r, k) * b(k, c);
    *out[i] += sum;
  }
  warp_barrier();
}
}  // namespace mlxd_emu

namespace mlx::core::cu {
struct Shape { int32_t v[10]; int32_t operator[](int i) const { return v[i]; } };
struct Strides { int64_t v[10]; int64_t operator[](int i) const { return v[i]; } };
}  // namespace mlx::core::cu
"#;

/// The C++ type MLX writes for `d` (its `dtype_to_cuda_type`).
fn cuda_type(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "bool",
        Dtype::Uint8 => "uint8_t",
        Dtype::Uint16 => "uint16_t",
        Dtype::Uint32 => "uint32_t",
        Dtype::Uint64 => "uint64_t",
        Dtype::Int8 => "int8_t",
        Dtype::Int16 => "int16_t",
        Dtype::Int32 => "int32_t",
        Dtype::Int64 => "int64_t",
        Dtype::Float16 => "__half",
        Dtype::Bfloat16 => "__nv_bfloat16",
        Dtype::Float32 => "float",
        Dtype::Float64 => "double",
        Dtype::Complex64 => "unsupported_complex64",
    }
}

/// Replaces each inline PTX statement (`asm volatile("..." : outputs : inputs);`) of `src` with
/// the emulator's version of that instruction. Only `mma.sync.aligned.m16n8k16.row.col.f32`
/// with bfloat16 or float16 inputs, operands in the order D, A, B, C = D, is known; anything else
/// is an error naming it.
fn translate_ptx(src: &str) -> Result<String, String> {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("asm") {
        let after = &rest[at + 3..];
        let is_statement = !rest[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            && after.trim_start().starts_with(['(', 'v']);
        if !is_statement {
            out.push_str(&rest[..at + 3]);
            rest = after;
            continue;
        }
        out.push_str(&rest[..at]);
        let open = at + 3 + after.find('(').ok_or("inline PTX without `(`")?;
        // The statement's parenthesized part, string literals skipped.
        let (mut depth, mut in_string, mut close) = (0, false, None);
        for (i, c) in rest[open..].char_indices() {
            match c {
                '"' => in_string = !in_string,
                '(' if !in_string => depth += 1,
                ')' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or("unbalanced inline PTX")?;
        let inner = &rest[open + 1..close];
        let mut sections = inner.splitn(3, ':');
        let template: String = sections
            .next()
            .unwrap_or_default()
            .split('"')
            .skip(1)
            .step_by(2)
            .collect::<Vec<_>>()
            .concat()
            .replace("\\n", "");
        let operands = |section: Option<&str>| -> Vec<String> {
            let Some(section) = section else { return Vec::new() };
            let mut list = Vec::new();
            let (mut depth, mut current) = (0, String::new());
            for c in section.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        list.push(std::mem::take(&mut current));
                        continue;
                    }
                    _ => {}
                }
                current.push(c);
            }
            list.push(current);
            // `"constraint"(expression)` -> `expression`
            list.iter()
                .filter_map(|o| o.find('(').map(|i| o[i + 1..o.rfind(')').unwrap_or(o.len())].trim().to_string()))
                .collect()
        };
        let (outputs, inputs) = (operands(sections.next()), operands(sections.next()));
        let instruction = template.split_whitespace().next().unwrap_or_default();
        let order = template.split_whitespace().skip(1).collect::<String>();
        // The SM count (the fused decode kernel's barrier reads it): no limit here, where blocks
        // run one after another.
        if instruction == "mov.u32" && order.trim_end_matches(';') == "%0,%%nsmid" && outputs.len() == 1 {
            out.push_str(&format!("({} = 1u << 30)", outputs[0]));
            rest = &rest[close + 1..];
            continue;
        }
        // The global nanosecond clock (the fused decode kernel's optional timing).
        if instruction == "mov.u64" && order.trim_end_matches(';') == "%0,%%globaltimer" && outputs.len() == 1 {
            out.push_str(&format!(
                "({} = (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(\
                 std::chrono::steady_clock::now().time_since_epoch()).count())",
                outputs[0]
            ));
            rest = &rest[close + 1..];
            continue;
        }
        let bf16 = match instruction {
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" => true,
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" => false,
            other => return Err(format!("inline PTX `{other}` is not emulated")),
        };
        if order.trim_end_matches(';') != "{%0,%1,%2,%3},{%4,%5,%6,%7},{%8,%9},{%0,%1,%2,%3}"
            || outputs.len() != 4
            || inputs.len() != 6
        {
            return Err(format!("`{instruction}` with operands `{order}` is not emulated"));
        }
        out.push_str(&format!("mlxd_emu::mma_m16n8k16({bf16}, {}, {})", outputs.join(", "), inputs.join(", ")));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Bytes per element of `d`.
fn item_size(d: Dtype) -> usize {
    match d {
        Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => 1,
        Dtype::Uint16 | Dtype::Int16 | Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
        Dtype::Uint64 | Dtype::Int64 | Dtype::Float64 | Dtype::Complex64 => 8,
    }
}

/// The source of one kernel call: MLX's wrapper around the body, and a C entry point that
/// launches it. Arrays are passed as raw pointers; shapes and strides as 10 values per input.
fn source(
    spec: &KernelSource,
    inputs: &[&Array],
    outputs: &[(&[i32], Dtype)],
    template: &[(&str, TemplateArg)],
) -> String {
    let mut params = Vec::new();
    let mut args = Vec::new();
    for (i, (name, a)) in spec.inputs.iter().zip(inputs).enumerate() {
        params.push(format!("    const {}* {name}", cuda_type(a.dtype())));
        args.push(format!("(const {}*)in[{i}]", cuda_type(a.dtype())));
        if a.ndim() > 0 {
            if spec.source.contains(&format!("{name}_shape")) {
                params.push(format!("    const __grid_constant__ Shape {name}_shape"));
                args.push(format!("*(const mlx::core::cu::Shape*)(shapes + 10 * {i})"));
            }
            if spec.source.contains(&format!("{name}_strides")) {
                params.push(format!("    const __grid_constant__ Strides {name}_strides"));
                args.push(format!("*(const mlx::core::cu::Strides*)(strides + 10 * {i})"));
            }
            if spec.source.contains(&format!("{name}_ndim")) {
                params.push(format!("    const __grid_constant__ int {name}_ndim"));
                args.push(format!("ndims[{i}]"));
            }
        }
    }
    for (i, (name, (_, d))) in spec.outputs.iter().zip(outputs).enumerate() {
        params.push(format!("    {}* {name}", cuda_type(*d)));
        args.push(format!("({}*)out[{i}]", cuda_type(*d)));
    }
    let mut constants = String::new();
    for (name, arg) in template {
        constants += &match arg {
            TemplateArg::Int(v) => format!("  constexpr int {name} = {v};\n"),
            TemplateArg::Bool(v) => format!("  constexpr bool {name} = {v};\n"),
            TemplateArg::Dtype(d) => format!("  using {name} = {};\n", cuda_type(*d)),
        };
    }
    format!(
        "{SHIM}\n{header}\nnamespace mlx::core::cu {{\n\nnamespace cg = cooperative_groups;\n\n\
         __global__ void kernel(\n{params}) {{\n{constants}\n{body}\n}}\n\n}} // namespace mlx::core::cu\n\n\
         extern \"C\" void mlxd_launch(const void* const* in, const int32_t* shapes, const int64_t* strides,\n\
             const int32_t* ndims, void* const* out, const unsigned int* dims) {{\n\
           (void)shapes; (void)strides; (void)ndims;\n\
           mlxd_emu::launch({{dims[0], dims[1], dims[2]}}, {{dims[3], dims[4], dims[5]}}, [&] {{\n\
             mlx::core::cu::kernel({args});\n\
           }});\n\
         }}\n",
        header = spec.header,
        params = params.join(",\n"),
        body = spec.source,
        args = args.join(", "),
    )
}

type Launch = unsafe extern "C" fn(
    *const *const std::ffi::c_void,
    *const i32,
    *const i64,
    *const i32,
    *const *mut std::ffi::c_void,
    *const u32,
);

/// The compiled kernels of this process, by source.
fn libraries() -> &'static Mutex<HashMap<u64, (libloading::Library, Launch)>> {
    static LIBS: OnceLock<Mutex<HashMap<u64, (libloading::Library, Launch)>>> = OnceLock::new();
    LIBS.get_or_init(Default::default)
}

/// Compiles `src` (once per source; the libraries are kept in a folder of the user's under the
/// temporary directory) and returns its entry point.
fn compiled(name: &str, src: &str) -> Result<Launch, Exception> {
    use std::hash::{Hash, Hasher};
    const FLAGS: [&str; 6] = ["-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-w"];
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (src, &compiler, FLAGS).hash(&mut h);
    let key = h.finish();
    let mut libs = libraries().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, launch)) = libs.get(&key) {
        return Ok(*launch);
    }
    let fail = |m: String| Exception::custom(format!("emulating CUDA kernel `{name}`: {m}"));
    // One folder per user, kept between runs: a library is named by the hash of its source (the
    // shim included), compiler and flags, so a later run loads it instead of compiling again.
    // SAFETY: getuid has no preconditions.
    let dir: PathBuf = std::env::temp_dir().join(format!("mlxd-cuda-emulation-{}", unsafe { libc::getuid() }));
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let lib = dir.join(format!("{name}-{key:016x}.so"));
    if !lib.is_file() {
        // Written under names of this process's own, then renamed: concurrent runs never load a
        // half-written library.
        let pid = std::process::id();
        let (cpp, built) =
            (dir.join(format!("{name}-{key:016x}.{pid}.cpp")), dir.join(format!("{name}-{key:016x}.{pid}.so")));
        std::fs::write(&cpp, src).map_err(|e| fail(e.to_string()))?;
        let out = std::process::Command::new(&compiler)
            .args(FLAGS)
            .arg(&cpp)
            .arg("-o")
            .arg(&built)
            .output()
            .map_err(|e| fail(format!("running {compiler}: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{compiler} failed on {}:\n{}",
                cpp.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let _ = std::fs::remove_file(&cpp);
        std::fs::rename(&built, &lib).map_err(|e| fail(e.to_string()))?;
    }
    // SAFETY: a library this function just compiled from the source above; its entry point has
    // the signature `Launch` declares.
    let (library, launch) = unsafe {
        let library = libloading::Library::new(&lib).map_err(|e| fail(e.to_string()))?;
        let launch: Launch = *library.get::<Launch>(b"mlxd_launch\0").map_err(|e| fail(e.to_string()))?;
        (library, launch)
    };
    libs.insert(key, (library, launch));
    Ok(launch)
}

/// Emulated launches so far in this process, by kernel name.
fn launch_counts() -> &'static Mutex<std::collections::BTreeMap<String, usize>> {
    static COUNTS: OnceLock<Mutex<std::collections::BTreeMap<String, usize>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

/// How many times each kernel has been emulated in this process, by name: so a test can tell
/// that the path it compares really went through the kernels.
pub fn launches() -> std::collections::BTreeMap<String, usize> {
    launch_counts().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs one kernel call on the CPU: see the module header. `grid` counts threads per axis and
/// `block` threads per block, as [`crate::ffi::CudaKernel::apply`] takes them (blocks are
/// clipped to the grid, as MLX does).
pub(crate) fn run(
    spec: &KernelSource,
    inputs: &[&Array],
    outputs: &[(&[i32], Dtype)],
    template: &[(&str, TemplateArg)],
    grid: (i32, i32, i32),
    block: (i32, i32, i32),
) -> Result<Vec<Array>, Exception> {
    let src = translate_ptx(&source(spec, inputs, outputs, template))
        .map_err(|e| Exception::custom(format!("emulating CUDA kernel `{}`: {e}", spec.name)))?;
    let launch = compiled(&spec.name, &src)?;
    // MLX hands a kernel row-contiguous inputs (copying where needed).
    let held: Vec<Array> = inputs.iter().map(|a| a.contiguous()).collect::<Result<_, _>>()?;
    mlx_rs::transforms::eval(held.iter())?;
    let mut shapes = vec![0i32; 10 * held.len()];
    let mut strides = vec![0i64; 10 * held.len()];
    let mut ndims = Vec::with_capacity(held.len());
    let mut pointers = Vec::with_capacity(held.len());
    for (i, a) in held.iter().enumerate() {
        if a.ndim() > 10 {
            return Err(Exception::custom(format!("input {i} of `{}` has {} dimensions", spec.name, a.ndim())));
        }
        for (j, (&s, &st)) in a.shape().iter().zip(a.strides()).enumerate() {
            shapes[10 * i + j] = s;
            strides[10 * i + j] = st as i64;
        }
        ndims.push(a.ndim() as i32);
        // SAFETY: an evaluated array; the pointer is its data, offset included.
        pointers.push(unsafe { mlx_sys::mlx_array_data_uint8(a.as_ptr()) } as *const std::ffi::c_void);
    }
    // Outputs start as a pattern, not zeros: a kernel that leaves an element unwritten shows.
    let mut buffers: Vec<Vec<u8>> = outputs
        .iter()
        .map(|(shape, d)| vec![0xA5u8; shape.iter().map(|&s| s as usize).product::<usize>() * item_size(*d)])
        .collect();
    let out_pointers: Vec<*mut std::ffi::c_void> = buffers.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
    let clip = |g: i32, b: i32| (b.min(g).max(1) as u32, ((g + b.min(g).max(1) - 1) / b.min(g).max(1)) as u32);
    let ((bx, gx), (by, gy), (bz, gz)) = (clip(grid.0, block.0), clip(grid.1, block.1), clip(grid.2, block.2));
    let dims = [gx, gy, gz, bx, by, bz];
    // One launch at a time in the process: a kernel's shared memory is its library's statics.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    *launch_counts().lock().unwrap_or_else(|e| e.into_inner()).entry(spec.name.clone()).or_default() += 1;
    // SAFETY: the pointers and shapes describe live buffers of the dtypes the source was
    // generated for; the kernel's own indexing is what is under test.
    unsafe {
        launch(
            pointers.as_ptr(),
            shapes.as_ptr(),
            strides.as_ptr(),
            ndims.as_ptr(),
            out_pointers.as_ptr(),
            dims.as_ptr(),
        )
    };
    outputs
        .iter()
        .zip(&buffers)
        .map(|((shape, d), b)| {
            // SAFETY: `b` holds exactly the elements of `shape` in dtype `d`; MLX copies them.
            let a = unsafe { Array::from_raw_data(b.as_ptr().cast(), shape, *d) };
            Ok(a)
        })
        .collect()
}
