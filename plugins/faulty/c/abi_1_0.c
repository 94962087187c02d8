/* A processor built for ABI 1.0, before the 1.1 kernel operations: a 1.1 host must load and run
   it (same major, host minor >= plugin minor). It adds 1 to every logit with 1.0 operations and
   checks the table the way the header asks a plugin to: by size, up to its own last entry. */
#include <stddef.h>

#include "mlxd_sampler.h"

static mlxd_status create(const mlxd_host *h, const mlxd_create_args *args, void **state, mlxd_error *err) {
    (void)args;
    *state = NULL;
    if (h->struct_size < offsetof(mlxd_host, random_categorical) + sizeof(void *)) {
        return mlxd_set_error(err, MLXD_ERR_HOST, "the host's table lacks ABI 1.0 operations");
    }
    return MLXD_OK;
}

static mlxd_status apply(void *state, const mlxd_host *h, mlxd_array logits, const mlxd_context *ctx,
                         mlxd_array *out, mlxd_error *err) {
    (void)state;
    (void)ctx;
    mlxd_array one = h->scalar(h, 1.0, MLXD_FLOAT32);
    *out = h->binary(h, MLXD_ADD, logits, one);
    h->release(h, one);
    return *out != NULL ? MLXD_OK : mlxd_set_error(err, MLXD_ERR_HOST, h->last_error(h));
}

static const mlxd_sampler_vtable vtable = {sizeof(mlxd_sampler_vtable), create, apply, NULL, NULL};

static const mlxd_plugin_descriptor descriptor = {
    sizeof(mlxd_plugin_descriptor), 1, 0, "abi-one-zero", "0.0.1", MLXD_KIND_PROCESSOR, 0, NULL,
    "adds 1 to every logit (built for ABI 1.0)", &vtable,
};

MLXD_EXPORT const mlxd_plugin_descriptor *mlxd_sampler_plugin_v1(void) { return &descriptor; }
