// Cephes' expf over the lanes of an ISA's vector wrapper V (included inside the ISA's namespace, after V):
// x = n ln2 + r with n = floor(x log2(e) + 1/2), a polynomial for exp(r) on [-ln2/2, ln2/2], times 2^n built in the
// exponent bits. Inputs are clamped to fp32's range first, so -inf (a masked score) gives 0.
template <class V>
inline typename V::F cephes_exp(typename V::F x) {
  using F = typename V::F;
  x = V::max(V::min(x, V::set1(88.3762626647949f)), V::set1(-88.3762626647949f));
  const F n = V::floor(V::fma(x, V::set1(1.44269504088896341f), V::set1(0.5f)));
  x = V::fma(n, V::set1(-0.693359375f), x);
  x = V::fma(n, V::set1(2.12194440e-4f), x);
  F y = V::set1(1.9875691500e-4f);
  y = V::fma(y, x, V::set1(1.3981999507e-3f));
  y = V::fma(y, x, V::set1(8.3334519073e-3f));
  y = V::fma(y, x, V::set1(4.1665795894e-2f));
  y = V::fma(y, x, V::set1(1.6666665459e-1f));
  y = V::fma(y, x, V::set1(5.0000001201e-1f));
  y = V::fma(y, V::mul(x, x), V::add(x, V::set1(1.f)));
  return V::mul(y, V::pow2(n));
}
