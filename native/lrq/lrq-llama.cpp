// lrq: LRQ files in libllama (compiled into the llama target by lrq's CMakeLists.txt; API and the
// virtual-layer design in native/include/lrq-llama.h).  The patch 0003 only calls in here.
#include "lrq-llama.h"

#include "lrq-format.h"
#include "lrq-ggml.h"
#include "lrq-keys.h"

#include "gguf.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-mmap.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <algorithm>
#include <cctype>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <utility>

// ---- architecture name and format version -----------------------------------------------------

// qwen2moe / qwen3moe: mixture of experts (docs/moe.md); their graph files get the two hooks in patches/0008
static const char * const LRQ_BASE_ARCHS[] = { "llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe" };

const char * lrq_base_arch_name(const char * name) {
    if (!name || std::strncmp(name, "lrq-", 4) != 0) {
        return nullptr;
    }
    for (const char * base : LRQ_BASE_ARCHS) {
        if (std::strcmp(name + 4, base) == 0) {
            return base;
        }
    }
    return nullptr;
}

// The file being loaded, for error messages.  Set by lrq_loader_init (the loader's constructor)
// and read by the later hooks of the same load, which llama.cpp runs on the same thread; being
// thread_local, two models loading in two threads never see each other's name.
static thread_local std::string lrq_cur_file;

// Every LRQ load error: "<file>: LRQ: <what>" (FORMAT.md section 10 names the rules).
template <typename... Args>
[[noreturn]] static void lrq_fail(const char * fmt, Args... args) {
    throw std::runtime_error(lrq_cur_file + ": LRQ: " + format(fmt, args...));
}

// "F16" for ggml's "f16" (the type names Python's messages use)
static std::string lrq_upper(const char * s) {
    std::string out = s ? s : "?";
    for (char & c : out) {
        c = (char) std::toupper((unsigned char) c);
    }
    return out;
}

// "[n_out, n_in]" in numpy order, as Python's messages write shapes
static std::string lrq_shape_desc(const ggml_tensor * t) {
    std::string out = "[";
    for (int d = ggml_n_dims(t) - 1; d >= 0; --d) {
        out += std::to_string(t->ne[d]) + (d ? ", " : "]");
    }
    return out;
}

static const char * lrq_gguf_type_desc(gguf_type t) {
    return t == GGUF_TYPE_COUNT ? "?" : gguf_type_name(t);
}

// "uint32", "array of uint32"
static std::string lrq_kv_type_desc(const gguf_context * meta, int64_t kid) {
    const gguf_type t = gguf_get_kv_type(meta, kid);
    if (t != GGUF_TYPE_ARRAY) {
        return lrq_gguf_type_desc(t);
    }
    return std::string("array of ") + lrq_gguf_type_desc(gguf_get_arr_type(meta, kid));
}

static const lrq_key_spec * lrq_key_spec_of(const char * key) {
    for (const lrq_key_spec & s : LRQ_KEY_SPECS) {
        if (std::strcmp(s.key, key) == 0) {
            return &s;
        }
    }
    return nullptr;
}

// Rule K1: a present key of LRQ_KEY_SPECS has its table type.
static void lrq_check_key_type(const gguf_context * meta, const lrq_key_spec & s, int64_t kid) {
    const bool is_arr = s.type == GGUF_TYPE_ARRAY;
    if (gguf_get_kv_type(meta, kid) != s.type || (is_arr && gguf_get_arr_type(meta, kid) != s.arr_type)) {
        lrq_fail("key %s must be %s%s, got %s", s.key, is_arr ? "an array of " : "",
                 lrq_gguf_type_desc(is_arr ? s.arr_type : s.type), lrq_kv_type_desc(meta, kid).c_str());
    }
}

static void lrq_check_key_types(const gguf_context * meta) {
    for (const lrq_key_spec & s : LRQ_KEY_SPECS) {
        const int64_t kid = gguf_find_key(meta, s.key);
        if (kid >= 0) {
            lrq_check_key_type(meta, s, kid);
        }
    }
}

// The one accessor for an lrq.* key: its id (-1 when absent and not required) after checking that
// the key is in LRQ_KEY_SPECS and has its type there, so that no gguf_get_* below can assert.
static int64_t lrq_key(const gguf_context * meta, const char * key, bool required) {
    const lrq_key_spec * spec = lrq_key_spec_of(key);
    if (!spec) {
        lrq_fail("internal: key %s is not in LRQ_KEY_SPECS", key);
    }
    const int64_t kid = gguf_find_key(meta, key);
    if (kid < 0) {
        if (required) {
            lrq_fail("required key %s is missing", key);
        }
        return -1;
    }
    lrq_check_key_type(meta, *spec, kid);
    return kid;
}

static uint32_t lrq_get_u32(const gguf_context * meta, int64_t kid) {
    GGML_ASSERT(gguf_get_kv_type(meta, kid) == GGUF_TYPE_UINT32);   // lrq_key checked it
    return gguf_get_val_u32(meta, kid);
}

static std::string lrq_get_str(const gguf_context * meta, int64_t kid) {
    GGML_ASSERT(gguf_get_kv_type(meta, kid) == GGUF_TYPE_STRING);
    return gguf_get_val_str(meta, kid);
}

// An array key of the schedule: uint32 or float32 elements (checked by lrq_key), n_expect entries
// unless n_expect == (size_t) -1.
template <typename T>
static std::vector<T> lrq_get_array(const gguf_context * meta, const char * key, size_t n_expect) {
    const int64_t kid = lrq_key(meta, key, true);
    const gguf_type want = std::is_same<T, float>::value ? GGUF_TYPE_FLOAT32 : GGUF_TYPE_UINT32;
    GGML_ASSERT(gguf_get_kv_type(meta, kid) == GGUF_TYPE_ARRAY && gguf_get_arr_type(meta, kid) == want);
    const size_t n = gguf_get_arr_n(meta, kid);
    if (n_expect != (size_t) -1 && n != n_expect) {
        lrq_fail("key %s has %zu entries, " LRQ_KEY_SCHEDULE_LAYER " has %zu (rule S1)", key, n, n_expect);
    }
    std::vector<T> out(n);
    if (n) {
        std::memcpy(out.data(), gguf_get_arr_data(meta, kid), n * sizeof(T));
    }
    return out;
}

// llama.cpp's vocabulary loader aborts (GGML_ASSERT in llama_vocab::impl::load) when
// tokenizer.ggml.tokens holds one string twice (found by bench/fuzz).  A server must survive any
// file, so the loader hook refuses such a file first, for every GGUF, LRQ or not.
static void lrq_check_tokens_unique(const gguf_context * meta) {
    const int64_t kid = gguf_find_key(meta, "tokenizer.ggml.tokens");
    if (kid < 0 || gguf_get_kv_type(meta, kid) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, kid) != GGUF_TYPE_STRING) {
        return;   // absent or mistyped: llama.cpp's own typed read refuses the latter
    }
    const size_t n = gguf_get_arr_n(meta, kid);
    std::unordered_map<std::string, size_t> seen;
    seen.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        auto [it, fresh] = seen.emplace(gguf_get_arr_str(meta, kid, i), i);
        if (!fresh) {
            throw std::runtime_error(format("%s: tokenizer.ggml.tokens: token %zu repeats token %zu ('%s'); a "
                                            "vocabulary has each string once", lrq_cur_file.c_str(), i, it->second,
                                            it->first.substr(0, 40).c_str()));
        }
    }
}

static void lrq_check_format(const gguf_context * meta, const std::string & arch_name) {
    lrq_check_tokens_unique(meta);
    const bool    lrq_name = arch_name.rfind("lrq-", 0) == 0;
    const int64_t kid      = gguf_find_key(meta, LRQ_KEY_FORMAT_VERSION);
    if (!lrq_name && kid < 0) {
        return;   // a plain GGUF
    }
    if (kid < 0) {
        lrq_fail("'%s' file has no key " LRQ_KEY_FORMAT_VERSION " (not an LRQ file of format version %d?)",
                 arch_name.c_str(), LRQ_FORMAT_VERSION);
    }
    lrq_check_key_types(meta);
    const uint32_t version = lrq_get_u32(meta, kid);
    if (version < (uint32_t) LRQ_FORMAT_VERSION_MIN || version > (uint32_t) LRQ_FORMAT_VERSION) {
        lrq_fail("LRQ format version %u is not supported: this build reads LRQ format versions %d..%d "
                 "(lrq-format.h)", version, LRQ_FORMAT_VERSION_MIN, LRQ_FORMAT_VERSION);
    }
    const char *  base = lrq_base_arch_name(arch_name.c_str());
    if (!base) {
        lrq_fail("architecture '%s' is not supported (lrq-llama, lrq-qwen2, lrq-qwen3, lrq-qwen2moe, lrq-qwen3moe)", arch_name.c_str());
    }
    const int64_t bid = lrq_key(meta, LRQ_KEY_BASE_ARCH, true);
    if (lrq_get_str(meta, bid) != base) {
        lrq_fail(LRQ_KEY_BASE_ARCH " must be the string '%s' for architecture '%s'", base, arch_name.c_str());
    }
}


// ---- load options: layer maps and adapters (FORMAT.md 7.1 and 11) -----------------------------

// The parameters a replica tensor may name (FORMAT.md section 5).
static const char * const LRQ_REPLICA_PARAMS[] = { "scale_mult", "grid_offset", "gain", "bias", "act", "clip",
                                                    "lr_u", "lr_v" };

// The load options of the model being loaded, from the loader's constructor to load_hparams (the
// same thread, like lrq_cur_file).  The adapter's metadata (its schedule) lives here until the
// next load on this thread; its tensor metadata context is owned by the loader.
struct lrq_load_state {
    std::string      layers;    // --lrq-layers MAP ("" none)
    std::string      adapter;   // --lrq-adapter FILE ("" none)
    gguf_context_ptr adapter_meta;
};
static thread_local lrq_load_state lrq_cur;

// A string load option (lrq-args.h), "" when absent.
static std::string lrq_load_option(const llama_model_loader & ml, const char * key) {
    const auto it = ml.kv_overrides.find(key);
    if (it == ml.kv_overrides.end()) {
        return "";
    }
    if (it->second.tag != LLAMA_KV_OVERRIDE_TYPE_STR) {
        lrq_fail("load option %s must be a string", key);
    }
    return std::string(it->second.val_str, strnlen(it->second.val_str, sizeof(it->second.val_str)));
}

std::vector<uint32_t> lrq_parse_layer_map(const std::string & map, uint32_t n_layer) {
    // The messages and the order of the checks are those of Python's lrq.plan.layer_map: one table
    // of maps (tests/test_layer_map.py) checks both parsers.
    auto bad = [&](const std::string & why) -> std::runtime_error {
        return std::runtime_error(format("layer map '%s' (a model with %u layers): %s", map.c_str(), n_layer, why.c_str()));
    };
    std::string text;
    for (char c : map) {
        if (c != ' ') {
            text += c;
        }
    }
    if (text.empty()) {
        throw bad("the map is empty; expected items N, A..B or NxK separated by commas");
    }
    // a run of decimal digits at str[pos..] (advancing pos), saturated far above any valid value
    // (sums saturate too) so that a huge K is counted, never expanded; false when there is no digit
    constexpr uint64_t LRQ_MAP_SAT = (uint64_t) 1 << 62;
    auto add_sat = [&](uint64_t x, uint64_t y) { return std::min(x + y, LRQ_MAP_SAT); };   // x, y <= 2^62
    auto number = [&](const std::string & str, size_t & pos, uint64_t & v) -> bool {
        const size_t start = pos;
        v = 0;
        while (pos < str.size() && str[pos] >= '0' && str[pos] <= '9') {
            v = v > LRQ_MAP_SAT / 10 ? LRQ_MAP_SAT : std::min<uint64_t>(v * 10 + (uint64_t) (str[pos] - '0'), LRQ_MAP_SAT);
            ++pos;
        }
        return pos > start;
    };
    enum kind_t { ONE, RANGE, REPEAT };
    struct item_t { kind_t kind; uint64_t a, b; };
    std::vector<item_t> items;
    for (size_t pos = 0;;) {
        const size_t comma = text.find(',', pos);
        const std::string it = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        size_t q = 0;
        uint64_t a = 0, b = 0;
        bool ok = number(it, q, a);
        kind_t kind = ONE;
        if (ok && it.compare(q, 2, "..") == 0) {
            q += 2;
            kind = RANGE;
            ok = number(it, q, b);
        } else if (ok && q < it.size() && it[q] == 'x') {
            q += 1;
            kind = REPEAT;
            ok = number(it, q, b);
        }
        if (!ok || q != it.size()) {
            throw bad("item '" + it + "' is not N, A..B or NxK (decimal integers)");
        }
        if (kind == RANGE && a > b) {
            throw bad(format("item '%s': the range runs backwards (%llu > %llu); write A..B with A <= B", it.c_str(),
                             (unsigned long long) a, (unsigned long long) b));
        }
        if (kind == REPEAT && b < 1) {
            throw bad("item '" + it + "': a layer must run at least once (K >= 1)");
        }
        items.push_back({ kind, a, kind == ONE ? 1 : b });
        if (comma == std::string::npos) {
            break;
        }
        pos = comma + 1;
    }
    for (const item_t & it : items) {
        const uint64_t top = it.kind == RANGE ? it.b : it.a;
        if (top >= n_layer) {   // the first layer of the item that does not exist
            throw bad(format("layer %llu does not exist (valid: 0..%u)", (unsigned long long) std::max<uint64_t>(it.a, n_layer),
                             n_layer - 1));
        }
    }
    const bool repeat_list = std::all_of(items.begin(), items.end(), [](const item_t & it) { return it.kind == REPEAT; });
    std::vector<uint64_t> times(n_layer, 1);
    uint64_t n_exec = 0;
    if (repeat_list) {
        std::vector<bool> named(n_layer, false);
        for (const item_t & it : items) {
            if (named[it.a]) {
                throw bad(format("layer %llu is named twice in a repeat list", (unsigned long long) it.a));
            }
            named[it.a]  = true;
            times[it.a]  = it.b;
        }
        for (uint32_t L = 0; L < n_layer; ++L) {
            n_exec = add_sat(n_exec, times[L]);
        }
    } else {
        for (const item_t & it : items) {
            n_exec = add_sat(n_exec, it.kind == RANGE ? it.b - it.a + 1 : it.b);
        }
    }
    if (n_exec > (uint64_t) LRQ_MAX_EXECUTIONS) {   // counted before expanding
        throw bad(format("the map runs %llu executions; at most %d (llama.cpp's layer limit) are supported",
                         (unsigned long long) n_exec, LRQ_MAX_EXECUTIONS));
    }
    std::vector<uint32_t> out;
    if (repeat_list) {
        for (uint32_t L = 0; L < n_layer; ++L) {
            out.insert(out.end(), (size_t) times[L], L);
        }
    } else {
        for (const item_t & it : items) {
            if (it.kind == RANGE) {
                for (uint64_t L = it.a; L <= it.b; ++L) {
                    out.push_back((uint32_t) L);
                }
            } else {
                out.insert(out.end(), (size_t) it.b, (uint32_t) it.a);
            }
        }
    }
    std::vector<bool> runs(n_layer, false);
    for (uint32_t L : out) {
        runs[L] = true;
    }
    std::string missing;
    for (uint32_t L = 0; L < n_layer; ++L) {
        if (!runs[L]) {
            missing += (missing.empty() ? "" : ", ") + std::to_string(L);
        }
    }
    if (!missing.empty()) {
        throw bad(format("layer(s) %s never run; every layer 0..%u must run at least once", missing.c_str(), n_layer - 1));
    }
    return out;
}

// CRC-32 of zlib (reflected polynomial 0xEDB88320), continued from crc (0 to start).
static uint32_t lrq_crc32(uint32_t crc, const uint8_t * p, size_t n) {
    static const std::array<uint32_t, 256> table = [] {
        std::array<uint32_t, 256> t{};
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) {
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            }
            t[i] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) {
        crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    }
    return ~crc;
}

// The content hash of FORMAT.md section 11: CRC-32 of the whole data up to 64 KiB, else of 16
// chunks of 4 KiB evenly spaced (first and last included), read from the base file.
static uint32_t lrq_tensor_crc32(llama_model_loader & ml, const llama_model_loader::llama_tensor_weight & w) {
    const size_t nbytes = ggml_nbytes(w.tensor);
    llama_file & f = *ml.files.at(w.idx);
    std::vector<uint8_t> buf;
    uint32_t crc = 0;
    if (nbytes <= LRQ_ADAPTER_HASH_WHOLE_MAX) {
        buf.resize(nbytes);
        f.seek(w.offs, SEEK_SET);
        f.read_raw(buf.data(), nbytes);
        return lrq_crc32(0, buf.data(), nbytes);
    }
    buf.resize(LRQ_ADAPTER_HASH_CHUNK);
    for (int k = 0; k < LRQ_ADAPTER_HASH_CHUNKS; ++k) {
        const size_t off = (size_t) ((unsigned __int128) k * (nbytes - LRQ_ADAPTER_HASH_CHUNK) / (LRQ_ADAPTER_HASH_CHUNKS - 1));
        f.seek(w.offs + off, SEEK_SET);
        f.read_raw(buf.data(), buf.size());
        crc = lrq_crc32(crc, buf.data(), buf.size());
    }
    return crc;
}

// The replicable linears by their GGUF name ("attn_q", ...), for the adapter's tensor names.
static bool lrq_is_slot_name(const char * slot) {
    static const char * const names[] = { "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down" };
    for (const char * n : names) {
        if (std::strcmp(n, slot) == 0) {
            return true;
        }
    }
    return false;
}

// Rules AD1-AD4 (FORMAT.md section 11), then the adapter's file and tensors join the loader's
// index (a further "split" whose tensors llama.cpp places, maps and loads like the base's).
static void lrq_attach_adapter(llama_model_loader & ml, const std::string & path) {
    ggml_context * actx = nullptr;
    gguf_init_params ip = { /*.no_alloc =*/ true, /*.ctx =*/ &actx };
    lrq_cur.adapter_meta.reset(gguf_init_from_file(path.c_str(), ip));
    if (!lrq_cur.adapter_meta) {
        lrq_fail("the adapter is not a readable GGUF file (missing, truncated or corrupt; rule AD1)");
    }
    ml.contexts.emplace_back(actx);   // owned by the loader from here on, as a split's would be
    const gguf_context * am = lrq_cur.adapter_meta.get();

    // AD1: what the file is
    const int64_t karch = gguf_find_key(am, "general.architecture");
    if (karch < 0 || gguf_get_kv_type(am, karch) != GGUF_TYPE_STRING ||
        std::strcmp(gguf_get_val_str(am, karch), LRQ_ADAPTER_ARCH) != 0) {
        lrq_fail("not an lrq adapter: general.architecture must be '" LRQ_ADAPTER_ARCH "' (rule AD1)");
    }
    lrq_check_key_types(am);
    const uint32_t av = lrq_get_u32(am, lrq_key(am, LRQ_KEY_ADAPTER_VERSION, true));
    if (av < (uint32_t) LRQ_ADAPTER_VERSION_MIN || av > (uint32_t) LRQ_ADAPTER_VERSION) {
        lrq_fail("adapter version %u is not supported: this build reads adapter versions %d..%d (rule AD1)", av,
                 LRQ_ADAPTER_VERSION_MIN, LRQ_ADAPTER_VERSION);
    }
    const uint32_t fv = lrq_get_u32(am, lrq_key(am, LRQ_KEY_FORMAT_VERSION, true));
    if (fv < (uint32_t) LRQ_FORMAT_VERSION_MIN || fv > (uint32_t) LRQ_FORMAT_VERSION) {
        lrq_fail("the adapter's LRQ format version %u is not supported: this build reads %d..%d (rule V1)", fv,
                 LRQ_FORMAT_VERSION_MIN, LRQ_FORMAT_VERSION);
    }

    // AD2: the base it was made for
    const std::string want_arch = lrq_get_str(am, lrq_key(am, LRQ_KEY_ADAPTER_ARCH, true));
    if (want_arch != ml.arch_name) {
        lrq_fail(LRQ_KEY_ADAPTER_ARCH " = '%s' but the base is '%s' (rule AD2)", want_arch.c_str(), ml.arch_name.c_str());
    }
    uint32_t n_layer = 0;
    ml.get_key(LLM_KV_BLOCK_COUNT, n_layer, false);
    const uint32_t want_layers = lrq_get_u32(am, lrq_key(am, LRQ_KEY_ADAPTER_NLAYER, true));
    if (want_layers != n_layer) {
        lrq_fail(LRQ_KEY_ADAPTER_NLAYER " = %u but the base has %u layers (rule AD2)", want_layers, n_layer);
    }
    const int64_t kt = lrq_key(am, LRQ_KEY_ADAPTER_TENSORS, true);
    const size_t  n  = gguf_get_arr_n(am, kt);
    const std::vector<uint32_t> types  = lrq_get_array<uint32_t>(am, LRQ_KEY_ADAPTER_TYPES, (size_t) -1);
    const std::vector<uint32_t> shapes = lrq_get_array<uint32_t>(am, LRQ_KEY_ADAPTER_SHAPES, (size_t) -1);
    const std::vector<uint32_t> crcs   = lrq_get_array<uint32_t>(am, LRQ_KEY_ADAPTER_CRC32, (size_t) -1);
    if (types.size() != n || crcs.size() != n || shapes.size() != 2 * n) {
        lrq_fail("%s lists %zu tensors but %s has %zu entries, %s %zu and %s %zu (one each, shapes two; rule AD2)",
                 LRQ_KEY_ADAPTER_TENSORS, n, LRQ_KEY_ADAPTER_TYPES, types.size(), LRQ_KEY_ADAPTER_SHAPES,
                 shapes.size(), LRQ_KEY_ADAPTER_CRC32, crcs.size());
    }
    if (ggml_get_first_tensor(actx) == nullptr) {
        lrq_fail("the adapter holds no replica tensor; an adapter modifies at least one weight (a schedule "
                 "alone is a layer map: --lrq-layers) (rule AD1)");
    }
    std::map<std::string, bool> listed;   // name -> has a replica tensor in the adapter
    for (size_t i = 0; i < n; ++i) {
        const std::string name = gguf_get_arr_str(am, kt, i);
        if (i > 0 && !(gguf_get_arr_str(am, kt, i - 1) < name)) {
            lrq_fail("key %s must be sorted and name each weight once (rule AD2)", LRQ_KEY_ADAPTER_TENSORS);
        }
        listed.emplace(name, false);
        // AD3: the base has it, with that type, shape and content
        const auto it = ml.weights_map.find(name);
        if (it == ml.weights_map.end()) {
            lrq_fail("the base has no tensor %s (rule AD3)", name.c_str());
        }
        const ggml_tensor * t = it->second.tensor;
        if ((uint32_t) t->type != types[i]) {
            lrq_fail("tensor %s of the base has type %s, the adapter was made for %s (another quantization; rule AD3)",
                     name.c_str(), lrq_upper(ggml_type_name(t->type)).c_str(),
                     types[i] < (uint32_t) GGML_TYPE_COUNT ? lrq_upper(ggml_type_name((ggml_type) types[i])).c_str()
                                                           : format("type id %u", types[i]).c_str());
        }
        if (ggml_n_dims(t) != 2 || (uint64_t) t->ne[0] != shapes[2 * i] || (uint64_t) t->ne[1] != shapes[2 * i + 1]) {
            lrq_fail("tensor %s of the base has shape (ne0, ne1) = (%lld, %lld), the adapter was made for (%u, %u) "
                     "(rule AD3)", name.c_str(), (long long) t->ne[0], (long long) t->ne[1], shapes[2 * i],
                     shapes[2 * i + 1]);
        }
        const uint32_t crc = lrq_tensor_crc32(ml, it->second);
        if (crc != crcs[i]) {
            lrq_fail("tensor %s of the base has CRC-32 %08x, the adapter was made for %08x (same type and shape, "
                     "other data: another quantization or model; rule AD3)", name.c_str(), crc, crcs[i]);
        }
    }

    // AD1, AD2, AD4: only replica tensors, each of a listed weight, none named like a base tensor
    for (ggml_tensor * cur = ggml_get_first_tensor(actx); cur; cur = ggml_get_next_tensor(actx, cur)) {
        const std::string name = ggml_get_name(cur);
        unsigned L = 0, r = 0;
        char slot[64] = {0}, param[64] = {0};
        const bool parsed = std::sscanf(name.c_str(), "blk.%u.%63[^.].lrq_r%u.%63s", &L, slot, &r, param) == 4 &&
                            format("blk.%u.%s.lrq_r%u.%s", L, slot, r, param) == name && lrq_is_slot_name(slot) &&
                            std::find_if(std::begin(LRQ_REPLICA_PARAMS), std::end(LRQ_REPLICA_PARAMS),
                                         [&](const char * p) { return std::strcmp(p, param) == 0; }) !=
                                std::end(LRQ_REPLICA_PARAMS);
        if (!parsed) {
            lrq_fail("tensor %s is not a replica tensor blk.N.<linear>.lrq_r<r>.<param>; an adapter holds only those "
                     "(rule AD1)", name.c_str());
        }
        if (ml.weights_map.count(name)) {
            lrq_fail("tensor %s of the adapter is also a tensor of the base (rule AD4)", name.c_str());
        }
        const std::string weight = format("blk.%u.%s.weight", L, slot);
        const auto it = listed.find(weight);
        if (it == listed.end()) {
            lrq_fail("tensor %s modifies %s, which %s does not list (rule AD2)", name.c_str(), weight.c_str(),
                     LRQ_KEY_ADAPTER_TENSORS);
        }
        it->second = true;
    }
    for (const auto & [name, used] : listed) {
        if (!used) {
            lrq_fail("%s lists %s, which no replica tensor of the adapter modifies (rule AD2)", LRQ_KEY_ADAPTER_TENSORS,
                     name.c_str());
        }
    }

    // join the loader's index
    ml.files.emplace_back(new llama_file(path.c_str(), "rb", ml.use_direct_io));
    const uint16_t idx = (uint16_t) (ml.files.size() - 1);
    for (ggml_tensor * cur = ggml_get_first_tensor(actx); cur; cur = ggml_get_next_tensor(actx, cur)) {
        ml.weights_map.emplace(cur->name, llama_model_loader::llama_tensor_weight(ml.files.back().get(), idx, am, cur));
        ml.n_elements += ggml_nelements(cur);
        ml.n_bytes    += ggml_nbytes(cur);
    }
}

void lrq_loader_init(llama_model_loader & ml, const std::string & fname) {
    lrq_cur_file = fname.empty() ? std::string("(FILE*)") : fname;
    lrq_cur.layers.clear();
    lrq_cur.adapter.clear();
    lrq_cur.adapter_meta.reset();
    if (!ml.metadata) {
        return;   // a model built without a file (no metadata to check, no options apply)
    }
    lrq_check_format(ml.metadata, ml.arch_name);
    lrq_cur.layers  = lrq_load_option(ml, LRQ_OPT_LAYERS);
    lrq_cur.adapter = lrq_load_option(ml, LRQ_OPT_ADAPTER);
    if (!lrq_cur.layers.empty() && !lrq_cur.adapter.empty()) {
        lrq_fail("a layer map (--lrq-layers '%s') and an adapter (--lrq-adapter %s) cannot be combined: the adapter's "
                 "parameters were fitted for its own schedule", lrq_cur.layers.c_str(), lrq_cur.adapter.c_str());
    }
    if (!lrq_cur.adapter.empty()) {
        lrq_cur_file = lrq_cur_file + " + adapter " + lrq_cur.adapter;
        try {
            lrq_attach_adapter(ml, lrq_cur.adapter);
        } catch (const std::runtime_error & e) {
            // llama.cpp's own throws (tensor data outside the file) do not name the files
            const std::string what = e.what();
            if (what.rfind(lrq_cur_file + ":", 0) == 0) {
                throw;
            }
            throw std::runtime_error(lrq_cur_file + ": " + what);
        }
    }
}

// ---- hparams: keys and schedule -----------------------------------------------------------------

// Rules X1-X3 (docs/moe.md): the lrq.moe.* arrays of expert-level replication, checked in the
// order of Python's lrq.plan.expert_entries_from_gguf_arrays and check_expert_entries (one table
// of bad files checks both).  Whether each layer is a MoE layer is checked with the tensors.
static void lrq_read_moe_entries(lrq_model & l, const gguf_context * meta, uint32_t n_expert) {
    static const char * const keys[] = { LRQ_KEY_MOE_LAYER, LRQ_KEY_MOE_REPLICA, LRQ_KEY_MOE_EXPERTS,
                                         LRQ_KEY_MOE_COUNT, LRQ_KEY_MOE_MODE, LRQ_KEY_MOE_WEIGHT };
    const char * present = nullptr;
    for (const char * k : keys) {
        if (!present && lrq_key(meta, k, false) >= 0) {
            present = k;
        }
    }
    if (!present) {
        return;
    }
    if (l.version < LRQ_MOE_EXPERTS_VERSION) {
        lrq_fail("key %s: expert replication needs format version %d, the file says %u (rule X1)", present,
                 LRQ_MOE_EXPERTS_VERSION, l.version);
    }
    for (const char * k : keys) {
        if (lrq_key(meta, k, false) < 0) {
            lrq_fail("key %s is missing; expert replication needs all of " LRQ_KEY_MOE_LAYER ", " LRQ_KEY_MOE_REPLICA
                     ", " LRQ_KEY_MOE_EXPERTS ", " LRQ_KEY_MOE_COUNT ", " LRQ_KEY_MOE_MODE ", " LRQ_KEY_MOE_WEIGHT
                     " (rule X1)", k);
        }
    }
    const auto layer   = lrq_get_array<uint32_t>(meta, LRQ_KEY_MOE_LAYER, (size_t) -1);
    const auto replica = lrq_get_array<uint32_t>(meta, LRQ_KEY_MOE_REPLICA, (size_t) -1);
    const auto experts = lrq_get_array<uint32_t>(meta, LRQ_KEY_MOE_EXPERTS, (size_t) -1);
    const auto count   = lrq_get_array<uint32_t>(meta, LRQ_KEY_MOE_COUNT, (size_t) -1);
    const auto mode    = lrq_get_array<uint32_t>(meta, LRQ_KEY_MOE_MODE, (size_t) -1);
    const auto weight  = lrq_get_array<float>(meta, LRQ_KEY_MOE_WEIGHT, (size_t) -1);
    const size_t m = layer.size();
    const std::pair<const char *, size_t> lens[] = { { LRQ_KEY_MOE_REPLICA, replica.size() }, { LRQ_KEY_MOE_COUNT, count.size() },
                                                     { LRQ_KEY_MOE_MODE, mode.size() }, { LRQ_KEY_MOE_WEIGHT, weight.size() } };
    for (const auto & [k, n] : lens) {
        if (n != m) {
            lrq_fail("key %s has %zu entries, " LRQ_KEY_MOE_LAYER " has %zu (rule X1)", k, n, m);
        }
    }
    uint64_t total = 0;
    for (uint32_t c : count) {
        total += c;
    }
    if (total != experts.size()) {
        lrq_fail("key " LRQ_KEY_MOE_EXPERTS " has %zu entries, the sum of " LRQ_KEY_MOE_COUNT " is %llu (rule X1)",
                 experts.size(), (unsigned long long) total);
    }
    for (size_t i = 0; i < m; ++i) {
        if (mode[i] != LRQ_MOE_PARALLEL && mode[i] != LRQ_MOE_SERIAL) {
            lrq_fail("key " LRQ_KEY_MOE_MODE ": entry %zu has mode %u; 0 = parallel, 1 = serial (rule X1)", i, mode[i]);
        }
    }
    if (m > 0 && n_expert < 1) {
        lrq_fail("key " LRQ_KEY_MOE_LAYER ": expert replication needs a mixture-of-experts model; this one has no "
                 "experts (rule X1)");
    }
    std::set<std::pair<uint32_t, uint32_t>> seen;
    std::map<uint32_t, double> par_sum;
    size_t at = 0;
    for (size_t i = 0; i < m; ++i) {
        lrq_moe_entry x;
        x.layer   = layer[i];
        x.replica = replica[i];
        x.mode    = mode[i];
        x.weight  = weight[i];
        x.experts.assign(experts.begin() + at, experts.begin() + at + count[i]);
        at += count[i];
        if (x.layer >= l.n_base) {
            lrq_fail("key " LRQ_KEY_MOE_LAYER ": entry %zu names layer %u of a model with %u layers (rule X1)", i,
                     x.layer, l.n_base);
        }
        if (x.replica < 1 || x.replica >= LRQ_MAX_EXECUTIONS) {
            lrq_fail("key " LRQ_KEY_MOE_REPLICA ": entry %zu has replica %u; expert replicas are 1..%d (rule X1)", i,
                     x.replica, LRQ_MAX_EXECUTIONS - 1);
        }
        if (!seen.insert({ x.layer, x.replica }).second) {
            lrq_fail("key " LRQ_KEY_MOE_REPLICA ": entry %zu repeats replica %u of layer %u (rule X1)", i, x.replica,
                     x.layer);
        }
        if (x.experts.empty()) {
            lrq_fail("key " LRQ_KEY_MOE_COUNT ": entry %zu lists no expert (rule X2)", i);
        }
        for (size_t j = 1; j < x.experts.size(); ++j) {
            if (!(x.experts[j - 1] < x.experts[j])) {
                lrq_fail("key " LRQ_KEY_MOE_EXPERTS ": entry %zu lists experts %u, %u; each entry's list is sorted and "
                         "names an expert once (rule X2)", i, x.experts[j - 1], x.experts[j]);
            }
        }
        if (x.experts.back() >= n_expert) {
            lrq_fail("key " LRQ_KEY_MOE_EXPERTS ": entry %zu names expert %u; the model has %u experts per layer "
                     "(0..%u; rule X2)", i, x.experts.back(), n_expert, n_expert - 1);
        }
        if (!std::isfinite(x.weight)) {
            lrq_fail("key " LRQ_KEY_MOE_WEIGHT ": entry %zu has weight %g (rule X3)", i, x.weight);
        }
        if (x.mode == LRQ_MOE_PARALLEL) {
            if (x.weight < 0.0f) {
                lrq_fail("key " LRQ_KEY_MOE_WEIGHT ": parallel entry %zu has weight %g < 0 (rule X3)", i, x.weight);
            }
            double & sum = par_sum[x.layer];
            sum += (double) x.weight;
            if (sum > 1.0 + LRQ_MOE_WEIGHT_SUM_TOL) {
                lrq_fail("key " LRQ_KEY_MOE_WEIGHT ": the parallel entries of layer %u weigh %.7g together, more than "
                         "1 (rule X3)", x.layer, sum);
            }
        }
        x.coef.assign(n_expert, 0.0f);
        x.map.assign(n_expert, -1.0f);
        for (uint32_t e : x.experts) {
            x.coef[e] = x.weight;
            x.map[e]  = (float) e;
        }
        l.moe.push_back(std::move(x));
    }
}

std::shared_ptr<lrq_model> lrq_load_hparams(llama_model_base & m, llama_model_loader & ml,
                                           const llama_model_params & params) {
    const char *         base    = lrq_base_arch_name(ml.arch_name.c_str());
    const gguf_context * adapter = lrq_cur.adapter_meta.get();
    if (!base && lrq_cur.layers.empty() && !adapter) {
        return nullptr;   // a plain GGUF (lrq_check_format has refused "lrq-<other>")
    }
    const gguf_context * meta = ml.metadata;
    auto l = std::make_shared<lrq_model>();
    l->arch_name = ml.arch_name;
    l->layer_map = lrq_cur.layers;
    l->adapter   = lrq_cur.adapter;

    const bool moe_arch = m.arch == LLM_ARCH_QWEN2MOE || m.arch == LLM_ARCH_QWEN3MOE;
    if (m.arch != LLM_ARCH_LLAMA && m.arch != LLM_ARCH_QWEN2 && m.arch != LLM_ARCH_QWEN3 && !moe_arch) {
        lrq_fail("architecture %s is not supported by lrq (llama, qwen2, qwen3, qwen2moe, qwen3moe)", ml.arch_name.c_str());
    }
    // MoE: every layer of qwen2moe / qwen3moe / llama with experts (Mixtral) is a router + stacked
    // experts that the aliased virtual layers share (ggml_mul_mat_id on the base tensors)
    const bool moe_ok = moe_arch || m.arch == LLM_ARCH_LLAMA;
    if (m.hparams.n_layer_nextn != 0 || (m.hparams.n_expert != 0 && !moe_ok) || m.hparams.n_layer_kv_from_start >= 0) {
        lrq_fail("MoE (other than qwen2moe, qwen3moe, llama), next-n prediction and shared-KV layers are not supported");
    }
    if (params.split_mode == LLAMA_SPLIT_MODE_TENSOR) {
        lrq_fail("tensor split mode is not supported (the LRQ op runs on the CPU)");
    }

    // the format version whose rules apply: the file's (range: lrq_check_format) or the adapter's
    // (range: lrq_attach_adapter), whichever is newer; a stock GGUF under a layer map is read as
    // the current version (stock-typed weights, which need >= 2)
    l->version = base ? lrq_get_u32(meta, lrq_key(meta, LRQ_KEY_FORMAT_VERSION, true)) : 0;
    if (adapter) {
        l->version = std::max(l->version, lrq_get_u32(adapter, lrq_key(adapter, LRQ_KEY_FORMAT_VERSION, true)));
    }
    if (l->version == 0) {
        l->version = LRQ_FORMAT_VERSION;
    }

    // widest code type of the file (0: no LRQ-typed tensor, a stock-typed base; format v2)
    for (const auto & [name, w] : ml.weights_map) {
        l->max_bits = std::max(l->max_bits, lrq_type_bits(w.tensor->type));
    }
    if (l->max_bits == 0 && l->version < 2) {
        lrq_fail("a format version %u file must hold LRQ-typed codes (stock-typed bases need version 2)",
                 l->version);
    }

    // mode and group size describe the LRQ-typed codes: required exactly when the file has some
    const int64_t kmode = lrq_key(meta, LRQ_KEY_QUANT_MODE, l->max_bits > 0);
    const int64_t kg    = lrq_key(meta, LRQ_KEY_GROUP_SIZE, l->max_bits > 0);
    if (kmode >= 0) {
        const std::string mode = lrq_get_str(meta, kmode);
        if (mode == "asym") {
            l->mode = LRQ_MODE_ASYM;
        } else if (mode == "sym") {
            l->mode = LRQ_MODE_SYM;
        } else if (mode == "ternary") {
            l->mode = LRQ_MODE_TERNARY;
        } else {
            lrq_fail(LRQ_KEY_QUANT_MODE " = '%s' is not asym, sym or ternary", mode.c_str());
        }
    }
    if (kg >= 0) {
        const uint32_t g = lrq_get_u32(meta, kg);
        if (g != 32 && g != 64 && g != 128 && g != 256) {
            lrq_fail(LRQ_KEY_GROUP_SIZE " = %u is not 32, 64, 128 or 256", g);
        }
        l->group_size = (int) g;
    }

    // the schedule (FORMAT.md sections 7 and 10): a layer map's (7.1), else the adapter's, else
    // the file's; the map's run each layer's replicas in order of appearance, serially
    const uint32_t n_base = m.hparams.n_layer_all;
    l->n_base = n_base;
    std::vector<uint32_t> layer, replica, group;
    std::vector<float>    weight;
    if (!lrq_cur.layers.empty()) {
        try {
            layer = lrq_parse_layer_map(lrq_cur.layers, n_base);
        } catch (const std::runtime_error & e) {
            lrq_fail("%s", e.what());
        }
        std::vector<uint32_t> seen(n_base, 0);
        for (size_t e = 0; e < layer.size(); ++e) {
            replica.push_back(seen[layer[e]]++);
            group.push_back((uint32_t) e);
            weight.push_back(1.0f);
        }
    } else {
        const gguf_context * smeta = adapter ? adapter : meta;
        layer   = lrq_get_array<uint32_t>(smeta, LRQ_KEY_SCHEDULE_LAYER, (size_t) -1);
        replica = lrq_get_array<uint32_t>(smeta, LRQ_KEY_SCHEDULE_REPLICA, layer.size());
        group   = lrq_get_array<uint32_t>(smeta, LRQ_KEY_SCHEDULE_GROUP, layer.size());
        weight  = lrq_get_array<float>(smeta, LRQ_KEY_SCHEDULE_WEIGHT, layer.size());
    }
    const size_t n_exec = layer.size();
    if (n_exec < n_base || n_exec > LRQ_MAX_EXECUTIONS) {
        lrq_fail("the schedule has %zu executions; it needs %u..%d for %u base layers (rule S1)", n_exec, n_base,
                 LRQ_MAX_EXECUTIONS, n_base);
    }
    l->exec.resize(n_exec);
    for (size_t e = 0; e < n_exec; ++e) {
        if (layer[e] >= n_base) {
            lrq_fail("execution %zu runs layer %u of a %u-layer model (rule S2)", e, layer[e], n_base);
        }
        if (replica[e] >= LRQ_MAX_EXECUTIONS) {
            lrq_fail("execution %zu runs replica %u; replica indices are below %d (rule S2)", e, replica[e],
                     LRQ_MAX_EXECUTIONS);
        }
        if (e > 0 && group[e] < group[e - 1]) {
            lrq_fail("schedule group ids must be non-decreasing (execution %zu, rule S3)", e);
        }
        if (!std::isfinite(weight[e])) {
            lrq_fail("schedule weight of execution %zu is not finite (rule S5)", e);
        }
        lrq_exec & x = l->exec[e];
        x.layer   = layer[e];
        x.replica = replica[e];
        x.group   = group[e];
        x.weight  = weight[e];
    }
    {
        std::vector<bool> runs(n_base, false);
        for (uint32_t L : layer) {
            runs[L] = true;
        }
        std::string missing;
        for (uint32_t L = 0; L < n_base; ++L) {
            if (!runs[L]) {
                missing += (missing.empty() ? "" : ", ") + std::to_string(L);
            }
        }
        if (!missing.empty()) {
            lrq_fail("the schedule: layer(s) %s never run; every layer 0..%u must run at least once (rule S4)",
                     missing.c_str(), n_base - 1);
        }
    }
    // parallel groups: consecutive executions with the same id, one layer, distinct replicas
    for (size_t e0 = 0; e0 < n_exec;) {
        size_t e1 = e0 + 1;
        while (e1 < n_exec && group[e1] == group[e0]) {
            ++e1;
        }
        std::set<uint32_t> seen;
        for (size_t e = e0; e < e1; ++e) {
            if (l->exec[e].layer != l->exec[e0].layer) {
                lrq_fail("parallel group %u spans layers %u and %u (rule S3)", group[e0], l->exec[e0].layer,
                         l->exec[e].layer);
            }
            if (!seen.insert(l->exec[e].replica).second) {
                lrq_fail("parallel group %u runs replica %u twice (rule S3)", group[e0], l->exec[e].replica);
            }
            l->exec[e].n_group = (uint32_t) (e1 - e0);
            l->exec[e].first   = e == e0;
            l->exec[e].last    = e == e1 - 1;
        }
        e0 = e1;
    }
    // rule S6: a schedule is allowed to be long, but its KV cache (one per execution) is stated
    if (n_exec > (size_t) LRQ_EXEC_WARN_FACTOR * n_base) {
        const llama_hparams & hp = m.hparams;
        double per_tok = 0.0, per_tok_base = 0.0;   // bytes of an F16 K and V per token
        for (size_t e = 0; e < n_exec; ++e) {
            per_tok += 2.0 * (hp.n_embd_k_gqa(layer[e]) + hp.n_embd_v_gqa(layer[e]));
        }
        for (uint32_t L = 0; L < n_base; ++L) {
            per_tok_base += 2.0 * (hp.n_embd_k_gqa(L) + hp.n_embd_v_gqa(L));
        }
        LLAMA_LOG_WARN("%s: LRQ: the schedule runs %zu executions of %u base layers (%.1fx): each has its own KV "
                       "cache, %.1f MiB per 1024 tokens of context at F16 (the base model: %.1f MiB), %.0f MiB at "
                       "the training context of %u tokens\n",
                       lrq_cur_file.c_str(), n_exec, n_base, (double) n_exec / n_base, per_tok * 1024 / (1 << 20),
                       per_tok_base * 1024 / (1 << 20), per_tok * hp.n_ctx_train / (1 << 20), hp.n_ctx_train);
    }
    if (base) {
        lrq_read_moe_entries(*l, meta, m.hparams.n_expert);
    }
    return l;
}

static std::string lrq_codes_desc(const lrq_model & l) {
    if (l.max_bits == 0) {
        return "stock-typed codes";
    }
    const char * mode = l.mode == LRQ_MODE_ASYM ? "asym" : l.mode == LRQ_MODE_SYM ? "sym" : "ternary";
    return format("LRQ%d g%d %s", l.max_bits, l.group_size, mode);
}

// ---- tensors --------------------------------------------------------------------------------------

static const llm_tensor LRQ_SLOT_TENSOR[LRQ_SLOT_COUNT] = {
    LLM_TENSOR_ATTN_Q, LLM_TENSOR_ATTN_K, LLM_TENSOR_ATTN_V, LLM_TENSOR_ATTN_OUT,
    LLM_TENSOR_FFN_GATE, LLM_TENSOR_FFN_UP, LLM_TENSOR_FFN_DOWN,
};

static ggml_tensor ** lrq_slot_ptr(llama_layer & layer, int s) {
    switch (s) {
        case LRQ_SLOT_Q:    return &layer.wq;
        case LRQ_SLOT_K:    return &layer.wk;
        case LRQ_SLOT_V:    return &layer.wv;
        case LRQ_SLOT_O:    return &layer.wo;
        case LRQ_SLOT_GATE: return &layer.ffn_gate;
        case LRQ_SLOT_UP:   return &layer.ffn_up;
        default:            return &layer.ffn_down;
    }
}


static bool lrq_is_lowrank(const char * p) {
    return std::strcmp(p, "lr_u") == 0 || std::strcmp(p, "lr_v") == 0;
}

// Which parameters a replica of each kind of weight may have (FORMAT.md sections 5 and 6):
// LRQ-typed codes take all but clip; a stock-typed weight (format v2) takes the parameters that
// live outside the matmul, so they run as plain ggml ops on every backend.  Both take the
// low-rank factors (format v3), which are two more plain mul_mats.
static bool lrq_param_allowed(const char * p, bool stock) {
    if (std::strcmp(p, "gain") == 0 || std::strcmp(p, "bias") == 0 || lrq_is_lowrank(p)) {
        return true;
    }
    return stock ? std::strcmp(p, "clip") == 0 : std::strcmp(p, "clip") != 0;
}

// Reads the first nbytes of a tensor's data from the file at load time (parameters the graph needs
// as constants, and values that must be validated before any compute).  False when the model
// was not loaded from a file the loader can read again (llama_model_load_from_file_ptr).
static bool lrq_read_raw(llama_model_loader & ml, const std::string & name, void * out, size_t nbytes) {
    const auto & wt = ml.require_weight(name.c_str());
    if (wt.idx >= ml.files.size()) {
        return false;
    }
    ml.files.at(wt.idx)->seek(wt.offs, SEEK_SET);
    ml.files.at(wt.idx)->read_raw(out, nbytes);
    return true;
}

static bool lrq_read_f32(llama_model_loader & ml, const std::string & name, float * out, size_t n) {
    return lrq_read_raw(ml, name, out, n * sizeof(float));
}

// Rule T5: the group parameters and the replica parameters (F16, F32 or, for low-rank factors,
// Q8_0) hold finite values only.  A NaN or infinity there would not crash anything, but it
// silently turns every logit into NaN.
static void lrq_check_finite(llama_model_loader & ml, const ggml_tensor * meta, const std::string & name) {
    const size_t n = (size_t) ggml_nelements(meta);
    if (meta->type == GGML_TYPE_Q8_0) {
        // blocks of { F16 d; int8 qs[32] }: a value is finite exactly when its block's d is
        const size_t bs = ggml_type_size(GGML_TYPE_Q8_0), nb = n / (size_t) ggml_blck_size(GGML_TYPE_Q8_0);
        std::vector<uint8_t> raw(nb * bs);
        if (!lrq_read_raw(ml, name, raw.data(), raw.size())) {
            return;
        }
        for (size_t i = 0; i < nb; ++i) {
            uint16_t d;
            std::memcpy(&d, raw.data() + i * bs, sizeof d);
            if ((d & 0x7c00) == 0x7c00) {
                lrq_fail("tensor %s: element %zu is not finite (rule T5)", name.c_str(),
                         i * (size_t) ggml_blck_size(GGML_TYPE_Q8_0));
            }
        }
    } else if (meta->type == GGML_TYPE_F16) {
        std::vector<uint16_t> h(n);
        if (!lrq_read_raw(ml, name, h.data(), n * sizeof(uint16_t))) {
            return;
        }
        for (size_t i = 0; i < n; ++i) {
            if ((h[i] & 0x7c00) == 0x7c00) {   // exponent all ones: inf or NaN
                lrq_fail("tensor %s: element %zu is not finite (rule T5)", name.c_str(), i);
            }
        }
    } else if (meta->type == GGML_TYPE_F32) {
        std::vector<float> f(n);
        if (!lrq_read_f32(ml, name, f.data(), n)) {
            return;
        }
        for (size_t i = 0; i < n; ++i) {
            if (!std::isfinite(f[i])) {
                lrq_fail("tensor %s: element %zu is not finite (rule T5)", name.c_str(), i);
            }
        }
    }
}

// The LRQ op reads t_meta, a tensor of weight `stem`; for a two-level weight (format v4) the meta
// tensor is marked so that the buffer-type probe asks for the two-level node (lrq-ggml.h): only a
// backend that runs the layout may hold its data.
static ggml_op lrq_op_reading(const llama_model_loader & ml, const ggml_tensor * t_meta, const std::string & stem) {
    if (ml.get_tensor_meta((stem + ".lrq_sub").c_str())) {
        ((int32_t *) const_cast<ggml_tensor *>(t_meta)->op_params)[LRQ_PROBE_TWO_LEVEL_PARAM] = LRQ_PROBE_TWO_LEVEL_MAGIC;
    }
    return GGML_OP_LRQ_MUL_MAT;
}

ggml_op lrq_tensor_op(const llama_model_loader & ml, const ggml_tensor * t_meta, ggml_op op) {
    if (GGML_TYPE_IS_LRQ(t_meta->type)) {
        const std::string wname = t_meta->name;
        const size_t      dot   = wname.rfind(".weight");
        return lrq_op_reading(ml, t_meta, dot == std::string::npos ? wname : wname.substr(0, dot));
    }
    const std::string name = t_meta->name;
    const size_t      pos  = name.find(".lrq_");
    if (pos == std::string::npos) {
        return op;
    }
    // per-expert gain / bias of an expert replica (format v4): gathered by the routing ids
    if (name.compare(pos, 6, ".lrq_x") == 0) {
        return GGML_OP_GET_ROWS;
    }
    // low-rank factors (format v3) of any weight: two plain mul_mats after the weight's own
    const bool lowrank = (name.size() >= 5 && name.compare(name.size() - 5, 5, ".lr_u") == 0) ||
                         (name.size() >= 5 && name.compare(name.size() - 5, 5, ".lr_v") == 0);
    if (lowrank && name.compare(pos, 6, ".lrq_r") == 0) {
        return GGML_OP_MUL_MAT;
    }
    // group parameters, and replica parameters of LRQ codes, are read only by the LRQ op
    const ggml_tensor * w = ml.get_tensor_meta((name.substr(0, pos) + ".weight").c_str());
    if (name.compare(pos, 6, ".lrq_r") != 0 || !w || GGML_TYPE_IS_LRQ(w->type)) {
        return lrq_op_reading(ml, t_meta, name.substr(0, pos));
    }
    // replica parameters of a stock-typed weight: gain by ggml_mul, bias by ggml_add; the clip
    // bound is read at load time and becomes a ggml_clamp constant (any buffer will do)
    const bool gain = name.size() >= 5 && name.compare(name.size() - 5, 5, ".gain") == 0;
    return gain ? GGML_OP_MUL : GGML_OP_ADD;
}

// Rule T4 for the low-rank factors of one replica of one linear (FORMAT.md 6.2): both or neither,
// U [n_out, r] and V [r, n_in] of one rank 1 <= r <= min(n_out, n_in, 64), Q8_0 only with rows of
// whole blocks (gguf itself refuses other Q8_0 rows).  stem: "blk.L.<slot>.lrq_r<k>".
static void lrq_check_lowrank(const lrq_linear & lin, const std::string & stem) {
    if (!lin.lr_u && !lin.lr_v) {
        return;
    }
    if (!lin.lr_u || !lin.lr_v) {
        lrq_fail("tensor %s.%s has no partner %s.%s: a low-rank correction needs both lr_u and lr_v (rule T4)",
                 stem.c_str(), lin.lr_u ? "lr_u" : "lr_v", stem.c_str(), lin.lr_u ? "lr_v" : "lr_u");
    }
    const int64_t n_in = lin.codes->ne[0], n_out = lin.codes->ne[1], rank = lin.lr_u->ne[0];
    if (lin.lr_v->ne[1] != rank) {
        lrq_fail("tensor %s.lr_v has rank %lld, %s.lr_u rank %lld: they must agree (rule T4)", stem.c_str(),
                 (long long) lin.lr_v->ne[1], stem.c_str(), (long long) rank);
    }
    const int64_t max_rank = std::min<int64_t>({ n_out, n_in, (int64_t) LRQ_LOWRANK_MAX_RANK });
    if (rank < 1 || rank > max_rank) {
        lrq_fail("tensor %s.lr_u: rank %lld is outside 1..%lld (at most min(n_out, n_in, %d); rule T4)", stem.c_str(),
                 (long long) rank, (long long) max_rank, LRQ_LOWRANK_MAX_RANK);
    }
}

static std::vector<uint32_t> lrq_load_tensors_impl(llama_model_base & m, llama_model_loader & ml) {
    lrq_model &    l      = *m.lrq;
    const uint32_t n_base = l.n_base;
    const int      flags_opt = llama_model_loader::TENSOR_NOT_REQUIRED;
    std::set<std::string> created;   // names of the LRQ parameter tensors made here

    // 1. base group parameters of every LRQ weight
    struct base_lin { ggml_tensor * codes = nullptr, * scale = nullptr, * min = nullptr, * sub = nullptr; bool stock = false; };
    std::vector<std::array<base_lin, LRQ_SLOT_COUNT>> base(n_base);
    for (uint32_t L = 0; L < n_base; ++L) {
        if (m.layers[L].wqkv && GGML_TYPE_IS_LRQ(m.layers[L].wqkv->type)) {
            lrq_fail("fused QKV weight of layer %u cannot hold LRQ codes", L);
        }
        for (int s = 0; s < LRQ_SLOT_COUNT; ++s) {
            ggml_tensor * w = *lrq_slot_ptr(m.layers[L], s);
            if (w && !GGML_TYPE_IS_LRQ(w->type) && l.version >= 2 && ggml_n_dims(w) == 2) {
                base[L][s].codes = w;   // a stock-typed weight: replicas may scale / shift / clip it
                base[L][s].stock = true;
                continue;
            }
            if (!w || !GGML_TYPE_IS_LRQ(w->type)) {
                continue;
            }
            if (l.mode == LRQ_MODE_TERNARY && w->type != GGML_TYPE_LRQ2) {
                lrq_fail("ternary weight %s must have type lrq2, not %s", w->name,
                                                ggml_type_name(w->type));
            }
            const int64_t n_in = w->ne[0], n_out = w->ne[1], G = (n_in + l.group_size - 1) / l.group_size;
            base_lin & b = base[L][s];
            b.codes = w;
            b.scale = m.create_tensor(ml, m.tn(LRQ_SLOT_TENSOR[s], "lrq_scale", L), {G, n_out}, 0);
            b.min   = m.create_tensor(ml, m.tn(LRQ_SLOT_TENSOR[s], "lrq_min", L), {G, n_out}, flags_opt);
            if (b.scale->type != GGML_TYPE_F16 || (b.min && b.min->type != GGML_TYPE_F16)) {
                lrq_fail("group parameters of %s must be F16", w->name);
            }
            if ((l.mode == LRQ_MODE_ASYM) != (b.min != nullptr)) {
                lrq_fail("%s.lrq_min must be present exactly in asym files (mode %s)",
                                                w->name, l.mode == LRQ_MODE_ASYM ? "asym" : "sym/ternary");
            }
            // rule T7: the two-level layout's sub-block indices (format v4)
            const auto          sub_tn   = m.tn(LRQ_SLOT_TENSOR[s], "lrq_sub", L);
            const std::string   sub_name = sub_tn.str();
            const ggml_tensor * sub_meta = ml.get_tensor_meta(sub_name.c_str());
            if (sub_meta) {
                if (l.version < LRQ_TWO_LEVEL_VERSION) {
                    lrq_fail("tensor %s: the two-level layout needs format version %d, the file says %u (rule T7)",
                             sub_name.c_str(), LRQ_TWO_LEVEL_VERSION, l.version);
                }
                if (w->type != GGML_TYPE_LRQ2 || l.mode != LRQ_MODE_ASYM) {
                    lrq_fail("tensor %s: the two-level layout needs LRQ2 codes in mode asym, %s is %s in mode %s "
                             "(rule T7)", sub_name.c_str(), w->name, lrq_upper(ggml_type_name(w->type)).c_str(),
                             l.mode == LRQ_MODE_ASYM ? "asym" : l.mode == LRQ_MODE_SYM ? "sym" : "ternary");
                }
                if (sub_meta->type != GGML_TYPE_I8 || ggml_n_dims(sub_meta) > 2 || sub_meta->ne[1] != n_out ||
                    (sub_meta->ne[0] * 16 != n_in && sub_meta->ne[0] * 32 != n_in)) {
                    lrq_fail("tensor %s has type %s shape %s, expected I8 [%lld, %lld] or [%lld, %lld] (rule T7)",
                             sub_name.c_str(), lrq_upper(ggml_type_name(sub_meta->type)).c_str(),
                             lrq_shape_desc(sub_meta).c_str(), (long long) n_out, (long long) (n_in / 16),
                             (long long) n_out, (long long) (n_in / 32));
                }
                b.sub = m.create_tensor(ml, sub_tn, {sub_meta->ne[0], n_out}, 0);
                created.insert(b.sub->name);
            }
            created.insert(b.scale->name);
            lrq_check_finite(ml, b.scale, b.scale->name);
            if (b.min) {
                created.insert(b.min->name);
                lrq_check_finite(ml, b.min, b.min->name);
            }
        }
    }

    // 2. replica parameters, once per distinct (layer, replica) of the schedule
    std::map<std::pair<uint32_t, uint32_t>, std::array<lrq_linear, LRQ_SLOT_COUNT>> reps;
    for (const lrq_exec & e : l.exec) {
        auto key = std::make_pair(e.layer, e.replica);
        if (reps.count(key)) {
            continue;
        }
        auto & lins = reps[key];
        for (int s = 0; s < LRQ_SLOT_COUNT; ++s) {
            const base_lin & b = base[e.layer][s];
            if (!b.codes) {
                continue;
            }
            lrq_linear & lin = lins[s];
            lin.codes = b.codes;
            lin.scale = b.scale;
            lin.min   = b.min;
            lin.sub   = b.sub;
            lin.stock = b.stock;
            const int64_t n_out = b.codes->ne[1], G = b.stock ? 1 : b.scale->ne[0];
            for (const char * p : LRQ_REPLICA_PARAMS) {
                const std::string suffix = format("lrq_r%u.%s", e.replica, p);   // alive during create_tensor
                const auto        tn     = m.tn(LRQ_SLOT_TENSOR[s], suffix.c_str(), e.layer);
                const std::string name   = tn.str();
                const ggml_tensor * meta = ml.get_tensor_meta(name.c_str());
                if (!meta) {
                    continue;
                }
                if (lrq_is_lowrank(p) && l.version < LRQ_LOWRANK_VERSION) {
                    lrq_fail("tensor %s: low-rank corrections need format version %d, the file says %u (rule T3)",
                             name.c_str(), LRQ_LOWRANK_VERSION, l.version);
                }
                if (!lrq_param_allowed(p, b.stock)) {
                    lrq_fail("%s: a replica of %s weight %s takes %s, not %s", name.c_str(),
                                                    b.stock ? "stock-typed" : "LRQ-typed", b.codes->name,
                                                    b.stock ? "gain, bias, clip, lr_u and lr_v"
                                                            : "scale_mult, grid_offset, gain, bias, act, lr_u and lr_v",
                                                    p);
                }
                if (lrq_is_lowrank(p)) {
                    // shapes are checked against each other once both factors are known (below)
                    const bool u = std::strcmp(p, "lr_u") == 0;
                    if (ggml_n_dims(meta) > 2 || (meta->type != GGML_TYPE_F16 && meta->type != GGML_TYPE_Q8_0)) {
                        lrq_fail("tensor %s must be a 2-D F16 or Q8_0 matrix, got %s with %d dims (rule T4)",
                                 name.c_str(), ggml_type_name(meta->type), ggml_n_dims(meta));
                    }
                    if (u ? meta->ne[1] != n_out : meta->ne[0] != b.codes->ne[0]) {
                        lrq_fail("tensor %s has shape [%lld, %lld], expected %s (rule T4)", name.c_str(),
                                 (long long) meta->ne[1], (long long) meta->ne[0],
                                 u ? format("[%lld, rank]", (long long) n_out).c_str()
                                   : format("[rank, %lld]", (long long) b.codes->ne[0]).c_str());
                    }
                    ggml_tensor * t = m.create_tensor(ml, tn, {meta->ne[0], meta->ne[1]}, flags_opt);
                    lrq_check_finite(ml, meta, name);
                    created.insert(name);
                    l.n_replica_tensors++;
                    (u ? lin.lr_u : lin.lr_v) = t;
                    continue;
                }
                if (std::strcmp(p, "clip") == 0) {
                    if (meta->type != GGML_TYPE_F32 || ggml_n_dims(meta) != 1 || meta->ne[0] != 1) {
                        lrq_fail("%s must be F32 [1], got %s with %lld elements", name.c_str(),
                                                        ggml_type_name(meta->type), (long long) ggml_nelements(meta));
                    }
                    ggml_tensor * t = m.create_tensor(ml, tn, {1}, flags_opt);
                    created.insert(name);
                    l.n_replica_tensors++;
                    // the bound is a graph constant (ggml_clamp): read and validate it now
                    float c = 0.0f;
                    if (t && !lrq_read_f32(ml, name, &c, 1)) {
                        lrq_fail("%s: cannot read the clip bound at load time", name.c_str());
                    }
                    if (!(c > 0.0f)) {   // also refuses NaN; +inf means no clip
                        lrq_fail("%s = %g: the clip bound must be > 0", name.c_str(), c);
                    }
                    lin.clip = c;
                    continue;
                }
                const bool grid = std::strcmp(p, "scale_mult") == 0 || std::strcmp(p, "grid_offset") == 0;
                ggml_tensor * t;
                if (grid) {
                    const int64_t ne0 = meta->ne[0], ne1 = meta->ne[1];
                    const bool ok_shape = ggml_n_dims(meta) <= 2 && (ne0 == G || ne0 == 1) && (ne1 == n_out || ne1 == 1) &&
                                          !(ne0 == G && G > 1 && ne1 == 1);   // [1, n_groups] is not a format shape
                    if (!ok_shape || meta->type != GGML_TYPE_F16) {
                        lrq_fail("%s must be F16 [%lld, %lld], [%lld, 1] or [1, 1] (numpy order), "
                                                        "got %s [%lld, %lld]", name.c_str(), (long long) n_out, (long long) G,
                                                        (long long) n_out, ggml_type_name(meta->type), (long long) ne1,
                                                        (long long) ne0);
                    }
                    t = m.create_tensor(ml, tn, {ne0, ne1}, flags_opt);
                    lrq_check_finite(ml, meta, name);
                } else {
                    const int64_t n = std::strcmp(p, "act") == 0 ? 2 : n_out;
                    if (meta->type != GGML_TYPE_F32 || ggml_n_dims(meta) != 1 || meta->ne[0] != n) {
                        lrq_fail("tensor %s has shape %s (%s), expected F32 [%lld]", name.c_str(),
                                 lrq_shape_desc(meta).c_str(), lrq_upper(ggml_type_name(meta->type)).c_str(),
                                 (long long) n);
                    }
                    t = m.create_tensor(ml, tn, {n}, flags_opt);
                    if (std::strcmp(p, "act") != 0) {
                        lrq_check_finite(ml, meta, name);   // act: range-checked below
                    }
                }
                created.insert(name);
                l.n_replica_tensors++;
                if (std::strcmp(p, "scale_mult") == 0) lin.alpha = t;
                if (std::strcmp(p, "grid_offset") == 0) lin.beta = t;
                if (std::strcmp(p, "gain") == 0) lin.gain = t;
                if (std::strcmp(p, "bias") == 0) lin.bias = t;
                if (std::strcmp(p, "act") == 0) {
                    lin.act = t;
                    // The op reads (c, k) at compute time; validate them now, from the file, so that
                    // a bad value is a load error and never an abort inside the kernel.
                    float ck[2];
                    if (lrq_read_f32(ml, name, ck, 2)) {
                        const bool bits_ok = ck[1] == 0.0f || (ck[1] >= 2.0f && ck[1] <= 16.0f && ck[1] == std::floor(ck[1]));
                        if (!(ck[0] > 0.0f && ck[0] <= 1.0f) || !bits_ok) {
                            lrq_fail("%s = (%g, %g): clip must be in (0, 1] and act bits 0 or "
                                                            "an integer in 2..16", name.c_str(), ck[0], ck[1]);
                        }
                    }
                }
            }
            lrq_check_lowrank(lin, m.tn(LRQ_SLOT_TENSOR[s], format("lrq_r%u", e.replica).c_str(), e.layer).str());
        }
    }

    // 2b. expert replicas (format v4, rule X4): per-expert gain / bias of each entry's projections
    for (lrq_moe_entry & x : l.moe) {
        llama_layer & layer = m.layers[x.layer];
        ggml_tensor * const projs[3] = { layer.ffn_gate_exps, layer.ffn_up_exps, layer.ffn_down_exps };
        static const llm_tensor proj_tn[3] = { LLM_TENSOR_FFN_GATE_EXPS, LLM_TENSOR_FFN_UP_EXPS, LLM_TENSOR_FFN_DOWN_EXPS };
        static const char * const proj_name[3] = { "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps" };
        if (!layer.ffn_gate_inp || !projs[0] || !projs[1] || !projs[2]) {
            const char * miss = !layer.ffn_gate_inp ? "ffn_gate_inp" : !projs[0] ? proj_name[0] : !projs[1] ? proj_name[1] : proj_name[2];
            lrq_fail("key " LRQ_KEY_MOE_LAYER ": an entry names layer %u, which is not a mixture-of-experts layer "
                     "(blk.%u.%s.weight is missing; rule X1)", x.layer, x.layer, miss);
        }
        for (int k = 0; k < 3; ++k) {
            const int64_t n_out = projs[k]->ne[1], n_expert = projs[k]->ne[2];
            for (int is_bias = 0; is_bias < 2; ++is_bias) {
                const char *      p      = is_bias ? "bias" : "gain";
                const std::string suffix = format("lrq_x%u.%s", x.replica, p);   // alive during create_tensor
                const auto        tn     = m.tn(proj_tn[k], suffix.c_str(), x.layer);
                const std::string name   = tn.str();
                const ggml_tensor * meta = ml.get_tensor_meta(name.c_str());
                if (!meta) {
                    continue;
                }
                if (meta->type != GGML_TYPE_F32 || ggml_n_dims(meta) > 2 || meta->ne[0] != n_out || meta->ne[1] != n_expert) {
                    lrq_fail("tensor %s has type %s, shape %s, expected F32 [%lld, %lld] (rule X4)", name.c_str(),
                             lrq_upper(ggml_type_name(meta->type)).c_str(), lrq_shape_desc(meta).c_str(),
                             (long long) n_expert, (long long) n_out);
                }
                ggml_tensor * t = m.create_tensor(ml, tn, { n_out, n_expert }, flags_opt);
                created.insert(name);
                l.n_replica_tensors++;
                lrq_check_finite(ml, meta, name);
                // rows of experts the entry does not list hold the defaults: the runtime multiplies
                // every routed slot and masks by the entry's coefficients, the reference only the listed
                std::vector<float> v((size_t) (n_out * n_expert));
                if (lrq_read_f32(ml, name, v.data(), v.size())) {
                    const float dflt = is_bias ? 0.0f : 1.0f;
                    for (int64_t e = 0; e < n_expert; ++e) {
                        if (std::binary_search(x.experts.begin(), x.experts.end(), (uint32_t) e)) {
                            continue;
                        }
                        for (int64_t j = 0; j < n_out; ++j) {
                            if (v[(size_t) (e * n_out + j)] != dflt) {
                                lrq_fail("tensor %s: row %lld (an expert the entry does not list) must hold the default "
                                         "%s %g (rule X4)", name.c_str(), (long long) e, p, dflt);
                            }
                        }
                    }
                }
                (is_bias ? x.bias : x.gain)[k] = t;
            }
        }
    }

    // 3. every LRQ parameter tensor of the file was made above, every LRQ-typed tensor is a slot
    for (const auto & [name, w] : ml.weights_map) {
        const ggml_tensor * t = w.tensor;
        if (name.find(".lrq_x") != std::string::npos && !created.count(name)) {
            unsigned L = 0, r = 0;
            char     proj[64] = {0};
            const bool parsed = std::sscanf(name.c_str(), "blk.%u.%63[^.].lrq_x%u.", &L, proj, &r) == 3;
            lrq_fail("tensor %s belongs to no expert entry (" LRQ_KEY_MOE_LAYER " / " LRQ_KEY_MOE_REPLICA " list no "
                     "replica %u of layer %u, or the name is not blk.L.ffn_{gate,up,down}_exps.lrq_x<r>.{gain,bias}; "
                     "rule X4)", name.c_str(), parsed ? r : 0u, parsed ? L : 0u);
        }
        if (name.find(".lrq_") != std::string::npos && !created.count(name)) {
            unsigned L = 0, r = 0;
            char     slot[64] = {0};
            if (std::sscanf(name.c_str(), "blk.%u.%63[^.].lrq_r%u.", &L, slot, &r) == 3) {
                lrq_fail("tensor %s is for replica %u of layer %u, which the schedule never runs, or its "
                                                "weight %s has no LRQ codes%s", name.c_str(), r, L, slot,
                                                l.version < 2 ? " (format version 1 has no stock-typed replicas)" : "");
            }
            lrq_fail("tensor %s is not an LRQ parameter of an LRQ weight%s", name.c_str(),
                                            l.version < 2 ? " (format version 1 has no stock-typed replicas)" : "");
        }
        if (GGML_TYPE_IS_LRQ(t->type)) {
            bool known = false;
            for (uint32_t L = 0; L < n_base && !known; ++L) {
                for (int s = 0; s < LRQ_SLOT_COUNT && !known; ++s) {
                    known = base[L][s].codes && name == base[L][s].codes->name;
                }
            }
            if (!known) {
                lrq_fail("tensor %s has type %s but is not a block linear (q, k, v, o, gate, "
                                                "up, down)", name.c_str(), ggml_type_name(t->type));
            }
        }
    }

    // 4. virtualize: one layer per execution, aliasing (copying the pointers of) its base layer
    const size_t n_exec = l.exec.size();
    std::vector<uint32_t> exec_layer(n_exec);
    for (size_t e = 0; e < n_exec; ++e) {
        exec_layer[e] = l.exec[e].layer;
        const auto & lins = reps.at({ l.exec[e].layer, l.exec[e].replica });
        for (int s = 0; s < LRQ_SLOT_COUNT; ++s) {
            const lrq_linear & lin = lins[s];
            const bool stock_default = lin.stock && !lin.gain && !lin.bias && std::isinf(lin.clip) && !lin.lr_u;
            if (lin.codes && !stock_default) {   // a stock weight without parameters is a plain mul_mat
                l.exec[e].lin.push_back(lin);
            }
        }
    }
    const std::vector<llama_layer> base_layers = m.layers;
    m.layers.resize(n_exec);
    for (size_t e = 0; e < n_exec; ++e) {
        m.layers[e] = base_layers[exec_layer[e]];
    }
    llama_hparams & hp = m.hparams;
    auto expand = [&](auto & arr) {
        const auto copy = arr;
        for (size_t e = 0; e < n_exec; ++e) {
            arr[e] = copy[exec_layer[e]];
        }
    };
    expand(hp.n_head_arr);
    expand(hp.n_head_kv_arr);
    expand(hp.n_ff_arr);
    expand(hp.n_ff_exp_arr);
    expand(hp.n_expert_used_arr);
    expand(hp.rope_pattern);
    expand(hp.is_swa_impl);
    expand(hp.is_recr_impl);
    expand(hp.xielu_alpha_n);
    expand(hp.xielu_alpha_p);
    expand(hp.xielu_beta);
    expand(hp.xielu_eps);
    expand(hp.is_indexer_full_impl);
    expand(hp.dsv4_compress_ratios);
    expand(hp.deepstack_mapping_arr);
    expand(hp.swiglu_clamp_exp);
    expand(hp.swiglu_clamp_shexp);
    {
        const auto copy = hp.is_ple_impl;
        for (size_t e = 0; e < n_exec; ++e) {
            hp.is_ple_impl[e] = copy[exec_layer[e]];
        }
    }
    hp.n_layer_all = (uint32_t) n_exec;

    size_t n_par = 0;
    for (const lrq_exec & e : l.exec) {
        n_par += e.first && e.n_group > 1;
    }
    const std::string opt = !l.layer_map.empty() ? ", layer map '" + l.layer_map + "'"
                          : !l.adapter.empty()   ? ", adapter " + l.adapter
                                                 : std::string();
    LLAMA_LOG_INFO("%s: format v%u, %u base layers -> %zu executions (%zu parallel groups), %s, %zu replica tensors%s\n",
                   __func__, l.version, n_base, n_exec, n_par, lrq_codes_desc(l).c_str(), l.n_replica_tensors,
                   opt.c_str());
    return exec_layer;
}

std::vector<uint32_t> lrq_load_tensors(llama_model_base & m, llama_model_loader & ml) {
    try {
        return lrq_load_tensors_impl(m, ml);
    } catch (const std::runtime_error & e) {
        // llama.cpp's own create_tensor errors (missing tensor, wrong shape) do not name the file
        const std::string what = e.what();
        if (what.rfind(lrq_cur_file + ":", 0) == 0) {
            throw;
        }
        throw std::runtime_error(lrq_cur_file + ": " + what);
    }
}

std::string lrq_model_desc(const lrq_model & l, const std::string & stock_desc) {
    if (!l.layer_map.empty() || !l.adapter.empty()) {
        // load options on any file: "<its own description> + layer map '...'"
        const std::string own = l.arch_name.rfind("lrq-", 0) == 0 && l.max_bits > 0
                                    ? stock_desc.substr(0, stock_desc.find(' ', stock_desc.find(' ') + 1)) + " " + lrq_codes_desc(l)
                                    : stock_desc;
        const std::string opt = !l.layer_map.empty() ? "layer map '" + l.layer_map + "'"
                                                     : "adapter " + l.adapter.substr(l.adapter.find_last_of('/') + 1);
        return format("%s + %s, %u layers -> %zu executions", own.c_str(), opt.c_str(), l.n_base, l.exec.size());
    }
    if (l.max_bits == 0) {
        // a stock-typed base: the stock description ("<arch> <size> <ftype>") is right
        return format("lrq-%s, %u layers -> %zu executions", stock_desc.c_str(), l.n_base, l.exec.size());
    }
    // the stock description is "<arch> <size> <ftype>"; the ftype of an LRQ file is a guess
    std::string arch_size = stock_desc.substr(0, stock_desc.find(' ', stock_desc.find(' ') + 1));
    return format("lrq-%s %s, %u layers -> %zu executions", arch_size.c_str(), lrq_codes_desc(l).c_str(), l.n_base,
                  l.exec.size());
}

// graph nodes of one expert replica in one execution (build_lrq_moe_exps: 3 products with their
// gathers, reshapes, gains and biases, the activation, the coefficients and the combine)
static constexpr size_t LRQ_MOE_ENTRY_NODES = 48;

uint32_t lrq_graph_max_nodes(const lrq_model & l, uint32_t stock) {
    const size_t n_exec = l.exec.size();
    const size_t rep    = (n_exec + l.n_base - 1) / l.n_base;
    // a low-rank correction costs 3 nodes (two mul_mats and an add) per linear of an execution;
    // an expert replica at most LRQ_MOE_ENTRY_NODES per execution of its layer
    size_t n_moe = 0;
    for (const lrq_exec & e : l.exec) {
        for (const lrq_moe_entry & x : l.moe) {
            n_moe += x.layer == e.layer;
        }
    }
    return (uint32_t) (stock * rep + (8 + 3 * LRQ_SLOT_COUNT) * n_exec + LRQ_MOE_ENTRY_NODES * n_moe);
}

// ---- graph ----------------------------------------------------------------------------------------

ggml_tensor * llm_graph_context::build_lrq_layer_inp(ggml_tensor * inpL, int il) const {
    if (!lrq) {
        return inpL;
    }
    lrq_il = il;
    lrq_graph_mark(ctx0, il, LRQ_MARK_INP, lrq->exec.size());   // the lockstep order's member ranges
    const lrq_exec & e = lrq->exec.at(il);
    if (e.first) {
        lrq_x   = inpL;
        lrq_acc = nullptr;
        return inpL;
    }
    return lrq_x;   // every member of a parallel group starts from the group input
}

ggml_tensor * llm_graph_context::build_lrq_layer_out(ggml_tensor * cur, int il, ggml_tensor * inp_out_ids) const {
    if (!lrq) {
        return cur;
    }
    const lrq_exec & e = lrq->exec.at(il);
    lrq_graph_mark(ctx0, il, LRQ_MARK_OUT_BEGIN, lrq->exec.size());
    struct mark_end {   // after the combine's tensors, on every return
        const llm_graph_context * g; int il;
        ~mark_end() { lrq_graph_mark(g->ctx0, il, LRQ_MARK_OUT_END, g->lrq->exec.size()); }
    } end_mark{this, il};
    if (e.n_group == 1 && e.weight == 1.0f) {
        return cur;   // x -> B(x): exactly the stock graph
    }
    // x_out = x + sum_j w_j (B_j(x) - x).  On the last execution the arch has reduced cur to the
    // output rows (get_rows with inp_out_ids); the saved group tensors are reduced the same way.
    const bool    reduce = il == n_layer - 1 && inp_out_ids;
    ggml_tensor * x      = reduce ? ggml_get_rows(ctx0, lrq_x, inp_out_ids) : lrq_x;
    ggml_tensor * acc    = lrq_acc && reduce ? ggml_get_rows(ctx0, lrq_acc, inp_out_ids) : lrq_acc;
    ggml_tensor * d      = ggml_sub(ctx0, cur, x);
    if (e.weight != 1.0f) {
        d = ggml_scale(ctx0, d, e.weight);
    }
    acc = acc ? ggml_add(ctx0, acc, d) : d;
    if (e.last) {
        ggml_tensor * out = ggml_add(ctx0, x, acc);
        cb(out, "lrq_group_out", il);
        return out;
    }
    lrq_acc = acc;
    return cur;   // not used: the next member starts from lrq_x
}

// y + U (V x) (FORMAT.md 6.2) with x the linear's input before any clip: two stock mul_mats and an
// add, so the correction runs wherever its factor types (F16, Q8_0) do.  V [n_in, r] (ggml order)
// turns x [n_in, t] into [r, t], U [r, n_out] that into [n_out, t].
static ggml_tensor * build_lrq_lowrank(ggml_context * ctx, const lrq_linear & lin, ggml_tensor * x, ggml_tensor * y) {
    if (!lin.lr_u) {
        return y;
    }
    ggml_tensor * vx = ggml_mul_mat(ctx, lin.lr_v, x);
    return ggml_add(ctx, y, ggml_mul_mat(ctx, lin.lr_u, vx));
}

ggml_tensor * llm_graph_context::build_lrq_mm(ggml_tensor * w, ggml_tensor * cur) const {
    const bool lrq_typed = GGML_TYPE_IS_LRQ(w->type);
    if (lrq_il < 0 || (size_t) lrq_il >= lrq->exec.size()) {
        if (!lrq_typed) {
            return ggml_mul_mat(ctx0, w, cur);
        }
        GGML_ABORT("lrq: LRQ weight %s used outside a layer of the schedule", w->name);
    }
    for (const lrq_linear & lin : lrq->exec[lrq_il].lin) {
        if (lin.codes != w) {
            continue;
        }
        if (lin.stock) {
            // y[n_out, t] = gain[n_out] * (W[n_out, n_in] . clamp(x[n_in, t], -c, c)) + bias[n_out]
            // (FORMAT.md section 6.1): stock ops only, so this runs on every backend of the base type
            ggml_tensor * x = cur;
            if (std::isfinite(lin.clip)) {
                cur = ggml_clamp(ctx0, cur, -lin.clip, lin.clip);
            }
            ggml_tensor * res = ggml_mul_mat(ctx0, w, cur);
            if (prec_policy) {
                prec_policy->apply(res);   // keyed on the weight: must see the mul_mat node
            }
            if (lin.gain) {
                res = ggml_mul(ctx0, res, lin.gain);
            }
            if (lin.bias) {
                res = ggml_add(ctx0, res, lin.bias);
            }
            return build_lrq_lowrank(ctx0, lin, x, res);
        }
        // the op reads rows of x with one stride
        if (cur->nb[0] != sizeof(float) || cur->nb[2] != cur->nb[1] * cur->ne[1] || cur->nb[3] != cur->nb[2] * cur->ne[2]) {
            cur = ggml_cont(ctx0, cur);
        }
        ggml_tensor * res = lin.sub ? ggml_lrq_mul_mat_two_level(ctx0, w, cur, lin.scale, lin.min, lin.sub, lin.alpha,
                                                                 lin.beta, lin.gain, lin.bias, lin.act, lrq->group_size,
                                                                 (lrq_mode) lrq->mode)
                                    : ggml_lrq_mul_mat(ctx0, w, cur, lin.scale, lin.min, lin.alpha, lin.beta, lin.gain,
                                                       lin.bias, lin.act, lrq->group_size, (lrq_mode) lrq->mode);
        return build_lrq_lowrank(ctx0, lin, cur, res);
    }
    if (!lrq_typed) {
        return ggml_mul_mat(ctx0, w, cur);   // a stock weight without replica parameters (or the output head)
    }
    GGML_ABORT("lrq: weight %s is not an LRQ linear of execution %d", w->name, lrq_il);
}

// ---- expert replicas (format v4, docs/moe.md) ------------------------------------------------------

// A constant [1, n] F32 graph input (an entry's coefficients or expert map): a graph holds no
// constants; the data is the same for every ubatch, so it never stops llama.cpp from reusing a graph.
class lrq_const_input : public llm_graph_input_i {
public:
    lrq_const_input(ggml_tensor * t, const std::vector<float> * data) : t(t), data(data) {}
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        ggml_backend_tensor_set(t, data->data(), 0, ggml_nbytes(t));
    }
    bool can_reuse(const llm_graph_params & params) override {
        GGML_UNUSED(params);
        return true;
    }
private:
    ggml_tensor *              t;
    const std::vector<float> * data;
};

// The skipping variant (an id of -1 = no product, patch 0011) exists in ggml's CPU mul_mat_id and
// its repacked variant only: it is used when the stacked experts live in one of those buffers and
// no GPU could take the op over (llama.cpp offloads large batches to a GPU even for CPU weights).
// LRQ_MOE_MASKED=1 forces the masked variant (every routed slot multiplied, then weighted by 0).
static bool lrq_moe_can_skip(const ggml_tensor * w) {
    const char * env = std::getenv("LRQ_MOE_MASKED");
    if ((env && std::atoi(env) != 0) || !w->buffer) {
        return false;
    }
    const std::string buft = ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer));
    if (buft != "CPU" && buft != "CPU_Mapped" && buft != "CPU_REPACK") {
        return false;
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        const enum ggml_backend_dev_type t = ggml_backend_dev_type(ggml_backend_dev_get(i));
        if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) {
            return false;
        }
    }
    return true;
}

ggml_tensor * llm_graph_context::build_lrq_moe_exps(ggml_tensor * experts, ggml_tensor * inp, ggml_tensor * ids,
                                                    ggml_tensor * up_exps, ggml_tensor * gate_exps,
                                                    ggml_tensor * down_exps, llm_ffn_op_type type_op, int il) const {
    if (!lrq || lrq->moe.empty() || il < 0 || (size_t) il >= lrq->exec.size()) {
        return experts;
    }
    const uint32_t L = lrq->exec[il].layer;
    ggml_tensor * ids_flat = nullptr;
    ggml_tensor * acc      = nullptr;
    const int64_t n_used = ids->ne[0], n_tok = ids->ne[1];
    auto input = [&](const std::vector<float> & data, const char * what, const lrq_moe_entry & x) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, (int64_t) data.size());
        ggml_set_input(t);
        ggml_format_name(t, "lrq_moe_%s_%u_x%u", what, x.layer, x.replica);
        res->add_input(std::make_unique<lrq_const_input>(t, &data));
        return t;
    };
    for (const lrq_moe_entry & x : lrq->moe) {
        if (x.layer != L) {
            continue;
        }
        if (type_op != LLM_FFN_SILU || !gate_exps) {
            GGML_ABORT("lrq: expert replicas need SiLU-gated experts (layer %u)", L);   // refused at load for other archs
        }
        if (!ids_flat) {
            // the routing of this execution, once: [n_used * n_tokens] expert ids for ggml_get_rows
            ids_flat = ggml_reshape_1d(ctx0, ggml_cont(ctx0, ids), n_used * n_tok);
        }
        // the replica's ids: the routing's, or (skipping) -1 where the slot's expert is not listed,
        // so that the products cost the routed slots of the listed experts only
        ggml_tensor * ids_r = ids;
        if (lrq_moe_can_skip(up_exps) && lrq_moe_can_skip(gate_exps) && lrq_moe_can_skip(down_exps)) {
            ggml_tensor * m = ggml_get_rows(ctx0, input(x.map, "map", x), ids_flat);
            ids_r = ggml_reshape_2d(ctx0, ggml_cast(ctx0, m, GGML_TYPE_I32), n_used, n_tok);
        }
        // per-slot rows of an [n_out, n_expert] parameter: [n_out, n_used, n_tokens]
        auto rows = [&](ggml_tensor * p) {
            return ggml_reshape_3d(ctx0, ggml_get_rows(ctx0, p, ids_flat), p->ne[0], n_used, n_tok);
        };
        auto product = [&](int k, ggml_tensor * w, ggml_tensor * b) {
            ggml_tensor * y = ggml_mul_mat_id(ctx0, w, b, ids_r);
            if (x.gain[k]) {
                y = ggml_mul(ctx0, y, rows(x.gain[k]));
            }
            if (x.bias[k]) {
                y = ggml_add(ctx0, y, rows(x.bias[k]));   // 0 in the rows of unlisted experts (X4)
            }
            return y;
        };
        ggml_tensor * up   = product(1, up_exps, inp);
        ggml_tensor * gate = product(0, gate_exps, inp);
        ggml_tensor * down = product(2, down_exps, ggml_swiglu_split(ctx0, gate, up));   // E_e(h; r) per slot
        cb(down, "lrq_moe_replica", il);

        ggml_tensor * c = ggml_reshape_3d(ctx0, ggml_get_rows(ctx0, input(x.coef, "coef", x), ids_flat), 1, n_used, n_tok);
        // parallel: E' = E + a (E_r - E); serial: E' = E + a E_r (a = 0 for the experts not listed)
        ggml_tensor * term = x.mode == LRQ_MOE_PARALLEL ? ggml_sub(ctx0, down, experts) : down;
        term = ggml_mul(ctx0, term, c);
        acc  = acc ? ggml_add(ctx0, acc, term) : term;
    }
    if (!acc) {
        return experts;
    }
    ggml_tensor * out = ggml_add(ctx0, experts, acc);
    cb(out, "lrq_moe_experts", il);
    return out;
}
