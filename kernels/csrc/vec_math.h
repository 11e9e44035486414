// Vectorisable elementwise maths shared by the CPU extensions.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// exp(u), written so that `omp simd` loops vectorise it: glibc's exp does not vectorise without -ffast-math (the
// extensions that use it are built with -fno-trapping-math so that the selects if-convert).
// u = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by its Taylor polynomial (relative error
// < 1e-8 in float, < 2e-16 in double), 2^n assembled in the exponent bits. Below kLow the result is 0 (where
// exp would give a subnormal), above kHigh +inf, -inf gives 0; NaN is not supported.
template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float kLow = -87.0f;  // exp(kLow) is still a normal float
  static constexpr float kHigh = 88.0f;  // exp(kHigh) is still finite
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr int kDegree = 7, kMantissa = 23, kBias = 127;
};
template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double kLow = -708.0;
  static constexpr double kHigh = 709.0;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.693147180369123816490, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kDegree = 13, kMantissa = 52, kBias = 1023;
};

// 1 + r (1 + r/2 (1 + r/3 (... (1 + r/n)))), the reciprocals folded at compile time.
template <typename T, int N, int I = 1>
inline T taylor_exp(T r) {
  if constexpr (I > N) {
    return T(1);
  } else {
    return T(1) + r * (T(1) / T(I)) * taylor_exp<T, N, I + 1>(r);
  }
}

template <typename T>
inline T vec_exp(T u) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  const T clamped = u > C::kLow ? u : C::kLow;
  const T x = clamped < C::kHigh ? clamped : C::kHigh;
  const T shifted = x * T(1.4426950408889634) + C::kMagic;
  const T n = shifted - C::kMagic;
  const T r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  const T p = taylor_exp<T, C::kDegree>(r);
  Bits shifted_bits, magic_bits;
  const T magic = C::kMagic;
  std::memcpy(&shifted_bits, &shifted, sizeof(T));
  std::memcpy(&magic_bits, &magic, sizeof(T));
  const Bits scale_bits = (shifted_bits - magic_bits + C::kBias) << C::kMantissa;
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof(T));
  const T big = u > C::kHigh ? std::numeric_limits<T>::infinity() : p * scale;
  return u < C::kLow ? T(0) : big;
}
