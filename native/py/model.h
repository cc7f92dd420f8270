// lrq: a thin C++ layer over the (patched) llama.cpp C API for the Python binding.
// It owns a model and one context, evaluates token batches and computes perplexity with
// llama-perplexity's method.  No Python types here: module.cpp validates and casts.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
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
// llama_log_set is process-wide, but libllama calls the callback synchronously on the thread
// that called into it, so each line goes to the LogBuffer that the calling thread has made
// current (model.cpp's LogScope): two Models used from two threads never see each other's lines.
void install_log_capture();

// The recent warning and error lines llama.cpp logged on behalf of one Model.  Written by the
// log callback on whichever thread has it current; its own mutex makes that safe even if two
// threads ever have the same buffer current at once.
class LogBuffer {
public:
    void add(const char * text);   // a piece of a line, as llama.cpp sends it
    void clear();
    std::string text() const;      // each line as "\n  line" (appended to exception messages)

private:
    mutable std::mutex mutex_;
    std::deque<std::string> lines_;
    std::string partial_;          // llama.cpp sends some lines in pieces (CONT level)
};

struct PerplexityResult {
    double ppl = 0.0;        // exp(mean nll)
    double nll = 0.0;        // mean negative log-likelihood (nats)
    double nll_std = 0.0;    // standard error of the mean nll (as llama-perplexity prints it, / ppl)
    int64_t count = 0;       // scored tokens
    int n_chunks = 0;        // windows evaluated
    int n_ctx = 0;           // window length
};

// Thread safety: one Model may be used from several threads.  Everything that touches the
// llama_context (eval, perplexity) runs under the Model's mutex, so concurrent calls on one
// Model are serialized and each sees an empty cache and its own logits.  tokenize/detokenize and
// the properties only read the llama_model and its vocabulary, which are immutable after
// loading (llama.cpp's tokenizers keep their state in a per-call session), so they run without
// it.  Callers holding a lock of their own (the GIL) must release it before eval/perplexity:
// waiting for this mutex while holding the GIL would deadlock against a thread that needs the
// GIL to return from its own call.
class Model {
public:
    // n_ctx: context size of the one sequence; n_threads <= 0: llama.cpp's default.
    // kv_f32: F32 KV cache instead of llama.cpp's default F16; flash_attn: llama_flash_attn_type
    // (-1 auto, 0 off, 1 on).  layers / adapter: lrq's load options (--lrq-layers MAP,
    // --lrq-adapter FILE; "" = none), docs/FORMAT.md sections 7.1 and 11.  vocab_only: the
    // vocabulary alone (llama.cpp's vocab_only load: no weights, no context), to tokenize a text
    // without the model's memory (a 32B file's CPU buffers); eval / perplexity then throw.
    Model(const std::string & path, int n_ctx, int n_threads, int n_batch, bool kv_f32 = false, int flash_attn = -1,
          const std::string & layers = "", const std::string & adapter = "", bool vocab_only = false);
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
    // Caller holds mutex_.
    void decode_window(const int32_t * tokens, int n, int first_output, std::vector<float> & out);

    std::mutex mutex_;           // held around every use of ctx_
    LogBuffer log_;              // llama.cpp's lines for this model (load, context, decode)
    std::string path_;
    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    int n_ctx_ = 0;
    int n_batch_ = 0;
};

std::string system_info();
std::vector<std::string> backend_names();

}  // namespace lrq
