// lrq._native.kernels: pybind11 bindings of the C kernels (native/lrq, lrq-kernels.h).
// Bindings only validate shapes / dtypes and cast; all arithmetic is in the kernels.
#include "lrq-kernels.h"
#include "lrq-ggml.h"   // GGML_OP_LRQ_MUL_MAT: ggml_op runs it through ggml's CPU backend

#include "ggml-backend.h"
#include "ggml.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <ctime>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8Array  = py::array_t<uint8_t, py::array::c_style>;

std::string shape_str(const py::array & a) {
    std::ostringstream s;
    s << "[";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
    s << "]";
    return s.str();
}

[[noreturn]] void bad_shape(const char * name, const std::string & expected, const py::array & a) {
    throw py::value_error(std::string(name) + " must have shape " + expected + ", got " + shape_str(a));
}

lrq_mode parse_mode(const std::string & mode) {
    if (mode == "asym") return LRQ_MODE_ASYM;
    if (mode == "sym") return LRQ_MODE_SYM;
    if (mode == "ternary") return LRQ_MODE_TERNARY;
    throw py::value_error("mode must be 'asym', 'sym' or 'ternary', got '" + mode + "'");
}

lrq_scale_search parse_search(const std::string & s) {
    if (s == "minmax") return LRQ_SCALE_MINMAX;
    if (s == "mse") return LRQ_SCALE_MSE;
    throw py::value_error("scale_search must be 'minmax' or 'mse', got '" + s + "'");
}

void check_status(int rc, const char * what) {
    if (rc != LRQ_OK) throw py::value_error(std::string(what) + ": " + lrq_status_str(rc));
}

void check_params(int64_t n_in, int bits, lrq_mode mode, int group_size) {
    const int rc = lrq_check_params(n_in, bits, mode, group_size);
    if (rc == LRQ_ERR_N_IN) throw py::value_error("n_in = " + std::to_string(n_in) + " is not a positive multiple of 32");
    check_status(rc, "invalid quantization parameters");
}

// A float16 array (C-contiguous) as uint16 bits; numpy float16 only, no silent conversion.
py::array f16_array(const py::object & obj, const char * name) {
    py::array a = py::array::ensure(obj, py::array::c_style);
    if (!a) throw py::value_error(std::string(name) + " must be a numpy float16 array");
    if (a.dtype().kind() != 'f' || a.dtype().itemsize() != 2) {
        throw py::value_error(std::string(name) + " must have dtype float16, got " + std::string(py::str(a.dtype())));
    }
    return a;
}

const uint16_t * f16_ptr(const py::array & a) { return static_cast<const uint16_t *>(a.data()); }

py::array new_f16(std::vector<py::ssize_t> shape) { return py::array(py::dtype("float16"), shape); }

// The weight descriptor from (codes, d, m); keeps the arrays alive in `keep`.
struct WeightArgs {
    lrq_weight                w{};
    U8Array                   codes;
    py::array                 d, m;
    py::array                 sub;
};

// The two-level layout's sub-block indices (int8 or uint8 [n_out, n_in / B], B 16 or 32) -> wa.w.sub.
void attach_sub(WeightArgs & wa, const py::object & sub_obj) {
    if (sub_obj.is_none()) return;
    py::array a = py::array::ensure(sub_obj, py::array::c_style);
    if (!a || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u') || a.dtype().itemsize() != 1) {
        throw py::value_error("sub must be an int8 or uint8 array [n_out, n_in / 16 or n_in / 32]");
    }
    if (wa.w.bits != 2 || wa.w.mode != LRQ_MODE_ASYM) throw py::value_error("sub (the two-level layout) needs bits 2 and mode 'asym'");
    const int64_t n_in = wa.w.n_in, n_out = wa.w.n_out;
    if (a.ndim() != 2 || a.shape(0) != n_out || (a.shape(1) * 16 != n_in && a.shape(1) * 32 != n_in)) {
        bad_shape("sub", "[" + std::to_string(n_out) + ", " + std::to_string(n_in / 16) + "] or [" + std::to_string(n_out) +
                  ", " + std::to_string(n_in / 32) + "]", a);
    }
    wa.sub              = a;
    wa.w.sub            = static_cast<const uint8_t *>(a.data());
    wa.w.sub_row_stride = a.shape(1);
    wa.w.sub_size       = (int) (n_in / a.shape(1));
}

WeightArgs weight_args(const py::object & codes_obj, const py::object & d_obj, const py::object & m_obj, int bits,
                       int group_size, const std::string & mode_s) {
    WeightArgs  wa;
    const lrq_mode mode = parse_mode(mode_s);
    if (bits < 1 || bits > 4) throw py::value_error("bits must be 1..4, got " + std::to_string(bits));
    py::array codes = py::array::ensure(codes_obj, py::array::c_style);
    if (!codes || codes.dtype().kind() != 'u' || codes.dtype().itemsize() != 1) {
        throw py::value_error("codes must be a uint8 array [n_out, row_bytes]");
    }
    wa.codes = U8Array::ensure(codes);
    const int bb = 4 * bits;
    if (codes.ndim() != 2 || codes.shape(1) == 0 || codes.shape(1) % bb) {
        bad_shape("codes", "[n_out, n_in / 32 * " + std::to_string(bb) + "] (uint8, " + std::to_string(bits) + "-bit blocks)", codes);
    }
    const int64_t n_out = codes.shape(0), n_in = codes.shape(1) / bb * LRQ_QK;
    check_params(n_in, bits, mode, group_size);
    const int64_t ng  = lrq_n_groups(n_in, group_size);
    const std::string pshape = "[n_out, n_groups] = [" + std::to_string(n_out) + ", " + std::to_string(ng) + "]";
    wa.d = f16_array(d_obj, "d");
    if (wa.d.ndim() != 2 || wa.d.shape(0) != n_out || wa.d.shape(1) != ng) bad_shape("d", pshape, wa.d);
    if (mode == LRQ_MODE_ASYM) {
        if (m_obj.is_none()) throw py::value_error("m is required for mode 'asym' (float16 " + pshape + ")");
        wa.m = f16_array(m_obj, "m");
        if (wa.m.ndim() != 2 || wa.m.shape(0) != n_out || wa.m.shape(1) != ng) bad_shape("m", pshape, wa.m);
    } else if (!m_obj.is_none()) {
        throw py::value_error("m must be None for mode '" + mode_s + "' (only asym has a min)");
    }
    wa.w.codes           = wa.codes.data();
    wa.w.codes_row_bytes = (size_t) codes.shape(1);
    wa.w.n_in            = n_in;
    wa.w.n_out           = n_out;
    wa.w.bits            = bits;
    wa.w.mode            = mode;
    wa.w.group_size      = group_size;
    wa.w.d               = f16_ptr(wa.d);
    wa.w.d_row_stride    = ng;
    wa.w.m               = mode == LRQ_MODE_ASYM ? f16_ptr(wa.m) : nullptr;
    wa.w.m_row_stride    = ng;
    return wa;
}

struct ReplicaArgs {
    lrq_replica r{};
    py::array   alpha, beta;
    F32Array    gain, bias;
};

// alpha / beta: [n_out, n_groups] | [n_out, 1] | [1, 1] -> pointer + (row, group) strides, 0 = broadcast.
void per_group(const py::object & obj, const char * name, int64_t n_out, int64_t ng, py::array & keep,
               const uint16_t *& ptr, int64_t & rs, int64_t & gs) {
    if (obj.is_none()) return;
    keep = f16_array(obj, name);
    const std::string expected = "[n_out, n_groups] = [" + std::to_string(n_out) + ", " + std::to_string(ng) +
                                 "], [" + std::to_string(n_out) + ", 1] or [1, 1]";
    if (keep.ndim() != 2) bad_shape(name, expected, keep);
    const int64_t s0 = keep.shape(0), s1 = keep.shape(1);
    if (!((s0 == n_out || s0 == 1) && (s1 == ng || s1 == 1)) || (s0 == 1 && s1 != 1)) bad_shape(name, expected, keep);
    ptr = f16_ptr(keep);
    rs  = s0 == 1 ? 0 : s1;
    gs  = s1 == 1 ? 0 : 1;
}

void per_row(const py::object & obj, const char * name, int64_t n_out, F32Array & keep, const float *& ptr) {
    if (obj.is_none()) return;
    keep = F32Array::ensure(obj);
    if (!keep) throw py::value_error(std::string(name) + " must be a float array [n_out]");
    if (keep.ndim() != 1 || keep.shape(0) != n_out) bad_shape(name, "[n_out] = [" + std::to_string(n_out) + "]", keep);
    ptr = keep.data();
}

ReplicaArgs replica_args(const lrq_weight & w, const py::object & alpha, const py::object & beta, const py::object & gain,
                         const py::object & bias, double act_clip, int act_bits) {
    ReplicaArgs ra;
    lrq_replica_init(&ra.r);
    const int64_t ng = lrq_n_groups(w.n_in, w.group_size);
    per_group(alpha, "alpha", w.n_out, ng, ra.alpha, ra.r.alpha, ra.r.alpha_row_stride, ra.r.alpha_group_stride);
    per_group(beta, "beta", w.n_out, ng, ra.beta, ra.r.beta, ra.r.beta_row_stride, ra.r.beta_group_stride);
    per_row(gain, "gain", w.n_out, ra.gain, ra.r.gain);
    per_row(bias, "bias", w.n_out, ra.bias, ra.r.bias);
    if (!(act_clip > 0.0 && act_clip <= 1.0)) throw py::value_error("act_clip must be in (0, 1], got " + std::to_string(act_clip));
    if (act_bits != 0 && (act_bits < 2 || act_bits > 16)) {
        throw py::value_error("act_bits must be 0 (off) or 2..16, got " + std::to_string(act_bits));
    }
    ra.r.act_clip = (float) act_clip;
    ra.r.act_bits = act_bits;
    return ra;
}

double thread_cpu_s() {   // CPU time of this thread: what a loaded machine does not inflate (unlike wall time)
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

// The replicas of one weight for lrq_mul_mat_q8_multi: validated arguments, activation buffers and
// outputs.  xs[j] float32 [n_tok, n_in] (n_tok equal for all), replicas[j] a dict of mul_mat's
// replica arguments.
struct MultiCall {
    const lrq_weight &               w;
    std::vector<ReplicaArgs>         ra;
    std::vector<F32Array>            x;
    std::vector<char>                buf;
    std::vector<lrq_act_q8>          a;
    std::vector<const lrq_replica *> rp;
    std::vector<py::array_t<float>>  y;
    std::vector<float *>             yp;

    MultiCall(const lrq_weight & w_, const py::list & xs, const py::list & replicas) : w(w_) {
        const size_t n = xs.size();
        if (n < 1 || replicas.size() != n) throw py::value_error("xs and replicas must be lists of one length >= 1");
        for (size_t j = 0; j < n; ++j) {
            const py::dict p = replicas[j].cast<py::dict>();
            auto get = [&](const char * k) { return p.contains(k) ? py::object(p[k]) : py::object(py::none()); };
            for (auto item : p) {
                const std::string k = item.first.cast<std::string>();
                if (k != "alpha" && k != "beta" && k != "gain" && k != "bias" && k != "act_clip" && k != "act_bits") {
                    throw py::value_error("replica " + std::to_string(j) + ": unknown key '" + k + "'");
                }
            }
            ra.push_back(replica_args(w, get("alpha"), get("beta"), get("gain"), get("bias"),
                                      p.contains("act_clip") ? p["act_clip"].cast<double>() : 1.0,
                                      p.contains("act_bits") ? p["act_bits"].cast<int>() : 0));
            x.push_back(F32Array::ensure(xs[j]));
            if (!x[j] || x[j].ndim() != 2 || x[j].shape(1) != w.n_in || x[j].shape(0) != x[0].shape(0)) {
                throw py::value_error("xs[" + std::to_string(j) + "] must be float32 [n_tok, n_in] = [n_tok, " +
                                      std::to_string(w.n_in) + "], n_tok equal for all");
            }
        }
        const int64_t n_tok = x[0].shape(0);
        const int     gs = lrq_act_group_size(&w);
        const size_t  act_size = lrq_act_q8_size(n_tok, w.n_in, gs) + 32;
        buf.resize(act_size * n);
        a.resize(n);
        rp.resize(n);
        yp.resize(n);
        for (size_t j = 0; j < n; ++j) {
            lrq_act_q8_init(&a[j], buf.data() + j * act_size, n_tok, w.n_in, gs);
            rp[j] = &ra[j].r;
            y.emplace_back(std::vector<py::ssize_t>{(py::ssize_t) n_tok, (py::ssize_t) w.n_out});
            yp[j] = y[j].mutable_data();
        }
    }
    // Without the GIL.  fused: as the op runs a parallel group, members with equal activations share them.
    int quantize(bool fused) {
        for (size_t j = 0; j < x.size(); ++j) {
            const int rc = lrq_quantize_act_q8(x[j].data(), w.n_in, ra[j].r.act_clip, ra[j].r.act_bits, &a[j]);
            if (rc) return rc;
        }
        if (fused) lrq_act_q8_share(a.data(), (int) a.size());
        return LRQ_OK;
    }
    int run(bool fused) {
        if (a[0].n_tok == 0) return LRQ_OK;
        if (fused) return lrq_mul_mat_q8_multi(&w, (int) a.size(), rp.data(), a.data(), yp.data(), w.n_out, 0, w.n_out);
        for (size_t j = 0; j < a.size(); ++j) {
            const int rc = lrq_mul_mat_q8(&w, rp[j], &a[j], yp[j], w.n_out, 0, w.n_out);
            if (rc) return rc;
        }
        return LRQ_OK;
    }
};

}  // namespace

void lrq_register_kernels(py::module_ & parent) {
    py::module_ m = parent.def_submodule("kernels", "LRQ CPU kernels (native/lrq): quantizer, dequantizer, mat-mul");

    m.def("info", []() {
        py::dict d;
        d["simd"] = lrq_kernels_simd();
        return d;
    }, "{'simd': 'avx2' | 'generic'}: the implementation impl='fast' uses on this CPU.");

    m.def("fp32_to_fp16", [](const F32Array & x) {
        py::array_t<uint16_t> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        const float * p = x.data();
        uint16_t *    o = out.mutable_data();
        for (py::ssize_t i = 0; i < x.size(); ++i) o[i] = lrq_fp32_to_fp16(p[i]);
        return out;
    }, py::arg("x"), "fp16 bit patterns (uint16) of float32 values, round to nearest even.");

    m.def("fp16_to_fp32", [](const py::array_t<uint16_t, py::array::c_style> & h) {
        py::array_t<float> out(std::vector<py::ssize_t>(h.shape(), h.shape() + h.ndim()));
        const uint16_t * p = h.data();
        float *          o = out.mutable_data();
        for (py::ssize_t i = 0; i < h.size(); ++i) o[i] = lrq_fp16_to_fp32(p[i]);
        return out;
    }, py::arg("h"), "float32 values of fp16 bit patterns (uint16).");

    m.def("pack", [](const py::array_t<uint8_t, py::array::c_style> & q, int bits) {
        if (bits < 1 || bits > 4) throw py::value_error("bits must be 1..4, got " + std::to_string(bits));
        if (q.ndim() != 2 || q.shape(1) % LRQ_QK) bad_shape("q", "[n_rows, n_in] with n_in a multiple of 32", q);
        const int64_t n_in = q.shape(1);
        for (py::ssize_t i = 0; i < q.size(); ++i) {
            if (q.data()[i] >> bits) throw py::value_error("q: code " + std::to_string(q.data()[i]) + " does not fit in " + std::to_string(bits) + " bits");
        }
        py::array_t<uint8_t> out({q.shape(0), (py::ssize_t) lrq_row_bytes(n_in, bits)});
        for (py::ssize_t r = 0; r < q.shape(0); ++r) {
            lrq_pack_row(q.data() + r * n_in, n_in, bits, out.mutable_data() + r * out.shape(1));
        }
        return out;
    }, py::arg("q"), py::arg("bits"), "Planar packing of codes uint8 [n_rows, n_in].");

    m.def("unpack", [](const py::array_t<uint8_t, py::array::c_style> & codes, int bits, int64_t n_in) {
        if (bits < 1 || bits > 4) throw py::value_error("bits must be 1..4, got " + std::to_string(bits));
        if (n_in <= 0 || n_in % LRQ_QK) throw py::value_error("n_in must be a positive multiple of 32, got " + std::to_string(n_in));
        const py::ssize_t rb = (py::ssize_t) lrq_row_bytes(n_in, bits);
        if (codes.ndim() != 2 || codes.shape(1) != rb) bad_shape("codes", "[n_rows, " + std::to_string(rb) + "]", codes);
        py::array_t<uint8_t> out({codes.shape(0), (py::ssize_t) n_in});
        for (py::ssize_t r = 0; r < codes.shape(0); ++r) {
            lrq_unpack_row(codes.data() + r * rb, n_in, bits, out.mutable_data() + r * n_in);
        }
        return out;
    }, py::arg("codes"), py::arg("bits"), py::arg("n_in"), "Inverse of pack.");

    m.def("quantize", [](const F32Array & w, int bits, int group_size, const std::string & mode_s,
                         const std::string & search_s) {
        const lrq_mode         mode   = parse_mode(mode_s);
        const lrq_scale_search search = parse_search(search_s);
        if (w.ndim() != 2) bad_shape("w", "[n_out, n_in]", w);
        const int64_t n_out = w.shape(0), n_in = w.shape(1);
        check_params(n_in, bits, mode, group_size);
        const int64_t ng = lrq_n_groups(n_in, group_size);
        const size_t  rb = lrq_row_bytes(n_in, bits);
        py::array_t<uint8_t> codes({(py::ssize_t) n_out, (py::ssize_t) rb});
        py::array d = new_f16({(py::ssize_t) n_out, (py::ssize_t) ng});
        py::object m_out = py::none();
        uint16_t * mp = nullptr;
        if (mode == LRQ_MODE_ASYM) {
            py::array m = new_f16({(py::ssize_t) n_out, (py::ssize_t) ng});
            mp    = static_cast<uint16_t *>(m.mutable_data());
            m_out = m;
        }
        const float * wp = w.data();
        uint8_t *     cp = codes.mutable_data();
        uint16_t *    dp = static_cast<uint16_t *>(d.mutable_data());
        int           rc = LRQ_OK;
        {
            py::gil_scoped_release nogil;
            for (int64_t o = 0; o < n_out && rc == LRQ_OK; ++o) {
                rc = lrq_quantize_row_ref(wp + o * n_in, n_in, bits, mode, group_size, search, cp + o * rb, dp + o * ng,
                                          mp ? mp + o * ng : nullptr);
            }
        }
        check_status(rc, "quantize");
        return py::make_tuple(codes, d, m_out);
    }, py::arg("w"), py::arg("bits"), py::arg("group_size"), py::arg("mode") = "asym", py::arg("scale_search") = "minmax",
       "(codes uint8 [n_out, row_bytes], d float16 [n_out, n_groups], m float16 | None) of w [n_out, n_in];\n"
       "byte-exact with lrq.quant.quantize(rounding='nearest', noise=0).");

    m.def("quantize_two_level", [](const F32Array & w, int super_size, int sub_size, const py::object & imp_obj) {
        if (w.ndim() != 2) bad_shape("w", "[n_out, n_in]", w);
        const int64_t n_out = w.shape(0), n_in = w.shape(1);
        check_params(n_in, 2, LRQ_MODE_ASYM, super_size);
        if (sub_size != 16 && sub_size != 32) throw py::value_error("sub_size must be 16 or 32, got " + std::to_string(sub_size));
        F32Array imp;
        if (!imp_obj.is_none()) {
            imp = F32Array::ensure(imp_obj);
            if (!imp || imp.ndim() != 1 || imp.shape(0) != n_in) throw py::value_error("importance must be a float array [n_in]");
        }
        const int64_t ns = lrq_n_groups(n_in, super_size), nk = n_in / sub_size;
        const size_t  rb = lrq_row_bytes(n_in, 2);
        py::array_t<uint8_t> codes({(py::ssize_t) n_out, (py::ssize_t) rb});
        py::array d = new_f16({(py::ssize_t) n_out, (py::ssize_t) ns}), dmin = new_f16({(py::ssize_t) n_out, (py::ssize_t) ns});
        py::array_t<int8_t> sub({(py::ssize_t) n_out, (py::ssize_t) nk});
        const float * wp = w.data();
        const float * ip = imp_obj.is_none() ? nullptr : imp.data();
        uint8_t *     cp = codes.mutable_data();
        uint16_t *    dp = static_cast<uint16_t *>(d.mutable_data());
        uint16_t *    mp = static_cast<uint16_t *>(dmin.mutable_data());
        uint8_t *     sp = reinterpret_cast<uint8_t *>(sub.mutable_data());
        int           rc = LRQ_OK;
        {
            py::gil_scoped_release nogil;
            for (int64_t o = 0; o < n_out && rc == LRQ_OK; ++o) {
                rc = lrq_quantize_row_two_level_ref(wp + o * n_in, n_in, super_size, sub_size, ip, cp + o * rb, dp + o * ns,
                                                    mp + o * ns, sp + o * nk);
            }
        }
        check_status(rc, "quantize_two_level");
        return py::make_tuple(codes, d, dmin, sub);
    }, py::arg("w"), py::arg("super_size") = 256, py::arg("sub_size") = 16, py::arg("importance") = py::none(),
       "(LRQ2 codes uint8 [n_out, n_in / 4], d, dmin float16 [n_out, n_super], sub int8 [n_out, n_in / sub_size]) of w;\n"
       "byte-exact with lrq.quant_two_level.to_file(quantize(w, importance, super_size=..., sub_size=...)).");

    m.def("dequantize", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                           int group_size, const std::string & mode, const py::object & alpha, const py::object & beta,
                           const py::object & gain, const py::object & sub) {
        WeightArgs  wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        attach_sub(wa, sub);
        ReplicaArgs ra = replica_args(wa.w, alpha, beta, gain, py::none(), 1.0, 0);
        py::array_t<float> out({(py::ssize_t) wa.w.n_out, (py::ssize_t) wa.w.n_in});
        float * op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            for (int64_t o = 0; o < wa.w.n_out; ++o) lrq_dequantize_row_ref(&wa.w, &ra.r, o, op + o * wa.w.n_in);
        }
        return out;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"),
       py::arg("alpha") = py::none(), py::arg("beta") = py::none(), py::arg("gain") = py::none(),
       py::arg("sub") = py::none(),
       "float32 W_r [n_out, n_in] = gain * (alpha * d * (level(q) + beta) + m).\n"
       "sub: the two-level layout's sub-block indices (then d / m are the super-block d / dmin).");

    m.def("mul_mat", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                        int group_size, const std::string & mode, const F32Array & x, const py::object & alpha,
                        const py::object & beta, const py::object & gain, const py::object & bias, double act_clip,
                        int act_bits, const std::string & impl, int64_t row0, std::optional<int64_t> row1_opt,
                        const py::object & sub) {
        WeightArgs  wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        attach_sub(wa, sub);
        ReplicaArgs ra = replica_args(wa.w, alpha, beta, gain, bias, act_clip, act_bits);
        if (x.ndim() != 2 || x.shape(1) != wa.w.n_in) bad_shape("x", "[n_tok, n_in] = [n_tok, " + std::to_string(wa.w.n_in) + "]", x);
        const int64_t row1 = row1_opt ? *row1_opt : wa.w.n_out;
        if (row0 < 0 || row0 > row1 || row1 > wa.w.n_out) {
            throw py::value_error("row range [" + std::to_string(row0) + ", " + std::to_string(row1) + ") is not within [0, " +
                                  std::to_string(wa.w.n_out) + "]");
        }
        decltype(&lrq_mul_mat_ref) fn = nullptr;
        lrq_mul_mat_q8_fn          q8 = nullptr;
        if (impl == "ref") fn = &lrq_mul_mat_ref;
        else if (impl == "fast") fn = &lrq_mul_mat;
        else if (impl == "generic" || impl == "avx2" || impl == "avx512") {
            q8 = lrq_mul_mat_q8_impl(impl.c_str());
            if (!q8) throw py::value_error("impl '" + impl + "' is not available in this build or on this CPU");
        } else throw py::value_error("impl must be 'ref', 'fast', 'generic', 'avx2' or 'avx512', got '" + impl + "'");
        const int64_t n_tok = x.shape(0);
        py::array_t<float> y({(py::ssize_t) n_tok, (py::ssize_t) (row1 - row0)});
        const float * xp = x.data();
        float *       yp = y.mutable_data();
        int           rc = LRQ_OK;
        {
            py::gil_scoped_release nogil;
            if (fn) {
                rc = fn(&wa.w, &ra.r, xp, wa.w.n_in, n_tok, yp, row1 - row0, row0, row1);
            } else if (n_tok > 0) {   // one q8 kernel by name, whatever lrq_mul_mat_q8 would pick
                const int gs = lrq_act_group_size(&wa.w);
                std::vector<char> buf(lrq_act_q8_size(n_tok, wa.w.n_in, gs) + 32);
                lrq_act_q8 a;
                lrq_act_q8_init(&a, buf.data(), n_tok, wa.w.n_in, gs);
                rc = lrq_quantize_act_q8(xp, wa.w.n_in, ra.r.act_clip, ra.r.act_bits, &a);
                if (!rc) rc = q8(&wa.w, &ra.r, &a, yp, row1 - row0, row0, row1);
            }
        }
        check_status(rc, "mul_mat");
        return y;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"), py::arg("x"),
       py::arg("alpha") = py::none(), py::arg("beta") = py::none(), py::arg("gain") = py::none(),
       py::arg("bias") = py::none(), py::arg("act_clip") = 1.0, py::arg("act_bits") = 0, py::arg("impl") = "ref",
       py::arg("row0") = 0, py::arg("row1") = py::none(), py::arg("sub") = py::none(),
       "y float32 [n_tok, row1 - row0] = act_r(x) . W_r[row0:row1]^T + bias.\n"
       "impl: 'ref' (double), 'fast' (int8 activations, the best kernel for this CPU), 'generic' (the same, portable C),\n"
       "'avx2' / 'avx512' (that kernel; ValueError where unavailable; 'avx512': 2-bit codes only, LRQ2 or two-level).");

    m.def("mul_mat_multi", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                              int group_size, const std::string & mode, const py::list & xs, const py::list & replicas,
                              bool fused, const py::object & sub) {
        WeightArgs wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        attach_sub(wa, sub);
        MultiCall mc(wa.w, xs, replicas);
        int       rc = LRQ_OK;
        {
            py::gil_scoped_release nogil;
            rc = mc.quantize(fused);
            if (!rc) rc = mc.run(fused);
        }
        check_status(rc, "mul_mat_multi");
        py::list out;
        for (auto & yj : mc.y) out.append(yj);
        return out;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"),
       py::arg("xs"), py::arg("replicas"), py::arg("fused") = true, py::arg("sub") = py::none(),
       "The replicas of one weight at once: [y_j float32 [n_tok, n_out]] for xs[j] and replicas[j] (a dict of\n"
       "alpha, beta, gain, bias, act_clip, act_bits, as mul_mat takes them).  fused=True: as the op runs a parallel\n"
       "group, lrq_act_q8_share then lrq_mul_mat_q8_multi (one pass over the codes for all replicas where the kernel\n"
       "shares it; replicas with equal activations share their dots); False: lrq_mul_mat_q8 per replica.");

    m.def("bench_mul_mat_multi", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                                    int group_size, const std::string & mode, const py::list & xs,
                                    const py::list & replicas, bool fused, int reps) {
        WeightArgs wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        if (reps < 1) throw py::value_error("reps must be >= 1");
        MultiCall mc(wa.w, xs, replicas);
        int       rc = LRQ_OK;
        double    t_mm = 0.0;
        {
            py::gil_scoped_release nogil;
            rc = mc.quantize(fused);
            if (!rc) rc = mc.run(fused);   // weights into the caches
            const double t0 = thread_cpu_s();
            for (int i = 0; i < reps && !rc; ++i) rc = mc.run(fused);
            t_mm = (thread_cpu_s() - t0) / reps;
        }
        check_status(rc, "bench_mul_mat_multi");
        return t_mm;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"),
       py::arg("xs"), py::arg("replicas"), py::arg("fused") = true, py::arg("reps") = 100,
       "Thread CPU seconds per mul_mat_multi call over all rows (activations quantized once, outside the timed\n"
       "loop; one warm-up call).  For bench/kernels.py --replicas.");

    m.def("quantize_act_q8", [](const F32Array & x, int group_size, double act_clip, int act_bits) {
        if (x.ndim() != 2) bad_shape("x", "[n_tok, n_in]", x);
        const int64_t n_tok = x.shape(0), n_in = x.shape(1);
        if (n_in <= 0 || n_in % 32) throw py::value_error("n_in = " + std::to_string(n_in) + " is not a positive multiple of 32");
        if (group_size != 16 && (group_size <= 0 || group_size % 32)) throw py::value_error("bad group_size");
        const int64_t      nb = n_in / 32, ng = lrq_n_groups(n_in, group_size);
        std::vector<char>  buf(lrq_act_q8_size(n_tok, n_in, group_size) + 32);
        lrq_act_q8         a;
        lrq_act_q8_init(&a, buf.data(), n_tok, n_in, group_size);
        check_status(lrq_quantize_act_q8(x.data(), n_in, (float) act_clip, act_bits, &a), "quantize_act_q8");
        py::array_t<int8_t> qs({(py::ssize_t) n_tok, (py::ssize_t) n_in});
        py::array_t<float>  dx({(py::ssize_t) n_tok, (py::ssize_t) nb}), sx({(py::ssize_t) n_tok, (py::ssize_t) ng});
        std::memcpy(qs.mutable_data(), a.qs, (size_t) (n_tok * n_in));
        std::memcpy(dx.mutable_data(), a.dx, (size_t) (n_tok * nb) * sizeof(float));
        std::memcpy(sx.mutable_data(), a.sx, (size_t) (n_tok * ng) * sizeof(float));
        return py::make_tuple(qs, dx, sx);
    }, py::arg("x"), py::arg("group_size"), py::arg("act_clip") = 1.0, py::arg("act_bits") = 0,
       "lrq_quantize_act_q8: (qs int8 [n_tok, n_in], dx float32 [n_tok, n_in / 32], sx float32 [n_tok, n_groups]).");

    m.def("bench_mul_mat_q8", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                                 int group_size, const std::string & mode, const F32Array & x, const std::string & impl,
                                 int reps, bool warmup, const py::object & sub) {
        WeightArgs wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        attach_sub(wa, sub);
        if (x.ndim() != 2 || x.shape(1) != wa.w.n_in) bad_shape("x", "[n_tok, n_in] = [n_tok, " + std::to_string(wa.w.n_in) + "]", x);
        if (reps < 1) throw py::value_error("reps must be >= 1");
        lrq_mul_mat_q8_fn q8 = impl == "fast" ? &lrq_mul_mat_q8 : lrq_mul_mat_q8_impl(impl.c_str());
        if (!q8) throw py::value_error("impl '" + impl + "' is not available in this build or on this CPU");
        const int64_t n_tok = x.shape(0), n_out = wa.w.n_out;
        const int     gs    = lrq_act_group_size(&wa.w);
        std::vector<char>  buf(lrq_act_q8_size(n_tok, wa.w.n_in, gs) + 32);
        std::vector<float> y((size_t) (n_tok * n_out));
        lrq_act_q8         a;
        lrq_act_q8_init(&a, buf.data(), n_tok, wa.w.n_in, gs);
        auto cpu = thread_cpu_s;
        int    rc = LRQ_OK;
        double t_act = 0.0, t_mm = 0.0;
        {
            py::gil_scoped_release nogil;
            rc = lrq_quantize_act_q8(x.data(), wa.w.n_in, 1.0f, 0, &a);
            if (!rc && warmup) rc = q8(&wa.w, nullptr, &a, y.data(), n_out, 0, n_out);   // weights into the caches
            double t0 = cpu();
            for (int i = 0; i < reps && !rc; ++i) rc = lrq_quantize_act_q8(x.data(), wa.w.n_in, 1.0f, 0, &a);
            double t1 = cpu();
            for (int i = 0; i < reps && !rc; ++i) rc = q8(&wa.w, nullptr, &a, y.data(), n_out, 0, n_out);
            double t2 = cpu();
            t_act = (t1 - t0) / reps;
            t_mm  = (t2 - t1) / reps;
        }
        check_status(rc, "bench_mul_mat_q8");
        py::dict out;
        out["kernel_s"] = t_mm;
        out["act_s"]    = t_act;
        return out;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"), py::arg("x"),
       py::arg("impl") = "fast", py::arg("reps") = 100, py::arg("warmup") = true, py::arg("sub") = py::none(),
       "Thread CPU seconds per call of one q8 mat-mul kernel (impl: 'fast' = lrq_mul_mat_q8's choice, 'generic', 'avx2',\n"
       "'avx512') over all rows, and of the activation quantization, after one warm-up call (warmup=False: none, so\n"
       "that a weight not in the caches is read from memory as in a model's decode); default replica.\n"
       "For bench/kernels.py: no Python or allocation inside the timed loops.");

    m.def("ggml_op", [](const py::object & codes, const py::object & d, const py::object & m_obj, int bits,
                        int group_size, const std::string & mode, const F32Array & x, const py::object & alpha,
                        const py::object & beta, const py::object & gain, const py::object & bias, double act_clip,
                        int act_bits, int n_threads, bool use_ref, const py::object & sub) {
        // the same validation as mul_mat, so that the op's own asserts never fire from Python
        WeightArgs  wa = weight_args(codes, d, m_obj, bits, group_size, mode);
        attach_sub(wa, sub);
        ReplicaArgs ra = replica_args(wa.w, alpha, beta, gain, bias, act_clip, act_bits);
        if (x.ndim() != 2 || x.shape(1) != wa.w.n_in) bad_shape("x", "[n_tok, n_in] = [n_tok, " + std::to_string(wa.w.n_in) + "]", x);
        if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
        const int64_t n_in = wa.w.n_in, n_out = wa.w.n_out, n_tok = x.shape(0), ng = lrq_n_groups(n_in, group_size);
        if (n_tok < 1) throw py::value_error("x needs at least one token");

        size_t data = (size_t) n_out * lrq_row_bytes(n_in, bits) + (size_t) n_tok * (n_in + n_out) * 4 +
                      4 * (size_t) n_out * ng * 2 + 2 * (size_t) n_out * 4 + (size_t) n_out * n_in / 16 + 64;
        ggml_init_params ip = { data + 16 * ggml_tensor_overhead() + ggml_graph_overhead() + 16 * 64, nullptr, false };
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) throw std::runtime_error("ggml_init failed");
        auto f16_tensor = [&](const py::array & a) -> ggml_tensor * {
            // numpy [s0, s1] -> ggml [s1, s0]
            ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, a.shape(1), a.shape(0));
            std::memcpy(t->data, a.data(), ggml_nbytes(t));
            return t;
        };
        auto f32_tensor = [&](const float * p, int64_t n) -> ggml_tensor * {
            ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
            std::memcpy(t->data, p, ggml_nbytes(t));
            return t;
        };
        ggml_tensor * tw = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + bits - 1), n_in, n_out);
        std::memcpy(tw->data, wa.w.codes, ggml_nbytes(tw));
        ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_in, n_tok);
        std::memcpy(tx->data, x.data(), ggml_nbytes(tx));
        ggml_tensor * td = f16_tensor(wa.d);
        ggml_tensor * tm = wa.w.m ? f16_tensor(wa.m) : nullptr;
        ggml_tensor * ta = ra.r.alpha ? f16_tensor(ra.alpha) : nullptr;
        ggml_tensor * tb = ra.r.beta ? f16_tensor(ra.beta) : nullptr;
        ggml_tensor * tg = ra.r.gain ? f32_tensor(ra.r.gain, n_out) : nullptr;
        ggml_tensor * tc = ra.r.bias ? f32_tensor(ra.r.bias, n_out) : nullptr;
        ggml_tensor * tk = nullptr;
        if (act_clip != 1.0 || act_bits != 0) {
            const float ck[2] = { ra.r.act_clip, (float) act_bits };
            tk = f32_tensor(ck, 2);
        }
        ggml_tensor * ts = nullptr;
        if (wa.w.sub) {
            ts = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, wa.w.sub_row_stride, n_out);
            std::memcpy(ts->data, wa.w.sub, ggml_nbytes(ts));
        }
        ggml_tensor * y  = ggml_lrq_mul_mat_two_level(ctx, tw, tx, td, tm, ts, ta, tb, tg, tc, tk, group_size, wa.w.mode);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        // The CPU backend is a module (the ggml-cpu variant loaded for this CPU, module.cpp), so
        // the graph goes through the backend API; the CPU backend computes tensors in plain memory.
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_t     be  = dev ? ggml_backend_dev_init(dev, nullptr) : nullptr;
        if (!be) {
            ggml_free(ctx);
            throw std::runtime_error("no ggml CPU backend is loaded");
        }
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto set_n_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
        auto set_use_ref   = (void (*)(ggml_backend_t, bool)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref");
        if (!set_n_threads || !set_use_ref) {
            ggml_backend_free(be);
            ggml_free(ctx);
            throw std::runtime_error("the ggml CPU backend lacks ggml_backend_set_n_threads / ggml_backend_cpu_set_use_ref");
        }
        set_n_threads(be, n_threads);
        set_use_ref(be, use_ref);
        ggml_status st;
        {
            py::gil_scoped_release nogil;
            st = ggml_backend_graph_compute(be, gf);
        }
        ggml_backend_free(be);
        py::array_t<float> out({(py::ssize_t) n_tok, (py::ssize_t) n_out});
        std::memcpy(out.mutable_data(), y->data, ggml_nbytes(y));
        ggml_free(ctx);
        if (st != GGML_STATUS_SUCCESS) throw std::runtime_error("ggml_backend_graph_compute failed");
        return out;
    }, py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), py::arg("group_size"), py::arg("mode"), py::arg("x"),
       py::arg("alpha") = py::none(), py::arg("beta") = py::none(), py::arg("gain") = py::none(),
       py::arg("bias") = py::none(), py::arg("act_clip") = 1.0, py::arg("act_bits") = 0, py::arg("n_threads") = 1,
       py::arg("use_ref") = false, py::arg("sub") = py::none(),
       "GGML_OP_LRQ_MUL_MAT on the loaded ggml CPU backend variant (a one-node graph, n_threads threads): y float32 [n_tok, n_out].\n"
       "use_ref: ggml's reference mode (the op then runs lrq_mul_mat_ref per chunk).");
}
