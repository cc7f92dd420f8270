// lrq: a thin C++ layer over the (patched) llama.cpp C API for the Python binding.
// It owns a model and one context, evaluates token batches and computes perplexity with
// llama-perplexity's method.  No Python types here: module.cpp validates and casts.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

struct llama_model;
struct llama_context;

namespace lrq {

// A GGUF could not be loaded (missing, truncated, corrupt, unsupported).  The message names the
// file and carries llama.cpp's own error lines.
struct LoadError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// llama.cpp's log goes through here: errors and warnings are kept (for exception messages),
// everything is echoed to stderr only when LRQ_VERBOSE is set in the environment.
void install_log_capture();
std::string recent_log_errors();
void clear_log();

struct PerplexityResult {
    double ppl = 0.0;        // exp(mean nll)
    double nll = 0.0;        // mean negative log-likelihood (nats)
    double nll_std = 0.0;    // standard error of the mean nll (as llama-perplexity prints it, / ppl)
    int64_t count = 0;       // scored tokens
    int n_chunks = 0;        // windows evaluated
    int n_ctx = 0;           // window length
};

class Model {
public:
    // n_ctx: context size of the one sequence; n_threads <= 0: llama.cpp's default.
    // kv_f32: F32 KV cache instead of llama.cpp's default F16; flash_attn: llama_flash_attn_type
    // (-1 auto, 0 off, 1 on).
    Model(const std::string & path, int n_ctx, int n_threads, int n_batch, bool kv_f32 = false, int flash_attn = -1);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const int32_t * tokens, int n) const;

    // logits[n, n_vocab] (row-major) of tokens[0..n) at positions 0..n-1 of an empty cache.
    void eval(const int32_t * tokens, int n, float * logits);

    // llama-perplexity's method: windows of n_ctx tokens (the first replaced by BOS when the
    // vocabulary adds one), the second half of each window scored; n_chunks < 0: all windows.
    PerplexityResult perplexity(std::vector<int32_t> tokens, int n_ctx, int n_chunks);

    int n_vocab() const;
    int n_ctx() const { return n_ctx_; }
    int n_layer() const;
    uint64_t n_params() const;
    uint64_t size_bytes() const;
    std::string desc() const;
    std::string meta(const std::string & key) const;   // "" when absent
    const std::string & path() const { return path_; }

private:
    void decode_window(const int32_t * tokens, int n, int first_output, std::vector<float> & out);

    std::string path_;
    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    int n_ctx_ = 0;
    int n_batch_ = 0;
};

std::string system_info();
std::vector<std::string> backend_names();

}  // namespace lrq
