/*
 * ggml-coreml: a ggml backend that runs llama.cpp's int8 matrix multiplications on the Apple Neural
 * Engine through public CoreML. Load it at run time (GGML_BACKEND_PATH=/path/libggml-coreml.so, or
 * ggml_backend_load) or link it statically and register it (iOS).
 *
 * Everything here is plain C; no ggml internals are needed to call it. The backend-specific
 * functions are also reachable by name through ggml_backend_reg_get_proc_address(reg, "<name>").
 */
#ifndef GGML_COREML_H
#define GGML_COREML_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_backend_reg;

/* --- dynamic loading (exported by the shared library; ggml_backend_load calls these) --- */

/* The registry "CoreML" (the same pointer on every call), or NULL when the host's ggml layout is
 * not supported (one log line says why; the host goes on without us). */
struct ggml_backend_reg * ggml_backend_init(void);

/* > 0 wherever the library can load. */
int ggml_backend_score(void);

/* --- static registration (iOS, static hosts) --- */

/* Same registry; call ggml_backend_register(ggml_backend_coreml_reg()) before loading a model. */
struct ggml_backend_reg * ggml_backend_coreml_reg(void);

/* --- controls (also via ggml_backend_reg_get_proc_address) --- */

/* Policy: "latency" (default: offload only where predicted or measured faster), "energy" (prefer the
 * ANE while it is at most a configured factor slower), "off" (decline everything), "always" (testing:
 * take every supported op). Returns 0 on success, -1 for an unknown name (policy unchanged).
 * The environment variable GGML_COREML_POLICY sets the initial value. */
typedef int (*ggml_backend_coreml_set_policy_t)(const char * name);
int ggml_backend_coreml_set_policy(const char * name);

/* The current policy name (static string). */
typedef const char * (*ggml_backend_coreml_get_policy_t)(void);
const char * ggml_backend_coreml_get_policy(void);

/* Statistics as JSON: ops offloaded and declined (by reason), time in the executor, faults, weights
 * prepared. Writes at most len bytes including the terminating NUL; returns the full length needed. */
typedef size_t (*ggml_backend_coreml_get_stats_t)(char * buf, size_t len);
size_t ggml_backend_coreml_get_stats(char * buf, size_t len);

/* Resets the statistics. */
typedef void (*ggml_backend_coreml_reset_stats_t)(void);
void ggml_backend_coreml_reset_stats(void);

/* Most bytes of prepared (program-form) weights kept resident; past it, weights are prepared per call
 * in row slices of at most 4 MiB (two alive at once) and dropped. SIZE_MAX: unbounded (the default on macOS and Linux; on iOS the default is a quarter of
 * os_proc_available_memory()). GGML_COREML_WEIGHT_BUDGET_MB sets the initial value. Returns the old one. */
typedef size_t (*ggml_backend_coreml_set_weight_budget_t)(size_t bytes);
size_t ggml_backend_coreml_set_weight_budget(size_t bytes);

/* Library version (static string). */
typedef const char * (*ggml_backend_coreml_version_t)(void);
const char * ggml_backend_coreml_version(void);

#ifdef __cplusplus
}
#endif

#endif /* GGML_COREML_H */
