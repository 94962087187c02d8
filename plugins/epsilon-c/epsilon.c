/*
 * epsilon: epsilon sampling (Hewitt et al. 2022, "Truncation Sampling as Language Model
 * Desmoothing") as an mlxd sampler plugin, in plain C against mlxd_sampler.h alone.
 *
 * A processor: every token whose probability is below `epsilon` gets -inf; the most likely
 * token always survives. Computed in log space on the device:
 *     keep = (logits - logsumexp(logits) >= ln epsilon) or (logits == max(logits))
 *
 * Params: {"epsilon": 0.0003}, 0 < epsilon < 1.
 * Build: cc -shared -fPIC -I plugin-api/include epsilon.c -o libmlxd_epsilon.so
 */
#include "mlxd_sampler.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mlxd_array log_epsilon; /* 0-d float32, owned by this state */
    mlxd_array neg_inf;     /* 0-d float32, owned by this state */
} epsilon_state;

static const char *skip_space(const char *p) {
    while (isspace((unsigned char)*p)) p++;
    return p;
}

/* Reads {"epsilon": <number>} or {}; returns 0 on success, else writes why into `why`. */
static int parse_params(const char *json, double *epsilon, char *why, size_t why_len) {
    const char *p = skip_space(json);
    if (*p++ != '{') return snprintf(why, why_len, "epsilon params must be a JSON object"), -1;
    p = skip_space(p);
    while (*p == '"') {
        const char *key = ++p;
        while (*p && *p != '"') p++;
        if (*p != '"') return snprintf(why, why_len, "epsilon params: unterminated key"), -1;
        size_t key_len = (size_t)(p - key);
        p = skip_space(p + 1);
        if (*p++ != ':') return snprintf(why, why_len, "epsilon params: expected ':'"), -1;
        if (key_len != 7 || strncmp(key, "epsilon", 7) != 0)
            return snprintf(why, why_len, "epsilon params: unknown field `%.*s` (expected `epsilon`)", (int)key_len, key), -1;
        char *end = NULL;
        *epsilon = strtod(skip_space(p), &end);
        if (end == skip_space(p)) return snprintf(why, why_len, "`epsilon` must be a number"), -1;
        p = skip_space(end);
        if (*p == ',') p = skip_space(p + 1);
    }
    if (*p != '}') return snprintf(why, why_len, "epsilon params: expected '}'"), -1;
    return 0;
}

static mlxd_status epsilon_create(const mlxd_host *h, const mlxd_create_args *args, void **state, mlxd_error *err) {
    double epsilon = 3e-4;
    char why[256];
    if (parse_params(args->params_json, &epsilon, why, sizeof why) != 0) return mlxd_set_error(err, MLXD_ERR_PARAMS, why);
    if (!(epsilon > 0.0 && epsilon < 1.0)) {
        snprintf(why, sizeof why, "`epsilon` must be in (0, 1), got %g", epsilon);
        return mlxd_set_error(err, MLXD_ERR_PARAMS, why);
    }
    epsilon_state *s = calloc(1, sizeof *s);
    if (s == NULL) return mlxd_set_error(err, MLXD_ERR_INTERNAL, "epsilon: out of memory");
    mlxd_array eps = h->scalar(h, epsilon, MLXD_FLOAT32);   /* owned */
    s->log_epsilon = h->unary(h, MLXD_LOG, eps);             /* owned; NULL if eps is NULL */
    h->release(h, eps);
    s->neg_inf = h->scalar(h, -1.0 / 0.0, MLXD_FLOAT32);
    if (s->log_epsilon == NULL || s->neg_inf == NULL) {
        mlxd_status code = mlxd_set_error(err, MLXD_ERR_HOST, h->last_error(h));
        h->release(h, s->log_epsilon);
        h->release(h, s->neg_inf);
        free(s);
        return code;
    }
    *state = s;
    return MLXD_OK;
}

static mlxd_status epsilon_apply(void *state, const mlxd_host *h, mlxd_array logits, const mlxd_context *ctx,
                                 mlxd_array *out, mlxd_error *err) {
    (void)ctx;
    epsilon_state *s = state;
    /* Every result below is owned here; NULL propagates, so one check at the end suffices. */
    mlxd_array lse = h->reduce(h, MLXD_LOGSUMEXP, logits, -1, 1);
    mlxd_array logp = h->binary(h, MLXD_SUB, logits, lse);
    mlxd_array likely = h->binary(h, MLXD_GE, logp, s->log_epsilon);
    mlxd_array best = h->reduce(h, MLXD_MAX, logits, -1, 1);
    mlxd_array is_best = h->binary(h, MLXD_GE, logits, best);
    mlxd_array keep = h->binary(h, MLXD_LOGICAL_OR, likely, is_best);
    mlxd_array result = h->where(h, keep, logits, s->neg_inf);
    mlxd_array temporaries[] = {lse, logp, likely, best, is_best, keep};
    for (size_t i = 0; i < sizeof temporaries / sizeof temporaries[0]; i++) h->release(h, temporaries[i]);
    if (result == NULL) return mlxd_set_error(err, MLXD_ERR_HOST, h->last_error(h));
    *out = result; /* ownership passes to the host */
    return MLXD_OK;
}

static void epsilon_destroy(void *state, const mlxd_host *h) {
    epsilon_state *s = state;
    h->release(h, s->log_epsilon);
    h->release(h, s->neg_inf);
    free(s);
}

static const mlxd_sampler_vtable epsilon_vtable = {
    sizeof(mlxd_sampler_vtable),
    epsilon_create,
    epsilon_apply,
    NULL, /* accept: no state depends on the chosen token */
    epsilon_destroy,
};

static const mlxd_plugin_descriptor epsilon_descriptor = {
    sizeof(mlxd_plugin_descriptor),
    MLXD_SAMPLER_ABI_MAJOR,
    MLXD_SAMPLER_ABI_MINOR,
    "epsilon",
    "0.1.0",
    MLXD_KIND_PROCESSOR,
    0,
    "{\"type\":\"object\",\"additionalProperties\":false,\"properties\":"
    "{\"epsilon\":{\"type\":\"number\",\"exclusiveMinimum\":0,\"exclusiveMaximum\":1,\"default\":0.0003}}}",
    "epsilon sampling: drops tokens less likely than epsilon (written in C)",
    &epsilon_vtable,
};

MLXD_EXPORT const mlxd_plugin_descriptor *mlxd_sampler_plugin_v1(void) { return &epsilon_descriptor; }
