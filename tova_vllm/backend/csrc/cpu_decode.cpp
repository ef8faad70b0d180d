// One decode wave on the CPU, reading the kept slots in place
// (tova_vllm/backend/cpu_decode.py builds and calls it).
//
// Per row r (one token of one request) and KV head h: the G query heads of h
// attend over the row's `held[r]` kept slots, read through its block ids
// straight from the page (slot-major: slot s, head h is the cell
// (s * Hkv + h) * C of `slots`, holding K, V and the side channel), and over
// the token's own K/V; the output goes to the token's output row. Two passes
// over the kept slots (keys, then values); nothing is gathered.
//
// Optionally (`probs` / `positions` defined) the kernel also returns, per row,
// KV head and candidate column, the probabilities summed over the head's query
// group and the slots' true positions, in the PyTorch path's column layout:
// columns 0 .. n-1 are the row's slots in block order (those from `held` on
// are 0 / -1), column n is the new token. With `select`, it also chooses and
// writes for every row (TOVA's rule, one process holding every head): a row
// below its budget writes its new token to its free slot `held`; a full row
// evicts the column with the lowest probability averaged over all query heads
// (ties: the lowest column, the new token last, as torch.argmin over the
// PyTorch path's columns) and writes the new token over it, or nowhere when
// the new token itself ranks lowest. Arithmetic in float32.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* __restrict v, float* __restrict acc, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += a * static_cast<float>(v[i]);
}

struct Shape {
  int64_t rows, hq, hkv, group, d, cell, block_size, nb, cols;
};

template <typename Q, typename C>
struct Wave {
  const Q* q;
  const Q* k;
  const Q* v;
  Q* out;
  C* slots;
  const int64_t* tokens;
  const int64_t* blocks;
  const int64_t* held;
  const int64_t* budgets;
  const int64_t* new_pos;
  float* probs;       // [R, Hkv, cols] or null
  int32_t* positions; // [R, Hkv, cols] or null
  int64_t q_stride0, q_stride1, k_stride0, k_stride1, v_stride0, v_stride1, o_stride0, o_stride1;
  float scale;
  Shape s;

  inline C* cell(int64_t r, int64_t j, int64_t h) const {
    const int64_t slot = blocks[r * s.nb + j / s.block_size] * s.block_size + j % s.block_size;
    return slots + (slot * s.hkv + h) * s.cell;
  }

  // f(j, cell) for row r's first n slot columns and KV head h, block by block.
  template <typename F>
  inline void for_each_slot(int64_t r, int64_t h, int64_t n, F&& f) const {
    const int64_t step = s.hkv * s.cell;
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += s.block_size, ++b) {
      const C* c = slots + (blocks[r * s.nb + b] * s.block_size * s.hkv + h) * s.cell;
      const int64_t len = std::min(s.block_size, n - j0);
      for (int64_t o = 0; o < len; ++o, c += step) f(j0 + o, c);
    }
  }

  // Attention of row r's query heads of KV head h; the group's summed
  // probabilities into `psum` (held + 1 floats: the slots, then the new token).
  void attend(int64_t r, int64_t h, std::vector<float>& logits, std::vector<float>& qf, std::vector<float>& acc,
              float* psum) const {
    const int64_t n = held[r], g = s.group, d = s.d, tok = tokens[r];
    const int64_t m = n + 1;
    logits.resize(g * m);
    qf.resize(g * d);
    acc.assign(g * d, 0.f);
    for (int64_t i = 0; i < g; ++i) {
      const Q* qi = q + tok * q_stride0 + (h * g + i) * q_stride1;
      for (int64_t e = 0; e < d; ++e) qf[i * d + e] = static_cast<float>(qi[e]) * scale;
    }
    int32_t* pos_out = positions != nullptr ? positions + (r * s.hkv + h) * s.cols : nullptr;
    for_each_slot(r, h, n, [&](int64_t j, const C* kj) {
      for (int64_t i = 0; i < g; ++i) logits[i * m + j] = dot(&qf[i * d], kj, d);
      if (pos_out != nullptr) std::memcpy(&pos_out[j], kj + 2 * d, sizeof(int32_t));  // the side channel's first word
    });
    const Q* k_new = k + tok * k_stride0 + h * k_stride1;
    for (int64_t i = 0; i < g; ++i) logits[i * m + n] = dot(&qf[i * d], k_new, d);
    for (int64_t j = 0; j < m; ++j) psum[j] = 0.f;
    for (int64_t i = 0; i < g; ++i) {
      float* li = &logits[i * m];
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < m; ++j) mx = std::max(mx, li[j]);
      float total = 0.f;
      for (int64_t j = 0; j < m; ++j) {
        li[j] = std::exp(li[j] - mx);
        total += li[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < m; ++j) {
        li[j] *= inv;
        psum[j] += li[j];
      }
    }
    for_each_slot(r, h, n, [&](int64_t j, const C* c) {
      for (int64_t i = 0; i < g; ++i) axpy(logits[i * m + j], c + d, &acc[i * d], d);
    });
    const Q* v_new = v + tok * v_stride0 + h * v_stride1;
    for (int64_t i = 0; i < g; ++i) {
      axpy(logits[i * m + n], v_new, &acc[i * d], d);
      Q* oi = out + tok * o_stride0 + (h * g + i) * o_stride1;
      for (int64_t e = 0; e < d; ++e) oi[e] = static_cast<Q>(acc[i * d + e]);
    }
  }

  // Row r's new token (K, V, side channel) into slot column j of its blocks.
  void write(int64_t r, int64_t j) const {
    const int64_t d = s.d, tok = tokens[r];
    for (int64_t h = 0; h < s.hkv; ++h) {
      C* c = cell(r, j, h);
      const Q* kn = k + tok * k_stride0 + h * k_stride1;
      const Q* vn = v + tok * v_stride0 + h * v_stride1;
      for (int64_t e = 0; e < d; ++e) {
        c[e] = static_cast<C>(kn[e]);
        c[d + e] = static_cast<C>(vn[e]);
      }
      char* side = reinterpret_cast<char*>(c + 2 * d);
      std::memset(side, 0, (s.cell - 2 * d) * sizeof(C));
      const int32_t pos = static_cast<int32_t>(new_pos[r]);
      std::memcpy(side, &pos, sizeof(pos));
    }
  }
};

template <typename Q, typename C>
void run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slots,
         int64_t block_size, const at::Tensor& tokens, const at::Tensor& blocks, const at::Tensor& held,
         const at::Tensor& budgets, const at::Tensor& new_positions, double scale, const at::Tensor& output,
         const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& positions, bool select) {
  Wave<Q, C> w;
  w.s.rows = tokens.size(0);
  w.s.hq = query.size(1);
  w.s.d = query.size(2);
  w.s.hkv = key.size(1);
  w.s.group = w.s.hq / w.s.hkv;
  w.s.cell = slots.size(2);
  w.s.block_size = block_size;
  w.s.nb = blocks.size(1);
  w.s.cols = w.s.nb * block_size + 1;
  w.q = query.data_ptr<Q>();
  w.k = key.data_ptr<Q>();
  w.v = value.data_ptr<Q>();
  w.out = output.data_ptr<Q>();
  w.slots = slots.data_ptr<C>();
  w.tokens = tokens.data_ptr<int64_t>();
  w.blocks = blocks.data_ptr<int64_t>();
  w.held = held.data_ptr<int64_t>();
  w.budgets = budgets.data_ptr<int64_t>();
  w.new_pos = new_positions.data_ptr<int64_t>();
  w.q_stride0 = query.stride(0), w.q_stride1 = query.stride(1);
  w.k_stride0 = key.stride(0), w.k_stride1 = key.stride(1);
  w.v_stride0 = value.stride(0), w.v_stride1 = value.stride(1);
  w.o_stride0 = output.stride(0), w.o_stride1 = output.stride(1);
  w.scale = static_cast<float>(scale);
  w.probs = probs.has_value() ? probs->data_ptr<float>() : nullptr;
  w.positions = positions.has_value() ? positions->data_ptr<int32_t>() : nullptr;
  const Shape s = w.s;
  // Each (row, KV head)'s summed probabilities, for the caller or the selection.
  std::vector<float> local;
  float* psum = w.probs;
  if (psum == nullptr && select) {
    local.assign(s.rows * s.hkv * s.cols, 0.f);
    psum = local.data();
  }
  at::parallel_for(0, s.rows * s.hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits, qf, acc, scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / s.hkv, h = item % s.hkv, n = w.held[r];
      float* row = psum != nullptr ? psum + item * s.cols : nullptr;
      if (row == nullptr) scratch.resize(n + 1), row = scratch.data();
      w.attend(r, h, logits, qf, acc, row);
      if (psum != nullptr && n < s.cols - 1) {
        // The PyTorch path's layout: the new token in the last column, the
        // columns between the held slots and it empty.
        row[s.cols - 1] = row[n];
        std::fill(row + n, row + s.cols - 1, 0.f);
      }
      if (w.positions != nullptr) {
        int32_t* pos = w.positions + item * s.cols;
        std::fill(pos + n, pos + s.cols - 1, -1);
        pos[s.cols - 1] = static_cast<int32_t>(w.new_pos[r]);
      }
    }
  });
  if (!select) return;
  // Every head of every row has attended: now each row's write.
  at::parallel_for(0, s.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = w.held[r];
      if (n < w.budgets[r]) {
        w.write(r, n);
        continue;
      }
      int64_t victim = -1;
      float best = std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= n; ++j) {
        const int64_t col = j < n ? j : s.cols - 1;
        float p = 0.f;
        for (int64_t h = 0; h < s.hkv; ++h) p += psum[(r * s.hkv + h) * s.cols + col];
        p /= static_cast<float>(s.hq);
        if (p < best) best = p, victim = j;
      }
      if (victim >= 0 && victim < n) w.write(r, victim);  // else the new token goes nowhere
    }
  });
}

// float32, bfloat16 and float16 for the model's and the cache's dtype.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "tova cpu decode: unsupported dtype ", t);
  }
}

}  // namespace

void decode_wave(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slots,
                 int64_t block_size, const at::Tensor& tokens, const at::Tensor& blocks, const at::Tensor& held,
                 const at::Tensor& budgets, const at::Tensor& new_positions, double scale, const at::Tensor& output,
                 const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& positions, bool select) {
  TORCH_CHECK(query.device().is_cpu() && slots.device().is_cpu(), "tova cpu decode: CPU tensors only");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3 && output.dim() == 3 && slots.dim() == 3,
              "tova cpu decode: query/key/value/output [T, H, D], slots [S, Hkv, C]");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1 && output.stride(2) == 1 &&
                  slots.is_contiguous(),
              "tova cpu decode: the head dimension must be contiguous");
  TORCH_CHECK(key.dtype() == query.dtype() && value.dtype() == query.dtype() && output.dtype() == query.dtype(),
              "tova cpu decode: query, key, value and output share a dtype");
  TORCH_CHECK(tokens.dtype() == at::kLong && blocks.dtype() == at::kLong && held.dtype() == at::kLong &&
                  budgets.dtype() == at::kLong && new_positions.dtype() == at::kLong && blocks.is_contiguous(),
              "tova cpu decode: int64 row tensors");
  TORCH_CHECK(slots.size(2) >= 2 * query.size(2) + 16 / static_cast<int64_t>(slots.element_size()),
              "tova cpu decode: the page has no side channel");
  const int64_t cols = blocks.size(1) * block_size + 1;
  if (probs.has_value())
    TORCH_CHECK(probs->dtype() == at::kFloat && probs->is_contiguous() &&
                    probs->numel() == tokens.size(0) * key.size(1) * cols,
                "tova cpu decode: probs must be float32 [R, Hkv, n + 1]");
  if (positions.has_value())
    TORCH_CHECK(positions->dtype() == at::kInt && positions->is_contiguous() &&
                    positions->numel() == tokens.size(0) * key.size(1) * cols,
                "tova cpu decode: positions must be int32 [R, Hkv, n + 1]");
  dispatch(query.scalar_type(), [&](auto q_tag) {
    dispatch(slots.scalar_type(), [&](auto c_tag) {
      run<decltype(q_tag), decltype(c_tag)>(query, key, value, slots, block_size, tokens, blocks, held, budgets,
                                           new_positions, scale, output, probs, positions, select);
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_wave", &decode_wave, "One TOVA decode wave on the CPU, reading the kept slots in place");
}
