// The 16 x 16 matrix of 32-bit values in r[0..15], one row per vector, transposed in place: r[j] = lane j of the
// rows. Pairs of rows interleaved, then fours, then 128-bit lanes exchanged (shuffles only: any 32-bit values).
// Included inside a translation unit's own namespace, within an avx512f target region.
inline void transpose_16x16(__m512* r) {
  __m512 t[16], s[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // s[4g + c], 128-bit lane L: lane 4L + c of rows 4g..4g + 3
    s[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    s[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    s[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    s[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes across s[c], s[4 + c], s[8 + c], s[12 + c]
    const __m512 u0 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x88), u1 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
}
