/* A plugin descriptor for the ABI version given by -DFIXTURE_MAJOR / -DFIXTURE_MINOR: the loader
   must refuse it before touching its (NULL) entry points. */
#include "mlxd_sampler.h"

static const mlxd_sampler_vtable vtable = {sizeof(mlxd_sampler_vtable), NULL, NULL, NULL, NULL};

static const mlxd_plugin_descriptor descriptor = {
    sizeof(mlxd_plugin_descriptor), FIXTURE_MAJOR, FIXTURE_MINOR, FIXTURE_NAME, "0.0.1",
    MLXD_KIND_PROCESSOR, 0, NULL, NULL, &vtable,
};

MLXD_EXPORT const mlxd_plugin_descriptor *mlxd_sampler_plugin_v1(void) { return &descriptor; }
