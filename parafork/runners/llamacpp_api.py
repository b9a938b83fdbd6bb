"""The slice of llama.cpp's C API the llama.cpp runner calls, loaded with cffi from the
shared library inside the pinned `xllamacpp` wheel (it exports the whole C API; its own
Python layer wraps only llama-server).

The declarations are those of `include/llama.h` of that exact build (llama.cpp b11549, as
vendored in xllamacpp 2026.10.11549's sources): struct layouts change between builds, so
`XLLAMACPP_VERSION` is checked before the library is opened. Enums are `int`, callbacks
and opaque handles `void *`; every struct passed by value is declared field for field.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

XLLAMACPP_VERSION = "2026.10.11549"

CDEF = """
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;
typedef struct llama_memory_i * llama_memory_t;
struct llama_model;
struct llama_context;
struct llama_vocab;

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token * token;
    float * embd;
    llama_pos * pos;
    int32_t * n_seq_id;
    llama_seq_id ** seq_id;
    int8_t * logits;
} llama_batch;

struct llama_model_params {
    void * devices;
    const void * tensor_buft_overrides;
    int32_t n_gpu_layers;
    int split_mode;
    int load_mode;
    int lazy_mode;
    int32_t main_gpu;
    const float * tensor_split;
    void * progress_callback;
    void * progress_callback_user_data;
    const void * kv_overrides;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    bool load_mtp;
};

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_outputs_max;
    uint32_t n_outputs_max_per_seq;
    int32_t n_threads;
    int32_t n_threads_batch;
    int ctx_type;
    int rope_scaling_type;
    int pooling_type;
    int attention_type;
    int flash_attn_type;
    float rope_freq_base;
    float rope_freq_scale;
    float yarn_ext_factor;
    float yarn_attn_factor;
    float yarn_beta_fast;
    float yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float defrag_thold;
    void * cb_eval;
    void * cb_eval_user_data;
    int type_k;
    int type_v;
    size_t moe_cache_size;
    void * abort_callback;
    void * abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool op_offload;
    bool swa_full;
    bool kv_unified;
    void * samplers;
    size_t n_samplers;
    struct llama_context * ctx_other;
};

void llama_backend_init(void);
void llama_log_set(void * log_callback, void * user_data);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);
struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits(struct llama_context * ctx);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
void llama_set_n_threads(struct llama_context * ctx, int32_t n_threads, int32_t n_threads_batch);
llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
uint64_t llama_model_size(const struct llama_model * model);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
                       int32_t n_tokens_max, bool add_special, bool parse_special);
const char * llama_vocab_get_text(const struct llama_vocab * vocab, llama_token token);
"""


class LlamaCppUnavailable(ImportError):
    pass


def library_path() -> Path:
    spec = importlib.util.find_spec("xllamacpp")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaCppUnavailable(f"the llama.cpp backend needs xllamacpp=={XLLAMACPP_VERSION} and cffi (pip install)")
    version = importlib.metadata.version("xllamacpp")
    if version != XLLAMACPP_VERSION:
        raise LlamaCppUnavailable(
            f"xllamacpp {version} is installed; the declarations here are those of {XLLAMACPP_VERSION} "
            "(llama.cpp's structs change between builds): pip install xllamacpp==" + XLLAMACPP_VERSION
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("xllamacpp*.so"))
    if not found:
        raise LlamaCppUnavailable("xllamacpp is installed without its shared library")
    return found[0]


@functools.cache
def load():
    """(ffi, lib): the C API, with llama.cpp's logging off and its backend initialised once."""
    try:
        from cffi import FFI
    except ImportError as e:
        raise LlamaCppUnavailable("the llama.cpp backend needs cffi (pip install cffi)") from e
    ffi = FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(str(library_path()))
    lib.llama_log_set(_quiet(ffi), ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


_callbacks = []  # cffi callbacks must outlive every call into the library


def _quiet(ffi):
    callback = ffi.callback("void(int, const char *, void *)", lambda level, text, data: None)
    _callbacks.append(callback)
    return ffi.cast("void *", callback)
