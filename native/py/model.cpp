// lrq: Model — load a GGUF through the patched libllama, evaluate logits, compute perplexity.
#include "model.h"

#include "lrq-args.h"

#include "ggml-backend.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace lrq {

// ---- log capture -----------------------------------------------------------------------------

namespace {

constexpr size_t kLogKeep = 16;   // lines kept per buffer: enough for llama.cpp's error context

// The buffer of the Model this thread is calling llama.cpp for (nullptr: none).  llama.cpp
// invokes the log callback synchronously on the thread that called it, so a thread_local is
// exactly "the model this line is about".
thread_local LogBuffer * t_sink = nullptr;
// Level of this thread's previous piece: a CONT piece continues the line its own thread began.
thread_local ggml_log_level t_last_level = GGML_LOG_LEVEL_INFO;

// Makes a Model's buffer current on this thread for the duration of one call into llama.cpp
// (load, context creation, decode, free), and empties it first, so that an error message
// carries the lines of the call that failed and nothing older.  Restores the previous sink, so
// scopes nest.
class LogScope {
public:
    explicit LogScope(LogBuffer & buf) : prev_(t_sink) {
        buf.clear();
        t_sink = &buf;
    }
    ~LogScope() { t_sink = prev_; }
    LogScope(const LogScope &) = delete;
    LogScope & operator=(const LogScope &) = delete;

private:
    LogBuffer * prev_;
};

void log_callback(ggml_log_level level, const char * text, void * /*user*/) {
    static const bool verbose = std::getenv("LRQ_VERBOSE") != nullptr;
    if (verbose) {
        std::fputs(text, stderr);
    }
    if (level == GGML_LOG_LEVEL_CONT) {
        level = t_last_level;
    }
    t_last_level = level;
    if (level != GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_WARN) {
        return;
    }
    if (t_sink) {
        t_sink->add(text);
    } else if (level == GGML_LOG_LEVEL_ERROR && !verbose) {
        // No current model: a thread llama.cpp started itself (ggml workers, the loader's
        // tensor-validation tasks) or a call made outside any Model (backend init).  Such a
        // line cannot be tied to one model, and keeping it in a shared buffer for later
        // messages is exactly what would put one model's errors into another's exception; so
        // it is kept for no message.  Errors still go to stderr so that they are not lost;
        // warnings without a model are dropped (LRQ_VERBOSE shows them).
        std::fputs(text, stderr);
    }
}

}  // namespace

void install_log_capture() {
    llama_log_set(log_callback, nullptr);
}

void LogBuffer::add(const char * text) {
    std::lock_guard<std::mutex> lock(mutex_);
    partial_ += text;
    size_t nl;
    while ((nl = partial_.find('\n')) != std::string::npos) {
        std::string line = partial_.substr(0, nl);
        partial_.erase(0, nl + 1);
        if (!line.empty()) {
            lines_.push_back(std::move(line));
            if (lines_.size() > kLogKeep) {
                lines_.pop_front();
            }
        }
    }
}

void LogBuffer::clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    lines_.clear();
    partial_.clear();
}

std::string LogBuffer::text() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (const auto & l : lines_) {
        out += "\n  ";
        out += l;
    }
    if (!partial_.empty()) {
        out += "\n  " + partial_;
    }
    return out;
}

// ---- Model -----------------------------------------------------------------------------------

Model::Model(const std::string & path, int n_ctx, int n_threads, int n_batch, bool kv_f32, int flash_attn,
             const std::string & layers, const std::string & adapter, bool vocab_only)
    : path_(path), n_ctx_(n_ctx), n_batch_(n_batch > 0 ? std::min(n_batch, n_ctx) : n_ctx) {
    // No lock: no other thread can reach this Model before its constructor returns.
    LogScope scope(log_);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = vocab_only;
    // the same kv-overrides as the tools' --lrq-layers / --lrq-adapter (lrq-args.h)
    std::vector<llama_model_kv_override> overrides;
    try {
        if (!layers.empty()) {
            lrq_push_load_option(overrides, LRQ_OPT_LAYERS, layers, "layers");
        }
        if (!adapter.empty()) {
            lrq_push_load_option(overrides, LRQ_OPT_ADAPTER, adapter, "adapter");
        }
    } catch (const std::invalid_argument & e) {
        throw LoadError("cannot load GGUF '" + path + "': " + e.what());
    }
    if (!overrides.empty()) {
        overrides.emplace_back();
        overrides.back().key[0] = 0;
        mp.kv_overrides = overrides.data();
    }
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) {
        throw LoadError("cannot load GGUF '" + path + "': llama.cpp refused it:" + log_.text());
    }
    if (vocab_only) {
        return;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) n_batch_;
    cp.n_ubatch = (uint32_t) std::min(n_batch_, 512);
    cp.n_seq_max = 1;
    if (kv_f32) {   // exact attention for tests: llama.cpp's default KV cache is F16
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    cp.flash_attn_type = (llama_flash_attn_type) flash_attn;
    if (n_threads > 0) {
        cp.n_threads = n_threads;
        cp.n_threads_batch = n_threads;
    }
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        llama_model_free(model_);
        model_ = nullptr;
        throw LoadError("cannot create a context for '" + path + "':" + log_.text());
    }
}

Model::~Model() {
    // Python drops the last reference only when no call is in flight, so no lock is needed.
    LogScope scope(log_);
    if (ctx_) {
        llama_free(ctx_);
    }
    if (model_) {
        llama_model_free(model_);
    }
}

int Model::n_vocab() const {
    return llama_vocab_n_tokens(llama_model_get_vocab(model_));
}

int Model::n_layer() const {
    return llama_model_n_layer(model_);
}

uint64_t Model::n_params() const {
    return llama_model_n_params(model_);
}

uint64_t Model::size_bytes() const {
    return llama_model_size(model_);
}

std::string Model::desc() const {
    char buf[256];
    llama_model_desc(model_, buf, sizeof(buf));
    return buf;
}

std::string Model::meta(const std::string & key) const {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model_, key.c_str(), buf.data(), buf.size());
    if (n < 0) {
        return "";
    }
    if ((size_t) n >= buf.size()) {
        buf.resize((size_t) n + 1);
        llama_model_meta_val_str(model_, key.c_str(), buf.data(), buf.size());
    }
    return std::string(buf.data(), (size_t) n);
}

// tokenize/detokenize take no lock: they only read the vocabulary, which llama.cpp never changes
// after loading (each call builds its own tokenizer session), as llama-server relies on when it
// tokenizes on its HTTP threads while decoding.  Their rare warnings arrive without a sink.
std::vector<int32_t> Model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    // a token is at least one byte, plus BOS/EOS
    std::vector<llama_token> out(text.size() + 2);
    int32_t n = 0;
    try {
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                           add_special, parse_special);
        if (n < 0) {
            out.resize((size_t) -n);
            n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                               add_special, parse_special);
        }
    } catch (const std::out_of_range &) {
        // llama.cpp's SPM tokenizer looks each character up with unordered_map::at: a vocabulary
        // without byte fallback throws on a character it has no token for
        throw std::invalid_argument(path_ + ": the vocabulary has no token for a character of the text "
                                    "(and no byte fallback)");
    }
    if (n < 0) {
        throw std::runtime_error("tokenization failed for a text of " + std::to_string(text.size()) + " bytes");
    }
    out.resize((size_t) n);
    return out;
}

std::string Model::detokenize(const int32_t * tokens, int n) const {
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    std::string out(std::max(16, n * 8), '\0');
    int32_t m = llama_detokenize(vocab, tokens, n, out.data(), (int32_t) out.size(), false, false);
    if (m < 0) {
        out.resize((size_t) -m);
        m = llama_detokenize(vocab, tokens, n, out.data(), (int32_t) out.size(), false, false);
    }
    out.resize((size_t) std::max(m, 0));
    return out;
}

// Decode tokens[0..n) as positions 0..n-1 of sequence 0 in an empty cache; keep the logits of
// positions >= first_output, appended to `out` row by row.
void Model::decode_window(const int32_t * tokens, int n, int first_output, std::vector<float> & out) {
    if (!ctx_) {
        throw std::invalid_argument(path_ + ": loaded with vocab_only (a tokenizer): nothing to evaluate");
    }
    if (n > n_ctx_) {
        throw std::invalid_argument("cannot evaluate " + std::to_string(n) + " tokens in a context of " +
                                    std::to_string(n_ctx_));
    }
    const int nv = n_vocab();
    LogScope scope(log_);
    llama_memory_clear(llama_get_memory(ctx_), true);
    llama_batch batch = llama_batch_init(n_batch_, 0, 1);
    try {
        for (int start = 0; start < n; start += n_batch_) {
            const int len = std::min(n_batch_, n - start);
            batch.n_tokens = len;
            int n_out = 0;
            for (int k = 0; k < len; ++k) {
                const int pos = start + k;
                batch.token[k] = tokens[pos];
                batch.pos[k] = pos;
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = 0;
                batch.logits[k] = pos >= first_output;
                n_out += pos >= first_output;
            }
            log_.clear();   // a failure's message carries this decode's lines, not an earlier batch's
            if (llama_decode(ctx_, batch) != 0) {
                throw std::runtime_error("llama_decode failed on '" + path_ + "':" + log_.text());
            }
            for (int k = 0; k < len; ++k) {
                if (batch.logits[k]) {
                    const float * row = llama_get_logits_ith(ctx_, k);
                    if (!row) {
                        throw std::runtime_error("no logits for position " + std::to_string(start + k));
                    }
                    out.insert(out.end(), row, row + nv);
                }
            }
            (void) n_out;
        }
    } catch (...) {
        llama_batch_free(batch);
        throw;
    }
    llama_batch_free(batch);
}

void Model::eval(const int32_t * tokens, int n, float * logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<float> out;
    out.reserve((size_t) n * n_vocab());
    decode_window(tokens, n, 0, out);
    std::copy(out.begin(), out.end(), logits);
}

PerplexityResult Model::perplexity(std::vector<int32_t> tokens, int n_ctx, int n_chunks) {
    if (n_ctx < 4 || n_ctx > n_ctx_) {
        throw std::invalid_argument("perplexity window " + std::to_string(n_ctx) + " must be in [4, " +
                                    std::to_string(n_ctx_) + "] (the model's context)");
    }
    if ((int64_t) tokens.size() < 2 * (int64_t) n_ctx) {
        throw std::invalid_argument("the text tokenizes to " + std::to_string(tokens.size()) +
                                    " tokens; perplexity with a window of " + std::to_string(n_ctx) +
                                    " needs at least " + std::to_string(2 * n_ctx));
    }
    std::lock_guard<std::mutex> lock(mutex_);   // one window sequence at a time on ctx_
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const int nv = n_vocab();
    const int n_chunk_max = (int) (tokens.size() / (size_t) n_ctx);
    const int n_chunk = n_chunks < 0 ? n_chunk_max : std::min(n_chunks, n_chunk_max);
    const int first = n_ctx / 2;

    double nll = 0.0, nll2 = 0.0;
    int64_t count = 0;
    std::vector<float> logits;
    for (int i = 0; i < n_chunk; ++i) {
        const int start = i * n_ctx;
        std::vector<int32_t> window(tokens.begin() + start, tokens.begin() + start + n_ctx);
        if (add_bos) {
            window[0] = llama_vocab_bos(vocab);
        }
        logits.clear();
        decode_window(window.data(), n_ctx, first, logits);
        // score tokens first+1 .. n_ctx-1 from the logits at first .. n_ctx-2 (as llama-perplexity)
        for (int j = 0; j < n_ctx - 1 - first; ++j) {
            const float * row = logits.data() + (size_t) j * nv;
            const int tok = tokens[start + first + j + 1];
            float max_logit = row[0];
            for (int v = 1; v < nv; ++v) {
                max_logit = std::max(max_logit, row[v]);
            }
            double sum_exp = 0.0;
            for (int v = 0; v < nv; ++v) {
                sum_exp += expf(row[v] - max_logit);
            }
            const double lp = row[tok] - max_logit - log(sum_exp);
            nll += -lp;
            nll2 += lp * lp;
        }
        count += n_ctx - 1 - first;
    }
    PerplexityResult r;
    r.count = count;
    r.n_chunks = n_chunk;
    r.n_ctx = n_ctx;
    r.nll = nll / (double) count;
    r.ppl = std::exp(r.nll);
    double var = nll2 / (double) count - r.nll * r.nll;
    r.nll_std = var > 0 && count > 1 ? std::sqrt(var / (double) (count - 1)) : 0.0;
    return r;
}

std::string system_info() {
    return llama_print_system_info();
}

std::vector<std::string> backend_names() {
    std::vector<std::string> out;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        out.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    return out;
}

}  // namespace lrq
