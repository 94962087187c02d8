/*
 * mlxd_sampler.h — the sampler plugin ABI of mlxd, version 1.1.
 *
 * This header is all a plugin author needs. A plugin is a shared library (.so / .dylib) that
 * exports ONE function, `mlxd_sampler_plugin_v1`, returning a descriptor of the plugin. It
 * never links MLX: every device computation goes through the table of operations the host
 * hands it (`mlxd_host`), on opaque array handles. The arrays live on the host's device (a GPU
 * with Metal or CUDA, else the CPU); a plugin only builds lazy operations on them, which the
 * host evaluates together with the rest of its decode step. No operation here reads device data
 * back to the host: a plugin cannot stall the pipeline, and logits never leave the device.
 *
 * ---------------------------------------------------------------------------------------------
 * Life of a plugin
 * ---------------------------------------------------------------------------------------------
 * 1. Load. The daemon scans the directories of `[plugins] dirs` in config.toml (never a path a
 *    client sends), opens each shared library, calls `mlxd_sampler_plugin_v1()` and checks the
 *    descriptor: `abi_major` must equal the host's MLXD_SAMPLER_ABI_MAJOR and `abi_minor` must
 *    be <= the host's MLXD_SAMPLER_ABI_MINOR; struct sizes must cover every field of this
 *    version. Anything else is refused with a message naming the file and both versions.
 *    Plugins are listed by name (the `plugins` message) and reloaded by the `reload_plugins`
 *    message or SIGHUP; a library stays loaded while any request uses it.
 * 2. Create. A request names plugins with their parameters:
 *        "plugins": [{"name": "dry", "params": {"multiplier": 0.8}}]
 *    For every sequence of the request the host calls `create` once, with the parameters as
 *    JSON text. `create` validates them (an error here fails the request with `plugin_error`
 *    and your message) and allocates the plugin's per-sequence state.
 * 3. Apply. Every decode step the host calls `apply` with the step's logits. A PROCESSOR
 *    returns new logits of the same shape; a SAMPLER (final token picker) returns token ids.
 *    `apply` only builds lazy operations: it is called while the host assembles the step.
 * 4. Accept. After the step's token is chosen, the host calls `accept` (if not NULL) with it,
 *    still on the device: update state that depends on the choice here (mirostat's mu).
 * 5. Destroy. When the sequence ends (finished, cancelled, or failed), `destroy` (if not NULL).
 *
 * Where plugins run in mlxd's sampling pipeline (per row):
 *    logit bias -> repetition penalty -> presence/frequency penalties
 *    -> PROCESSOR plugins, in the order the request lists them
 *    -> temperature -> top-k -> top-p -> min-p -> typical-p -> built-in pick (Gumbel-max/argmax)
 * A SAMPLER plugin (at most one per request) replaces the temperature, the filters and the
 * built-in pick: it receives the logits after the processors, already divided by the request's
 * temperature when that is > 0 (unchanged when it is 0). Reported logprobs are the log-softmax
 * of the logits after the processors.
 *
 * ---------------------------------------------------------------------------------------------
 * Rules
 * ---------------------------------------------------------------------------------------------
 * - Threads: all calls for one plugin instance come from one host thread, one at a time. Host
 *   operations may be called only from inside a call the host made into the plugin (create,
 *   apply, accept, destroy), on that thread; anywhere else they fail.
 * - Handles: `mlxd_array` is an opaque handle. Every operation's result is a NEW handle that the
 *   caller OWNS and must give back with `release` (or return to the host as `apply`'s output,
 *   which hands ownership over). Every operation's array arguments are BORROWED: the operation
 *   never releases them. Handles the host passes into a call are BORROWED for that call only:
 *   do not release them, and call `retain` to keep one for later. Handles a plugin still owns
 *   when `destroy` returns are released by the host (leaks end with the sequence).
 * - Errors: an operation that fails returns NULL and records a message, read with `last_error`.
 *   An operation given a NULL argument returns NULL without a new message, so a chain of calls
 *   can be checked once at the end. Plugin entry points return an mlxd_status code and, on
 *   failure, write a NUL-terminated message into the caller's `mlxd_error` buffer
 *   (`mlxd_set_error` below does it). A failing plugin fails only its own request
 *   (`plugin_error`, naming the plugin); the daemon keeps serving the others.
 * - No exception (C++) or panic (Rust) may cross the boundary: catch them inside the plugin and
 *   return MLXD_ERR_INTERNAL or MLXD_ERR_PANIC. The Rust crate `mlxd-plugin-api` does this for you.
 * - Versioning: structs are append-only. A newer host may pass larger structs than you know;
 *   read only the fields of your version. `struct_size` tells what the other side has.
 */
#ifndef MLXD_SAMPLER_H
#define MLXD_SAMPLER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MLXD_SAMPLER_ABI_MAJOR 1
#define MLXD_SAMPLER_ABI_MINOR 1

/* The one symbol a plugin exports (see the end of this file). */
#define MLXD_SAMPLER_ENTRY_SYMBOL "mlxd_sampler_plugin_v1"

#if defined(_WIN32)
#define MLXD_EXPORT __declspec(dllexport)
#else
#define MLXD_EXPORT __attribute__((visibility("default")))
#endif

/* An opaque handle to an array on the host's device. NULL means "none" or "failed". */
typedef struct mlxd_array_opaque *mlxd_array;

/* ------------------------------------------------------------------------------------------ */
/* Status codes returned by plugin entry points.                                               */
/* ------------------------------------------------------------------------------------------ */
typedef int32_t mlxd_status;
#define MLXD_OK 0
#define MLXD_ERR_PARAMS 1   /* the request's parameters are invalid (create) */
#define MLXD_ERR_SHAPE 2    /* an input has a shape or dtype the plugin cannot handle */
#define MLXD_ERR_HOST 3     /* a host operation failed (the message says which) */
#define MLXD_ERR_INTERNAL 4 /* anything else, including a caught C++ exception */
#define MLXD_ERR_PANIC 5    /* a Rust panic caught at the boundary */

/* ------------------------------------------------------------------------------------------ */
/* Element types.                                                                              */
/* ------------------------------------------------------------------------------------------ */
typedef int32_t mlxd_dtype;
#define MLXD_BOOL 0
#define MLXD_UINT8 1
#define MLXD_UINT32 2
#define MLXD_UINT64 3
#define MLXD_INT32 4
#define MLXD_INT64 5
#define MLXD_FLOAT16 6
#define MLXD_BFLOAT16 7
#define MLXD_FLOAT32 8

/* ------------------------------------------------------------------------------------------ */
/* Operation codes.                                                                            */
/* ------------------------------------------------------------------------------------------ */
/* unary(op, a): elementwise. */
typedef int32_t mlxd_unary_op;
#define MLXD_NEG 0
#define MLXD_ABS 1
#define MLXD_EXP 2
#define MLXD_LOG 3         /* natural logarithm */
#define MLXD_LOG1P 4
#define MLXD_SQRT 5
#define MLXD_SQUARE 6
#define MLXD_FLOOR 7
#define MLXD_CEIL 8
#define MLXD_SIGMOID 9
#define MLXD_TANH 10
#define MLXD_LOGICAL_NOT 11
#define MLXD_ISNAN 12
#define MLXD_ISINF 13      /* +inf or -inf */
#define MLXD_ISFINITE 14
#define MLXD_RECIPROCAL 15

/* binary(op, a, b): elementwise with NumPy broadcasting; comparisons return bool. */
typedef int32_t mlxd_binary_op;
#define MLXD_ADD 0
#define MLXD_SUB 1
#define MLXD_MUL 2
#define MLXD_DIV 3
#define MLXD_POW 4
#define MLXD_MAXIMUM 5
#define MLXD_MINIMUM 6
#define MLXD_REMAINDER 7
#define MLXD_FLOOR_DIV 8
#define MLXD_LOGADDEXP 9
#define MLXD_EQ 10
#define MLXD_NE 11
#define MLXD_LT 12
#define MLXD_LE 13
#define MLXD_GT 14
#define MLXD_GE 15
#define MLXD_LOGICAL_AND 16
#define MLXD_LOGICAL_OR 17

/* reduce(op, a, axis, keepdims): over one axis (negative axes count from the end).
   ARGMAX / ARGMIN return uint32 indices (the first one on ties). */
typedef int32_t mlxd_reduce_op;
#define MLXD_SUM 0
#define MLXD_MAX 1
#define MLXD_MIN 2
#define MLXD_PROD 3
#define MLXD_MEAN 4
#define MLXD_ANY 5
#define MLXD_ALL 6
#define MLXD_LOGSUMEXP 7
#define MLXD_ARGMAX 8
#define MLXD_ARGMIN 9

/* cumulative(op, a, axis, reverse, inclusive). */
typedef int32_t mlxd_cumulative_op;
#define MLXD_CUMSUM 0
#define MLXD_CUMPROD 1
#define MLXD_CUMMAX 2
#define MLXD_CUMMIN 3

/* scatter(mode, a, indices, updates, axis): what happens where several updates hit one place. */
typedef int32_t mlxd_scatter_mode;
#define MLXD_SCATTER_SET 0 /* one of them wins (unspecified which) */
#define MLXD_SCATTER_ADD 1
#define MLXD_SCATTER_MAX 2
#define MLXD_SCATTER_MIN 3

/* ------------------------------------------------------------------------------------------ */
/* Kernels (ABI 1.1).                                                                          */
/* ------------------------------------------------------------------------------------------ */
/*
 * A plugin whose work is many small operations per step can write it as one kernel instead:
 * on a GPU each operation is a launch the host prepares on the CPU, and a small model's decode
 * step is bound by those launches, not by the device (the `dry` plugin goes from about 20 to
 * one). A kernel call itself costs the host about what one or two operations do, so replace
 * many operations, not one. Kernels are optional: check `kernel_language` and keep an
 * operations path for hosts where it is NONE.
 *
 * CUDA (MLXD_KERNEL_CUDA). `source` is the BODY of a `__global__ void` function that the host
 * writes around it (through MLX's custom-kernel support), with one parameter per input,
 * `const T *name` where T is the input's element type (bool, uint8_t, uint32_t, uint64_t,
 * int32_t, int64_t, __half, __nv_bfloat16, float), then one per output, `T *name`. Mentioning
 * `name_shape` (or `name_strides`, `name_ndim`) in the body adds that parameter for an input:
 * `name_shape[i]` is its size along axis i. Inputs arrive row-contiguous (the host copies any
 * that are not); outputs are uninitialized and row-contiguous: write every element.
 * `threadIdx`, `blockIdx`, `blockDim`, `__shared__`, atomics and `cooperative_groups` (as `cg`)
 * work as usual; `header` (or NULL) holds device functions placed before the kernel.
 *
 * A kernel is compiled (NVRTC) the first time a (name, source, element types) combination is
 * used in the process, which takes up to a few hundred milliseconds; the host does it then,
 * on zero-filled inputs of the call's shapes, so a kernel that does not compile fails only
 * that call (the message names the kernel and quotes the compiler). Keep per-request values
 * (parameters) in small input arrays made once in `create`, never in the source: a new source
 * is a new compilation. A kernel runs unchecked on the device: an out-of-bounds access there
 * can take the whole daemon down, like a crash in the plugin's own code.
 */
typedef int32_t mlxd_kernel_language;
#define MLXD_KERNEL_NONE 0
#define MLXD_KERNEL_CUDA 1

/* What a kernel is; keep name, header and source in static storage (the host may keep the
 * pointers). The host knows a kernel again by those three addresses (and its parameter names,
 * compared, so the name arrays may be built per call); each new address is a new definition,
 * checked again, and one plugin instance may make at most 64. */
typedef struct mlxd_kernel {
    size_t struct_size;              /* sizeof(mlxd_kernel) as the plugin built it */
    const char *name;                /* 1-64 of [A-Za-z0-9_] */
    const char *header;              /* device code placed before the kernel, or NULL */
    const char *source;              /* the kernel's body */
    int32_t n_inputs;                /* 1-16 */
    const char *const *input_names;  /* n_inputs C identifiers */
    int32_t n_outputs;               /* 1-8 */
    const char *const *output_names; /* n_outputs C identifiers, distinct from the inputs' */
} mlxd_kernel;

/* One call of a kernel; everything is borrowed for the call only. */
typedef struct mlxd_kernel_launch {
    size_t struct_size;              /* sizeof(mlxd_kernel_launch) as the plugin built it */
    const mlxd_array *inputs;        /* k->n_inputs arrays, in input_names' order */
    const int32_t *output_shapes;    /* every output's dimensions, one output after another */
    const int32_t *output_ndims;     /* k->n_outputs entries, each 0-8 */
    const mlxd_dtype *output_dtypes; /* k->n_outputs entries */
    int32_t grid[3];                 /* THREADS (not blocks) along x, y, z, each >= 1; at most
                                        65,535 blocks along y and z */
    int32_t block[3];                /* threads per block along x, y, z: product 1-1024 */
} mlxd_kernel_launch;
/* The outputs of one call hold at most 2^26 elements in all. */

/* ------------------------------------------------------------------------------------------ */
/* The host: a table of operations on device arrays.                                           */
/* ------------------------------------------------------------------------------------------ */
/*
 * Passed to every plugin call; the same pointer for every call of one instance, valid until
 * `destroy` returns. Every function takes that pointer first. Unless a comment says otherwise:
 *   - array arguments are BORROWED (never released by the operation);
 *   - the result is a NEW handle OWNED by the caller (give it back with `release`), or NULL on
 *     failure (see `last_error`), or NULL when an array argument was NULL;
 *   - `axis` may be negative (counted from the end);
 *   - shapes are `const int32_t *shape` with `ndim` entries (ndim <= 8); `shape` may be NULL
 *     when ndim is 0 (a scalar).
 * New operations are only ever added at the end (minor versions). Check
 * `struct_size >= offsetof(mlxd_host, op) + sizeof(void *)` before using one newer than the
 * `abi_minor` you require (the loader already guarantees all of your own minor's).
 */
typedef struct mlxd_host mlxd_host;
struct mlxd_host {
    size_t struct_size;  /* sizeof(mlxd_host) as the host built it */
    uint32_t abi_major;  /* the host's MLXD_SAMPLER_ABI_MAJOR */
    uint32_t abi_minor;  /* the host's MLXD_SAMPLER_ABI_MINOR */
    void *host_data;     /* the host's; never touch */

    /* -- errors and handles -- */
    /* The message of this instance's last failed operation ("" if none). Borrowed: valid until
       the next operation. */
    const char *(*last_error)(const mlxd_host *h);
    /* Gives a handle back. Takes ownership of `a` (NULL is ignored). Never release a handle
       the host passed into a call (those are borrowed). */
    void (*release)(const mlxd_host *h, mlxd_array a);
    /* A new owned handle to the same array as the borrowed `a` (no copy): keep it across calls. */
    mlxd_array (*retain)(const mlxd_host *h, mlxd_array a);

    /* -- queries (nothing here reads array data) -- */
    /* Number of dimensions of `a`; -1 if `a` is invalid. */
    int32_t (*ndim)(const mlxd_host *h, mlxd_array a);
    /* Size of dimension `axis` of `a`; -1 if `a` or `axis` is invalid. */
    int32_t (*dim)(const mlxd_host *h, mlxd_array a, int32_t axis);
    /* Element type of `a` (an MLXD_* dtype); -1 if invalid or a type this ABI does not name. */
    mlxd_dtype (*dtype)(const mlxd_host *h, mlxd_array a);
    /* Number of elements of `a`; -1 if invalid. */
    int64_t (*size)(const mlxd_host *h, mlxd_array a);

    /* -- arrays from host data (parameters) -- */
    /* Copies `data` (laid out row-major, elements of `dtype`, product of `shape` of them) to
       the device. `data` is borrowed for the call only. At most 2^24 elements. */
    mlxd_array (*from_data)(const mlxd_host *h, const void *data, const int32_t *shape, int32_t ndim,
                            mlxd_dtype dtype);
    /* A 0-d array holding `value` converted to `dtype`. */
    mlxd_array (*scalar)(const mlxd_host *h, double value, mlxd_dtype dtype);
    /* An array of `shape` filled with `value`. */
    mlxd_array (*full)(const mlxd_host *h, const int32_t *shape, int32_t ndim, double value, mlxd_dtype dtype);
    /* 1-d [start, stop) with `step`. */
    mlxd_array (*arange)(const mlxd_host *h, double start, double stop, double step, mlxd_dtype dtype);

    /* -- elementwise -- */
    mlxd_array (*unary)(const mlxd_host *h, mlxd_unary_op op, mlxd_array a);
    mlxd_array (*binary)(const mlxd_host *h, mlxd_binary_op op, mlxd_array a, mlxd_array b);
    /* `cond ? a : b` elementwise, broadcasting all three. */
    mlxd_array (*where)(const mlxd_host *h, mlxd_array cond, mlxd_array a, mlxd_array b);
    /* A copy converted to `dtype`. */
    mlxd_array (*astype)(const mlxd_host *h, mlxd_array a, mlxd_dtype dtype);

    /* -- reductions and normalization -- */
    mlxd_array (*reduce)(const mlxd_host *h, mlxd_reduce_op op, mlxd_array a, int32_t axis, int32_t keepdims);
    /* exp(a - logsumexp(a)) along `axis`, computed in float32 at least. */
    mlxd_array (*softmax)(const mlxd_host *h, mlxd_array a, int32_t axis);
    mlxd_array (*cumulative)(const mlxd_host *h, mlxd_cumulative_op op, mlxd_array a, int32_t axis,
                             int32_t reverse, int32_t inclusive);

    /* -- sorting -- */
    /* Ascending sort along `axis` (negate for descending). */
    mlxd_array (*sort)(const mlxd_host *h, mlxd_array a, int32_t axis);
    /* uint32 indices that sort `a` ascending along `axis`. */
    mlxd_array (*argsort)(const mlxd_host *h, mlxd_array a, int32_t axis);
    /* uint32 indices that put the element of rank `kth` in place: smaller ones before it,
       larger after, each side in no particular order. */
    mlxd_array (*argpartition)(const mlxd_host *h, mlxd_array a, int32_t kth, int32_t axis);
    /* The `k` largest values along `axis`, in no particular order. */
    mlxd_array (*topk)(const mlxd_host *h, mlxd_array a, int32_t k, int32_t axis);

    /* -- indexing -- */
    /* Elements of `a` at integer `indices` along `axis` (`indices` replaces that axis). */
    mlxd_array (*take)(const mlxd_host *h, mlxd_array a, mlxd_array indices, int32_t axis);
    /* out[.., i, ..] = a[.., indices[.., i, ..], ..] along `axis`; `indices` has a's shape
       except along `axis` (NumPy's take_along_axis). */
    mlxd_array (*take_along_axis)(const mlxd_host *h, mlxd_array a, mlxd_array indices, int32_t axis);
    /* A copy of `a` with `values` written at `indices` along `axis` (NumPy's put_along_axis). */
    mlxd_array (*put_along_axis)(const mlxd_host *h, mlxd_array a, mlxd_array indices, mlxd_array values,
                                 int32_t axis);
    /* put_along_axis with a reduction for repeated indices: `indices` and `updates` have the
       same shape, equal to a's except along `axis`; `mode` says how updates meeting at one
       place combine with each other and with `a` (SET: replace, ADD: a + sum, MAX / MIN). */
    mlxd_array (*scatter)(const mlxd_host *h, mlxd_scatter_mode mode, mlxd_array a, mlxd_array indices,
                          mlxd_array updates, int32_t axis);

    /* -- shapes -- */
    /* Same elements, new shape (one entry may be -1). */
    mlxd_array (*reshape)(const mlxd_host *h, mlxd_array a, const int32_t *shape, int32_t ndim);
    /* a[.., start:stop:step, ..] along `axis` (step > 0; start/stop clamped to the axis). */
    mlxd_array (*slice)(const mlxd_host *h, mlxd_array a, int32_t axis, int32_t start, int32_t stop, int32_t step);
    /* Joins `n` arrays (borrowed, `arrays` itself borrowed for the call) along `axis`. */
    mlxd_array (*concatenate)(const mlxd_host *h, const mlxd_array *arrays, int32_t n, int32_t axis);
    mlxd_array (*broadcast_to)(const mlxd_host *h, mlxd_array a, const int32_t *shape, int32_t ndim);
    /* Inserts a dimension of size 1 at `axis`. */
    mlxd_array (*expand_dims)(const mlxd_host *h, mlxd_array a, int32_t axis);
    /* Removes dimension `axis`, which must have size 1. */
    mlxd_array (*squeeze)(const mlxd_host *h, mlxd_array a, int32_t axis);

    /* -- random draws, from a key the host provides (mlxd_context.key) -- */
    /* `num` independent keys derived from `key`, as a [num, 2] uint32 array; take rows of it. */
    mlxd_array (*random_split)(const mlxd_host *h, mlxd_array key, int32_t num);
    /* Uniform in [0, 1) of `shape`; float dtypes only. */
    mlxd_array (*random_uniform)(const mlxd_host *h, mlxd_array key, const int32_t *shape, int32_t ndim,
                                 mlxd_dtype dtype);
    /* Standard normal of `shape`; float dtypes only. */
    mlxd_array (*random_normal)(const mlxd_host *h, mlxd_array key, const int32_t *shape, int32_t ndim,
                                mlxd_dtype dtype);
    /* Standard Gumbel of `shape` (argmax(logits + gumbel) samples softmax(logits)). */
    mlxd_array (*random_gumbel)(const mlxd_host *h, mlxd_array key, const int32_t *shape, int32_t ndim,
                                mlxd_dtype dtype);
    /* One uint32 index drawn from softmax(logits) along `axis` (that axis is removed). */
    mlxd_array (*random_categorical)(const mlxd_host *h, mlxd_array key, mlxd_array logits, int32_t axis);

    /* -- 1.1: kernels of your own (see "Kernels" below) -- */
    /* The language `kernel` compiles on this host's device: MLXD_KERNEL_CUDA where MLX runs on
       CUDA, MLXD_KERNEL_NONE elsewhere (the CPU; Metal kernels are not offered yet). The same
       for every call of an instance. */
    mlxd_kernel_language (*kernel_language)(const mlxd_host *h);
    /* Queues `k` on `launch`'s inputs as one node of the step (lazy, like every operation) and
       writes k->n_outputs NEW owned handles to `outputs`. Returns k->n_outputs, or -1 on
       failure (nothing written; see `last_error`), also when kernel_language is NONE. */
    int32_t (*kernel)(const mlxd_host *h, const mlxd_kernel *k, const mlxd_kernel_launch *launch,
                      mlxd_array *outputs);
};

/* ------------------------------------------------------------------------------------------ */
/* What the host passes to the plugin's entry points.                                          */
/* ------------------------------------------------------------------------------------------ */

/* A message buffer owned by the host. On failure write a NUL-terminated UTF-8 message of at
   most `capacity` bytes (including the NUL) into `message`; mlxd_set_error does it. */
typedef struct mlxd_error {
    char *message;
    size_t capacity;
} mlxd_error;

/* Writes `text` (truncated) into `err` and returns `code`, so: return mlxd_set_error(err, ...); */
static inline mlxd_status mlxd_set_error(mlxd_error *err, mlxd_status code, const char *text) {
    if (err != NULL && err->message != NULL && err->capacity > 0) {
        size_t n = text != NULL ? strlen(text) : 0;
        if (n >= err->capacity) n = err->capacity - 1;
        if (n > 0) memcpy(err->message, text, n);
        err->message[n] = '\0';
    }
    return code;
}

/* Arguments of `create`; everything is borrowed for the duration of the call. */
typedef struct mlxd_create_args {
    size_t struct_size;      /* sizeof(mlxd_create_args) as the host built it */
    const char *params_json; /* the request's `params` for this plugin: a JSON object, "{}" when
                                absent; UTF-8, NUL-terminated */
    size_t params_len;       /* strlen(params_json) */
    int32_t vocab_size;      /* V: the model's vocabulary size (logits are [B, V]) */
    int32_t batch;           /* B: rows of every apply of this instance (1 in this mlxd) */
} mlxd_create_args;

/* What `apply` knows about the sequence besides its logits; borrowed for the call. */
typedef struct mlxd_context {
    size_t struct_size;        /* sizeof(mlxd_context) as the host built it */
    /* [B, T] int32: each row's prompt followed by the tokens generated so far (T = prompt +
       generated). Borrowed. NULL unless the descriptor sets MLXD_CAP_HISTORY. */
    mlxd_array tokens;
    int64_t prompt_tokens;     /* how many of the T are the prompt */
    int64_t generated_tokens;  /* how many were generated (T - prompt_tokens) */
    /* A fresh random key ([2] uint32) for this call, different every call, derived from the
       request's `sampling.seed` when it has one. Borrowed. NULL unless the descriptor sets
       MLXD_CAP_RANDOM. */
    mlxd_array key;
    float temperature;         /* the request's temperature (see the pipeline order above) */
    int32_t vocab_size;        /* V */
} mlxd_context;

/* ------------------------------------------------------------------------------------------ */
/* What the plugin provides.                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef int32_t mlxd_kind;
#define MLXD_KIND_PROCESSOR 1 /* apply returns new logits [B, V] (any float dtype) */
#define MLXD_KIND_SAMPLER 2   /* apply returns token ids [B] (any integer dtype) */

/* Capability flags (descriptor.capabilities): what the host must prepare. */
#define MLXD_CAP_HISTORY ((uint64_t)1 << 0) /* apply reads mlxd_context.tokens */
#define MLXD_CAP_RANDOM ((uint64_t)1 << 1)  /* apply reads mlxd_context.key */
/* A PROCESSOR's apply takes the logits in the float dtype they arrive in: the model's
   (bfloat16 or float16 on a GPU) unless a built-in stage or an earlier processor made them
   float32. Without this flag the host hands it a float32 conversion, one more operation per
   step. Samplers always get float32 (the host divides by the temperature in float32). Hosts
   that predate the flag ignore it and always convert, so setting it needs no newer ABI minor. */
#define MLXD_CAP_MODEL_DTYPE ((uint64_t)1 << 2)

/*
 * The plugin's entry points. Every call gets the instance's `host` (see mlxd_host) and, where
 * it can fail, an `err` buffer; return MLXD_OK or an error code with a message.
 */
typedef struct mlxd_sampler_vtable {
    size_t struct_size; /* sizeof(mlxd_sampler_vtable) as the plugin built it */

    /* REQUIRED. Validates args->params_json and makes one sequence's state, stored in *state
       (may stay NULL if the plugin keeps none). Handles created here belong to the instance. */
    mlxd_status (*create)(const mlxd_host *host, const mlxd_create_args *args, void **state, mlxd_error *err);

    /* REQUIRED. Builds this step's output lazily; must not block or wait for the device.
       `logits`: [B, V] float, BORROWED (processors see the logits after the stages before
       them; samplers see them divided by the temperature, see the pipeline above).
       `ctx`: borrowed. On MLXD_OK, *out holds a NEW handle whose ownership passes to the
       host: [B, V] float logits for a PROCESSOR, [B] integer token ids for a SAMPLER (ids
       must be < V). Returning `logits` itself is done with `retain`. A wrong shape or dtype
       fails the request like an error code does. */
    mlxd_status (*apply)(void *state, const mlxd_host *host, mlxd_array logits, const mlxd_context *ctx,
                         mlxd_array *out, mlxd_error *err);

    /* OPTIONAL (NULL: not called). The tokens chosen this step, [B] uint32, BORROWED, still on
       the device. Called for every step's token, whoever picked it. */
    mlxd_status (*accept)(void *state, const mlxd_host *host, mlxd_array token, mlxd_error *err);

    /* OPTIONAL (NULL: nothing to free). Frees `state`; called exactly once per successful
       create, also when the request failed or was cancelled. The host then releases every
       handle the instance still owns. */
    void (*destroy)(void *state, const mlxd_host *host);
} mlxd_sampler_vtable;

/* Describes the plugin. Returned by the entry function; must stay valid (static storage)
   while the library is loaded. */
typedef struct mlxd_plugin_descriptor {
    size_t struct_size;   /* sizeof(mlxd_plugin_descriptor) as the plugin built it */
    uint32_t abi_major;   /* MLXD_SAMPLER_ABI_MAJOR the plugin was built against */
    uint32_t abi_minor;   /* MLXD_SAMPLER_ABI_MINOR the plugin was built against */
    const char *name;     /* what requests call it: 1-64 of [a-z0-9_-], unique among plugins */
    const char *version;  /* the plugin's own version, e.g. "0.1.0" */
    mlxd_kind kind;       /* MLXD_KIND_PROCESSOR or MLXD_KIND_SAMPLER */
    uint64_t capabilities; /* MLXD_CAP_* flags */
    const char *params_schema; /* JSON Schema of the params object (listed to clients), or NULL */
    const char *description;   /* one line for listings, or NULL */
    const mlxd_sampler_vtable *vtable; /* static storage */
} mlxd_plugin_descriptor;

/* The entry function every plugin exports, by this exact name:
 *
 *     MLXD_EXPORT const mlxd_plugin_descriptor *mlxd_sampler_plugin_v1(void);
 *
 * It must only return the (static) descriptor: no allocation, no device work.
 */
typedef const mlxd_plugin_descriptor *(*mlxd_sampler_plugin_entry)(void);

#ifdef __cplusplus
}
#endif

#endif /* MLXD_SAMPLER_H */
