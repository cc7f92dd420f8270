// lrq: the lockstep order of parallel groups (compiled into libllama; declared in lrq-llama.h).
//
// The graph builders emit the members of a parallel group one after the other, so member 1's
// q projection runs after member 0's whole block and reads the shared codes from memory again.
// The members are independent of each other until the group's combine x + sum_j w_j (B_j(x) - x),
// so their nodes can be interleaved: a list scheduler (Kahn's topological sort) over the group's
// node range with the key (2k + is_linear, member, original position), k = the linears that precede
// the node in its own member, puts every member's "before the k-th linear" nodes first, then their
// k-th linears back to back.  Adjacent LRQ_MUL_MAT nodes over the same codes are what the CUDA
// backend fuses, and on any backend the second member reads codes the first has just brought into
// the cache.  The same ops run on the same inputs, so results are bit-identical.
//
// Membership: every tensor of a graph is an object of the graph context, and objects are laid out
// in creation order, so the context's used size recorded when build_lrq_layer_inp / _out run
// (lrq_graph_mark) splits the tensors into the executions that created them.
#include "lrq-llama.h"

#include "lrq-ggml.h"

#include "llama-impl.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <queue>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

// Marks of the graph being built on this thread (graphs are built on the thread that decodes).
struct lrq_marks {
    const ggml_context *  ctx = nullptr;
    std::vector<size_t>   inp;        // per execution: used size of ctx at build_lrq_layer_inp
    std::vector<size_t>   out_begin;  // ... at the start of build_lrq_layer_out
    std::vector<size_t>   out_end;    // ... at its end (after the group combine's tensors)
};
thread_local lrq_marks t_marks;

constexpr size_t LRQ_NO_MARK = (size_t) -1;

// A line is logged when it differs from the last one: a context builds its reserve graphs several
// times with the same answer.
void lrq_log_changed(ggml_log_level level, const std::string & line) {
    static std::mutex  mu;
    static std::string last;
    std::lock_guard<std::mutex> lock(mu);
    if (line == last) {
        return;
    }
    last = line;
    if (level == GGML_LOG_LEVEL_WARN) {
        LLAMA_LOG_WARN("%s\n", line.c_str());
    } else {
        LLAMA_LOG_INFO("%s\n", line.c_str());
    }
}

const ggml_tensor * lrq_root(const ggml_tensor * t) {
    while (t && t->view_src) {
        t = t->view_src;
    }
    return t;
}

bool lrq_is_view_op(ggml_op op) {
    return op == GGML_OP_VIEW || op == GGML_OP_RESHAPE || op == GGML_OP_PERMUTE || op == GGML_OP_TRANSPOSE ||
           op == GGML_OP_NONE;
}

// A linear of a block: the LRQ op, or a stock mat-mul of a weight (a tensor without an op; the
// KV cache is read through views, which have one).
bool lrq_is_linear(const ggml_tensor * t) {
    if (t->op == GGML_OP_LRQ_MUL_MAT) {
        return true;
    }
    return t->op == GGML_OP_MUL_MAT && t->src[0] && t->src[0]->op == GGML_OP_NONE &&
           !(t->src[0]->flags & GGML_TENSOR_FLAG_INPUT);
}

}  // namespace

int lrq_graph_shared_code_pairs(ggml_cgraph * gf) {
    const int n = ggml_graph_n_nodes(gf);
    int       pairs = 0;
    for (int i = 0; i + 1 < n; ++i) {
        pairs += ggml_lrq_mul_mat_shares_codes(ggml_graph_node(gf, i), ggml_graph_node(gf, i + 1));
    }
    return pairs;
}

void lrq_graph_mark(const ggml_context * ctx, int il, int where, size_t n_exec) {
    if (t_marks.ctx != ctx || (il == 0 && where == LRQ_MARK_INP)) {
        t_marks     = lrq_marks();
        t_marks.ctx = ctx;
        t_marks.inp.assign(n_exec, LRQ_NO_MARK);
        t_marks.out_begin.assign(n_exec, LRQ_NO_MARK);
        t_marks.out_end.assign(n_exec, LRQ_NO_MARK);
    }
    if (il < 0 || (size_t) il >= t_marks.inp.size()) {
        return;
    }
    std::vector<size_t> & v = where == LRQ_MARK_INP ? t_marks.inp : where == LRQ_MARK_OUT_BEGIN ? t_marks.out_begin
                                                                                              : t_marks.out_end;
    v[il] = ggml_used_mem(ctx);
}

namespace {

// One group's nodes in [lo, hi] of `nodes` reordered in place; false (nothing changed) when the
// sort does not emit every node of the range.
bool lrq_lockstep_range(ggml_tensor ** nodes, int lo, int hi, const std::vector<int> & member,
                        const std::vector<int> & cls) {
    const int n = hi - lo + 1;
    std::unordered_map<const ggml_tensor *, int> idx;
    idx.reserve((size_t) n * 2);
    for (int i = 0; i < n; ++i) {
        idx[nodes[lo + i]] = i;
    }
    std::vector<std::vector<int>> succ(n);
    std::vector<int>              indeg(n, 0);
    auto edge = [&](int from, int to) {
        succ[from].push_back(to);
        ++indeg[to];
    };
    // Storage written in place (a KV-cache set_rows / cpy, an in-place op): every node of the
    // range that touches it (is a view of it or reads it) keeps its original order, since a read
    // of the cache through a view of the cache tensor has no edge to the write before it.
    std::unordered_map<const ggml_tensor *, int> written;   // root -> last toucher so far (-1 none)
    for (int i = 0; i < n; ++i) {
        const ggml_tensor * t = nodes[lo + i];
        if (t->view_src && !lrq_is_view_op(t->op)) {
            written[lrq_root(t)] = -1;
        }
    }
    for (int i = 0; i < n; ++i) {
        const ggml_tensor * t = nodes[lo + i];
        const ggml_tensor * deps[GGML_MAX_SRC + 1];
        int                 nd = 0;
        for (int s = 0; s < GGML_MAX_SRC; ++s) {
            if (t->src[s]) deps[nd++] = t->src[s];
        }
        if (t->view_src) deps[nd++] = t->view_src;
        for (int d = 0; d < nd; ++d) {
            auto it = idx.find(deps[d]);
            if (it != idx.end() && it->second != i) edge(it->second, i);
        }
        if (!written.empty()) {
            const ggml_tensor * roots[GGML_MAX_SRC + 2];
            int                 nr = 0;
            roots[nr++]            = lrq_root(t);
            for (int d = 0; d < nd; ++d) roots[nr++] = lrq_root(deps[d]);
            std::sort(roots, roots + nr);
            nr = (int) (std::unique(roots, roots + nr) - roots);
            for (int r = 0; r < nr; ++r) {
                auto it = written.find(roots[r]);
                if (it == written.end()) continue;
                if (it->second >= 0) edge(it->second, i);
                it->second = i;
            }
        }
    }
    // linears of its own member before each node, in the original order
    std::vector<int>              k(n, 0);
    std::unordered_map<int, int>  seen;
    for (int i = 0; i < n; ++i) {
        if (member[lo + i] < 0) continue;
        int & c = seen[member[lo + i]];
        k[i]    = c;
        c += lrq_is_linear(nodes[lo + i]);
    }
    using key_t = std::tuple<long, int, int>;   // (phase, member, original position)
    auto key = [&](int i) -> key_t {
        switch (cls[lo + i]) {
            case 0:  return key_t(-1, 0, i);                 // not of this group: as early as it can
            case 1:  return key_t(2L * k[i] + (lrq_is_linear(nodes[lo + i]) ? 1 : 0), member[lo + i], i);
            default: return key_t(1L << 40, member[lo + i], i);   // the group combine: at the end
        }
    };
    std::priority_queue<std::pair<key_t, int>, std::vector<std::pair<key_t, int>>, std::greater<>> ready;
    for (int i = 0; i < n; ++i) {
        if (indeg[i] == 0) ready.emplace(key(i), i);
    }
    std::vector<ggml_tensor *> order;
    order.reserve(n);
    while (!ready.empty()) {
        const int i = ready.top().second;
        ready.pop();
        order.push_back(nodes[lo + i]);
        for (int j : succ[i]) {
            if (--indeg[j] == 0) ready.emplace(key(j), j);
        }
    }
    if ((int) order.size() != n) {
        return false;
    }
    std::copy(order.begin(), order.end(), nodes + lo);
    return true;
}

// Every node's sources (and the tensor it views) that are nodes come before it.
bool lrq_graph_is_topological(ggml_tensor ** nodes, int n) {
    std::unordered_map<const ggml_tensor *, int> pos;
    pos.reserve((size_t) n * 2);
    for (int i = 0; i < n; ++i) pos[nodes[i]] = i;
    for (int i = 0; i < n; ++i) {
        for (int s = 0; s <= GGML_MAX_SRC; ++s) {
            const ggml_tensor * d = s < GGML_MAX_SRC ? nodes[i]->src[s] : nodes[i]->view_src;
            if (!d) continue;
            auto it = pos.find(d);
            if (it != pos.end() && it->second >= i) return false;
        }
    }
    return true;
}

}  // namespace

void lrq_graph_lockstep(const lrq_model & l, const ggml_context * ctx, ggml_cgraph * gf) {
    const size_t n_exec = l.exec.size();
    size_t       n_groups = 0;
    for (const lrq_exec & e : l.exec) n_groups += e.first && e.n_group > 1;
    const char * off_env = getenv("LRQ_NO_LOCKSTEP");
    if (off_env && off_env[0] == '1') {
        lrq_log_changed(GGML_LOG_LEVEL_INFO,
                        format("lrq_lockstep: off (LRQ_NO_LOCKSTEP=1): %zu parallel groups, %d adjacent same-codes LRQ pairs",
                               n_groups, lrq_graph_shared_code_pairs(gf)));
        return;
    }
    if (n_groups == 0) {
        lrq_log_changed(GGML_LOG_LEVEL_INFO,
                        format("lrq_lockstep: 0 parallel groups, %d adjacent same-codes LRQ pairs",
                               lrq_graph_shared_code_pairs(gf)));
        return;
    }
    const lrq_marks & mk = t_marks;
    auto              untouched = [&](const char * why) {
        lrq_log_changed(GGML_LOG_LEVEL_WARN, format("lrq_lockstep: graph left in its built order: %s", why));
    };
    if (mk.ctx != ctx || mk.inp.size() != n_exec) {
        untouched("no execution marks for this graph");
        return;
    }
    for (size_t e = 0; e < n_exec; ++e) {
        if (mk.inp[e] == LRQ_NO_MARK || mk.out_begin[e] == LRQ_NO_MARK || mk.out_end[e] == LRQ_NO_MARK ||
            mk.inp[e] > mk.out_begin[e] || mk.out_begin[e] > mk.out_end[e] ||
            (e + 1 < n_exec && mk.out_end[e] > mk.inp[e + 1])) {
            untouched("execution marks missing or out of order");
            return;
        }
    }

    ggml_tensor ** nodes = ggml_graph_nodes(gf);
    const int      n     = ggml_graph_n_nodes(gf);
    const char *   base  = (const char *) ggml_get_mem_buffer(ctx);
    // The execution whose build created t (-1: none) and whether t is its group-combine part: a
    // function of the tensor's place in the context, so it holds after a range was reordered.
    auto exec_of = [&](const ggml_tensor * t, bool * tail) -> int {
        const size_t off = (size_t) ((const char *) t - base);
        *tail            = false;
        auto it          = std::upper_bound(mk.inp.begin(), mk.inp.end(), off);   // marks ascend (checked)
        if (it == mk.inp.begin()) return -1;
        const size_t e = (size_t) (it - mk.inp.begin()) - 1;
        if (off < mk.out_begin[e]) return (int) e;
        if (off < mk.out_end[e]) {
            *tail = true;
            return (int) e;
        }
        return -1;
    };

    std::vector<ggml_tensor *> original(nodes, nodes + n);
    std::vector<int>           member(n, -1), cls(n, 0);
    size_t                     done = 0;
    for (size_t e0 = 0; e0 < n_exec; ++e0) {
        const lrq_exec & first = l.exec[e0];
        if (!first.first || first.n_group < 2) continue;
        const int e1 = (int) (e0 + first.n_group);   // executions [e0, e1) are the members
        int       lo = n, hi = -1;
        bool      tail;
        for (int i = 0; i < n; ++i) {
            const int e = exec_of(nodes[i], &tail);
            if (e >= (int) e0 && e < e1) {
                lo = std::min(lo, i);
                hi = std::max(hi, i);
            }
        }
        if (hi < lo) continue;
        for (int i = lo; i <= hi; ++i) {
            const int  e    = exec_of(nodes[i], &tail);
            const bool mine = e >= (int) e0 && e < e1;
            member[i]       = mine ? e - (int) e0 : -1;
            cls[i]          = !mine ? 0 : tail ? 2 : 1;
        }
        if (!lrq_lockstep_range(nodes, lo, hi, member, cls)) {
            std::copy(original.begin(), original.end(), nodes);
            untouched("a group's nodes could not be sorted");
            return;
        }
        ++done;
    }
    if (!lrq_graph_is_topological(nodes, n)) {
        std::copy(original.begin(), original.end(), nodes);
        untouched("the reordered graph was not in dependency order");
        return;
    }
    lrq_log_changed(GGML_LOG_LEVEL_INFO,
                    format("lrq_lockstep: %zu of %zu parallel groups in lockstep, %d adjacent same-codes LRQ pairs",
                           done, n_groups, lrq_graph_shared_code_pairs(gf)));
}
