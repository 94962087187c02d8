/* A shared library that looks like a plugin but exports no mlxd_sampler_plugin_v1. */
int mlxd_sampler_plugin_v0(void) { return 0; }
