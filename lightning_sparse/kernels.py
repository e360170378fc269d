"""Fused CPU loops for the passes sparse training adds to every step: one pass over memory where eager PyTorch
makes several.

Each elementwise op in eager PyTorch is a pass over the weight, and on a CPU the passes a sparse method adds to a
step cost more than its convolutions notice: STR's backward (kept gradient, sign, dot product), ST-3's selection
(two comparisons, a count, a boolean index) and its rescale and effective weight. The loops here do each in one
pass, and write an effective weight too large to stay cached (ST-3's, and STR's, which torch's softshrink also
writes in one pass) with non-temporal stores, which skip reading each line before writing it. STR's forward also
writes which weights it kept and their signs, two bits per weight, which its backward reads in place of the weight:
a sixteenth of its memory. They are a small C source, compiled once per machine with the system's C compiler
(`CC`, else `cc`) into the user's cache directory and loaded with `ctypes`: no torch headers, so the first use costs
well under a second and the process no memory. Large tensors are split among torch's threads
(`torch.get_num_threads()`), on torch's own OpenMP runtime where it has GNU's (its Linux builds), and on one thread
elsewhere; neither a thread count nor the CPU's vector instructions (AVX-512, AVX2 or none) change a bit of a
result: sums run in blocks sized by the tensor alone, in the same lanes.

Each function serves contiguous float32 CPU tensors of at least `MIN_ELEMENTS` entries that autograd does not
track, outside `torch.compile`, and returns None (or False) anywhere else: the caller then runs its eager form,
which computes the same values. A fused sum may round differently (its order of summation); an elementwise result
never does. If no compiler works, one warning says so and the eager forms run from then on.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "MIN_ELEMENTS",
    "count_below_and_select",
    "select_ranks",
    "serves",
    "signs_for",
    "soft_threshold_backward_",
    "soft_threshold_into",
    "st3_apply",
]

MIN_ELEMENTS = 1 << 12
"""Below this many entries the eager forms are as fast: a call here costs a few microseconds."""

# Lanes of 16 independent sums and counts: the compiler vectorises them without reassociating a float sum.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Ranges of at least this many entries are split among threads: a parallel region costs microseconds. */
#define PARALLEL_MIN ((int64_t)1 << 18)
#define MAX_PARTS 64

/* Loops that read a large tensor from memory ask for the line AHEAD entries on as they go: the hardware's prefetch
   alone leaves them waiting on memory (an eighth to a quarter of a pass's time over ResNet-18's weights, measured on
   an Intel server CPU, and on an AMD one for the AVX2 count). A prefetch past the end of a tensor never faults. */
#define AHEAD 512

/* Where a part ends or begins: the last part can be short, or empty. */
static inline int64_t at_most(int64_t x, int64_t n) { return x < n ? x : n; }

/* How many parts a pass over n entries splits into among `threads`, and (in *size) the entries of each but the last:
   whole vectors of 16. */
static inline int parts_of(int64_t n, int threads, int64_t *size) {
    int parts = n < PARALLEL_MIN ? 1 : threads < MAX_PARTS ? threads : MAX_PARTS;
    *size = (n / parts + 16) / 16 * 16;
    return parts;
}

/* The kept gradient in place and its sum times sign(w), from `signs` (see `shrink_with_signs`): an entry is kept
   where bit j of its block's word is set, and negative where bit 16 + j is. */
static double kept_sum(float *restrict grad, const int32_t *restrict signs, int64_t n) {
    float lanes[16] = {0};
    double total = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __builtin_prefetch(grad + i + AHEAD);
        uint32_t word = (uint32_t)signs[i / 16];
        for (int j = 0; j < 16; j++) {
            float k = word >> j & 1 ? grad[i + j] : 0.0f;
            grad[i + j] = k;
            lanes[j] += word >> (16 + j) & 1 ? -k : k;
        }
    }
    for (; i < n; i++) {
        uint32_t word = (uint32_t)signs[i / 16];
        float k = word >> (i & 15) & 1 ? grad[i] : 0.0f;
        grad[i] = k;
        total += word >> (16 + (i & 15)) & 1 ? -k : k;
    }
    for (int j = 0; j < 16; j++) total += lanes[j];
    return total;
}

/* In place: `grad` keeps its entries where the forward's |w| > g (`signs`) and is zeroed elsewhere. Returns the sum of
   the kept entries times sign(w), summed per block and then in block order: blocks sized by `n` alone, so that the
   sum is the same bits whatever the number of threads. */
double soft_threshold_backward(float *restrict grad, const int32_t *restrict signs, int64_t n, int threads) {
    double partial[1024];
    int64_t blocks = (n + 65535) / 65536;
    if (blocks > 1024) blocks = 1024;
    int64_t size = (n / blocks + 16) / 16 * 16;
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t begin = at_most(b * size, n);
        partial[b] = kept_sum(grad + begin, signs + begin / 16, at_most(begin + size, n) - begin);
    }
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) total += partial[b];
    return total;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* For each 8-bit mask, the lanes it sets, first to last: filled when the library is loaded, before any thread can
   read it. */
static int32_t pack[256][8] __attribute__((aligned(32)));
__attribute__((constructor)) static void fill_pack(void) {
    for (int bits = 0; bits < 256; bits++)
        for (int j = 0, k = 0; j < 8; j++)
            if (bits >> j & 1) pack[bits][k++] = j;
}
#endif

/* Counts below `lo` and copies out those in [lo, hi] (of |v| with `absolute`), in their order, branch-free: each
   entry is stored and the end advanced by whether it is inside. Stores stop 16 short of `capacity`; the count does
   not: all were stored iff the count + 16 <= capacity. Also counts the NaN and infinite entries, which fall in
   neither: the caller needs no pass of its own to refuse them. */
static int64_t count_range(const float *restrict v, int64_t n, float lo, float hi, int absolute,
                           float *restrict inside, int64_t capacity, int64_t *n_inside, int64_t *n_non_finite) {
    int64_t below = 0, m = 0, bad = 0, i = 0;
#ifdef __AVX512F__
    /* Compress packs a block's entries inside to the front of a register, which is stored whole. */
    __m512i lanes = _mm512_setzero_si512(), non_finite = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    const __m512 low = _mm512_set1_ps(lo), high = _mm512_set1_ps(hi), infinite = _mm512_set1_ps(INFINITY);
    for (; i + 16 <= n; i += 16) {
        __builtin_prefetch(v + i + AHEAD);
        __m512 x = _mm512_loadu_ps(v + i), magnitude = _mm512_abs_ps(x);
        if (absolute) x = magnitude;
        lanes = _mm512_mask_add_epi32(lanes, _mm512_cmp_ps_mask(x, low, _CMP_LT_OQ), lanes, one);
        non_finite = _mm512_mask_add_epi32(
            non_finite, _mm512_cmp_ps_mask(magnitude, infinite, _CMP_NLT_UQ), non_finite, one);
        __mmask16 in = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, high, _CMP_LE_OQ);
        if (m + 16 <= capacity) _mm512_storeu_ps(inside + m, _mm512_maskz_compress_ps(in, x));
        m += __builtin_popcount(in);
    }
    below = _mm512_reduce_add_epi32(lanes);
    bad = _mm512_reduce_add_epi32(non_finite);
#elif defined(__AVX2__)
    /* No compress: a permutation from a table packs a block's entries inside, chosen by their 8-bit mask. */
    __m256i lanes = _mm256_setzero_si256(), non_finite = _mm256_setzero_si256();
    const __m256 low = _mm256_set1_ps(lo), high = _mm256_set1_ps(hi), sign = _mm256_set1_ps(-0.0f),
                 infinite = _mm256_set1_ps(INFINITY);
    for (; i + 8 <= n; i += 8) {
        if (!(i & 15)) __builtin_prefetch(v + i + AHEAD);
        __m256 x = _mm256_loadu_ps(v + i), magnitude = _mm256_andnot_ps(sign, x);
        if (absolute) x = magnitude;
        /* A true comparison is all ones, -1 as an integer. */
        lanes = _mm256_sub_epi32(lanes, _mm256_castps_si256(_mm256_cmp_ps(x, low, _CMP_LT_OQ)));
        non_finite = _mm256_sub_epi32(
            non_finite, _mm256_castps_si256(_mm256_cmp_ps(magnitude, infinite, _CMP_NLT_UQ)));
        int in = _mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(x, low, _CMP_GE_OQ), _mm256_cmp_ps(x, high, _CMP_LE_OQ)));
        if (m + 16 <= capacity)
            _mm256_storeu_ps(inside + m, _mm256_permutevar8x32_ps(x, _mm256_load_si256((const __m256i *)pack[in])));
        m += __builtin_popcount(in);
    }
    int32_t counts[8], bad_counts[8];
    _mm256_storeu_si256((__m256i *)counts, lanes);
    _mm256_storeu_si256((__m256i *)bad_counts, non_finite);
    for (int j = 0; j < 8; j++) below += counts[j], bad += bad_counts[j];
#else
    /* A vector pass counts both per block of 16; only the blocks holding one are copied. */
    for (; i + 256 <= n; i += 256) {
        int b = 0, nf = 0, in[16] = {0};
        for (int k = 0; k < 16; k++)
            for (int j = 0; j < 16; j++) {
                float x = absolute ? fabsf(v[i + 16 * k + j]) : v[i + 16 * k + j];
                b += x < lo;
                nf += !(fabsf(x) < INFINITY);
                in[k] += (x >= lo) & (x <= hi);
            }
        below += b;
        bad += nf;
        for (int k = 0; k < 16; k++) {
            if (!in[k]) continue;
            if (m + 16 > capacity) {
                m += in[k];
                continue;
            }
            for (int j = 0; j < 16; j++) {
                float x = absolute ? fabsf(v[i + 16 * k + j]) : v[i + 16 * k + j];
                inside[m] = x;
                m += (x >= lo) & (x <= hi);
            }
        }
    }
#endif
    for (; i < n; i++) {
        float x = absolute ? fabsf(v[i]) : v[i];
        below += x < lo;
        bad += !(fabsf(x) < INFINITY);
        if (x >= lo && x <= hi) {
            if (m + 16 <= capacity) inside[m] = x;
            m++;
        }
    }
    *n_inside = m;
    *n_non_finite = bad;
    return below;
}

/* `count_range` over `threads` parts of `v` at once, each storing into its own share of `inside` (capacity / parts),
   packed in their order after. `*needed` is the capacity that stores all of them: at most `capacity` iff all were. */
int64_t count_below_and_select(const float *restrict v, int64_t n, float lo, float hi, int absolute,
                               float *restrict inside, int64_t capacity, int threads, int64_t *n_inside,
                               int64_t *n_non_finite, int64_t *needed) {
    int64_t size;
    int parts = parts_of(n, threads, &size);
    int64_t room = capacity / parts;
    int64_t below[MAX_PARTS], found[MAX_PARTS], bad[MAX_PARTS];
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int p = 0; p < parts; p++) {
        int64_t begin = at_most(p * size, n), end = at_most(begin + size, n);
        below[p] = count_range(v + begin, end - begin, lo, hi, absolute, inside + p * room, room, &found[p], &bad[p]);
    }
    int64_t total_below = 0, total_bad = 0, m = 0, most = 0;
    for (int p = 0; p < parts; p++) {
        total_below += below[p], total_bad += bad[p];
        most = found[p] > most ? found[p] : most;
    }
    *needed = parts * (most + 16);
    for (int p = 0; p < parts; p++) {
        /* Leftwards within `inside`, each part's start at or before its share's */
        if (*needed <= capacity) memmove(inside + m, inside + p * room, (size_t)found[p] * sizeof(float));
        m += found[p];
    }
    *n_inside = m;
    *n_non_finite = total_bad;
    return total_below;
}

/* Moves the entries of v[left..right] below `pivot` (or equal to it, with `or_equal`) to its front and returns where
   the others start: a swap per entry and no branch, which a comparison on random data mispredicts half the time. */
static int64_t partition(float *restrict v, int64_t left, int64_t right, float pivot, int or_equal) {
    int64_t front = left;
    for (int64_t i = left; i <= right; i++) {
        float x = v[i];
        int moves = or_equal ? x <= pivot : x < pivot;
        v[i] = v[front];
        v[front] = x;
        front += moves;
    }
    return front;
}

/* The ranks[0] > ranks[1] > ... (from 1) smallest of `v`, reordering it: quickselect in three parts (below, equal,
   above) so that ties cannot stall it, each rank's search confined to the part left of the previous rank. The pivot
   is the median of three entries at pseudo-random (but fixed) places, as any fixed places have inputs, sorted ones
   among them, that make every round a bad one. Returns 0; 1, with `v` untouched, if it holds a NaN, which compares
   false both ways and has no rank; or 2 if a search took more rounds than the caller should wait for. The caller
   then selects another way. */
int select_ranks(float *restrict v, int64_t n, const int64_t *ranks, int count, float *restrict found) {
    int nan = 0;
    for (int64_t i = 0; i < n; i++) nan |= v[i] != v[i];
    if (nan) return 1;
    int64_t right = n - 1;
    uint64_t state = 0x9E3779B97F4A7C15u;
    for (int r = 0; r < count; r++) {
        int64_t k = ranks[r] - 1, left = 0;
        for (int round = 0; left < right; round++) {
            if (round > 200) return 2;
            float three[3];
            for (int t = 0; t < 3; t++) {
                state ^= state << 13, state ^= state >> 7, state ^= state << 17;
                three[t] = v[left + (int64_t)(state % (uint64_t)(right - left + 1))];
            }
            float a = three[0], b = three[1], c = three[2];
            float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
            int64_t below = partition(v, left, right, pivot, 0);
            if (k < below) {
                right = below - 1;
                continue;
            }
            int64_t equal = partition(v, below, right, pivot, 1);
            if (k < equal) break; /* v[k] is the pivot */
            left = equal;
        }
        found[r] = v[k];
        right = k - 1;
    }
    return 0;
}

/* A row's sum of |w| (*total) and of those with |w| > shrink (*kept), each in 16 lanes (entry c in lane c % 16) with
   the tail and then the lanes added in a double, in order: the same order for both sums, so a row with nothing
   pruned keeps exactly its total, and its rescale is exactly 1, and the same bits on every CPU. */
static inline void abs_sums(const float *restrict w, int64_t cols, float shrink, float *total, float *kept) {
    float all[16] = {0}, over[16] = {0};
    double sum = 0.0, sum_kept = 0.0;
    int64_t c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    /* Both sums in one loop, written out: the compiler vectorises one sum of this loop, not two (2x slower). */
#ifdef __AVX512F__
    __m512 lanes = _mm512_setzero_ps(), lanes_kept = _mm512_setzero_ps();
    const __m512 t = _mm512_set1_ps(shrink);
    for (; c + 16 <= cols; c += 16) {
        __builtin_prefetch(w + c + AHEAD);
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(w + c));
        lanes = _mm512_add_ps(lanes, a);
        lanes_kept = _mm512_mask_add_ps(lanes_kept, _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), lanes_kept, a);
    }
    _mm512_storeu_ps(all, lanes);
    _mm512_storeu_ps(over, lanes_kept);
#else
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps(), low_kept = low, high_kept = low;
    const __m256 t = _mm256_set1_ps(shrink), sign = _mm256_set1_ps(-0.0f);
    for (; c + 16 <= cols; c += 16) {
        __builtin_prefetch(w + c + AHEAD);
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(w + c));
        __m256 b = _mm256_andnot_ps(sign, _mm256_loadu_ps(w + c + 8));
        low = _mm256_add_ps(low, a);
        high = _mm256_add_ps(high, b);
        low_kept = _mm256_add_ps(low_kept, _mm256_and_ps(_mm256_cmp_ps(a, t, _CMP_GT_OQ), a));
        high_kept = _mm256_add_ps(high_kept, _mm256_and_ps(_mm256_cmp_ps(b, t, _CMP_GT_OQ), b));
    }
    _mm256_storeu_ps(all, low);
    _mm256_storeu_ps(all + 8, high);
    _mm256_storeu_ps(over, low_kept);
    _mm256_storeu_ps(over + 8, high_kept);
#endif
#else
    /* One sum per loop, each of which the compiler vectorises. */
    int64_t whole = cols / 16 * 16;
    for (c = 0; c < whole; c += 16)
        for (int j = 0; j < 16; j++) all[j] += fabsf(w[c + j]);
    for (c = 0; c < whole; c += 16)
        for (int j = 0; j < 16; j++) {
            float a = fabsf(w[c + j]);
            over[j] += a > shrink ? a : 0.0f;
        }
#endif
    for (; c < cols; c++) {
        float a = fabsf(w[c]);
        sum += a;
        sum_kept += a > shrink ? a : 0.0f;
    }
    for (int j = 0; j < 16; j++) sum += all[j], sum_kept += over[j];
    *total = (float)sum;
    *kept = (float)sum_kept;
}

/* softshrink(x, shrink) * s, exactly: copysign(|x| - shrink, x) is x - shrink or x + shrink as rounded. A pruned
   entry is +0 (torch's kernel gives some pruned negative ones -0). */
static inline float shrunk(float x, float shrink, float s) {
    float kept = fabsf(x) - shrink;
    return (kept > 0.0f ? copysignf(kept, x) : 0.0f) * s;
}

/* `shrunk` of w[0..n) into e. With `stream`, the aligned middle is written with non-temporal stores, for a weight
   too large to stay cached until the forward reads it: an ordinary store first reads each line it writes, a
   third of the traffic of a pass that reads and writes once (about a fifth of its time, measured). */
static void shrink_into(const float *restrict w, float *restrict e, int64_t n, float shrink, float s, int stream) {
    int64_t c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
    if (stream) {
        for (; c < n && ((uintptr_t)(e + c) & (LANES * sizeof(float) - 1)); c++) e[c] = shrunk(w[c], shrink, s);
#ifdef __AVX512F__
        const __m512 t = _mm512_set1_ps(shrink), factor = _mm512_set1_ps(s), sign = _mm512_set1_ps(-0.0f);
        for (; c + LANES <= n; c += LANES) {
            __m512 x = _mm512_loadu_ps(w + c), kept = _mm512_sub_ps(_mm512_abs_ps(x), t);
            __mmask16 positive = _mm512_cmp_ps_mask(kept, _mm512_setzero_ps(), _CMP_GT_OQ);
            __m512 signed_kept = _mm512_or_ps(kept, _mm512_and_ps(x, sign));
            _mm512_stream_ps(e + c, _mm512_mul_ps(_mm512_maskz_mov_ps(positive, signed_kept), factor));
        }
#else
        const __m256 t = _mm256_set1_ps(shrink), factor = _mm256_set1_ps(s), sign = _mm256_set1_ps(-0.0f);
        for (; c + LANES <= n; c += LANES) {
            __m256 x = _mm256_loadu_ps(w + c), kept = _mm256_sub_ps(_mm256_andnot_ps(sign, x), t);
            __m256 positive = _mm256_cmp_ps(kept, _mm256_setzero_ps(), _CMP_GT_OQ);
            __m256 signed_kept = _mm256_or_ps(kept, _mm256_and_ps(x, sign));
            _mm256_stream_ps(e + c, _mm256_mul_ps(_mm256_and_ps(positive, signed_kept), factor));
        }
#endif
        /* Non-temporal stores are weakly ordered: seen by other threads once the thread that made them fences. */
        _mm_sfence();
    }
#undef LANES
#endif
    /* A select of values computed for every entry: a branch, or arithmetic done only on one side of one, keeps the
       compiler from vectorising the loop where the CPU has no masked stores (AVX2). */
    for (; c < n; c++) e[c] = shrunk(w[c], shrink, s);
}

/* `shrunk` of w[0..n) into e, w[0] being an entry of its tensor whose index is a multiple of 16, and for each block
   of 16 one word into `signs`: bit j set where entry j is kept (|w| > shrink), bit 16 + j where it is kept and
   negative. That is all STR's backward needs of the weight, in a sixteenth of its memory. With `stream` and an
   aligned `e`, `e` is stored non-temporally (see `shrink_into`). */
static void shrink_with_signs(const float *restrict w, float *restrict e, int32_t *restrict signs, int64_t n,
                              float shrink, int stream) {
    int64_t c = 0;
#ifdef __AVX512F__
    const __m512 t = _mm512_set1_ps(shrink), sign = _mm512_set1_ps(-0.0f), zero = _mm512_setzero_ps();
    int aligned = stream && !((uintptr_t)e & 63);
    for (; c + 16 <= n; c += 16) {
        __builtin_prefetch(w + c + AHEAD);
        __m512 x = _mm512_loadu_ps(w + c), kept = _mm512_sub_ps(_mm512_abs_ps(x), t);
        __mmask16 on = _mm512_cmp_ps_mask(kept, zero, _CMP_GT_OQ);
        __mmask16 negative = on & _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
        __m512 value = _mm512_maskz_mov_ps(on, _mm512_or_ps(kept, _mm512_and_ps(x, sign)));
        if (aligned)
            _mm512_stream_ps(e + c, value);
        else
            _mm512_storeu_ps(e + c, value);
        signs[c / 16] = (int32_t)((uint32_t)on | (uint32_t)negative << 16);
    }
    if (aligned) _mm_sfence();
#elif defined(__AVX2__)
    const __m256 t = _mm256_set1_ps(shrink), sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    int aligned = stream && !((uintptr_t)e & 31);
    for (; c + 16 <= n; c += 16) {
        uint32_t word = 0;
        __builtin_prefetch(w + c + AHEAD);
        for (int half = 0; half < 2; half++) {
            __m256 x = _mm256_loadu_ps(w + c + 8 * half), kept = _mm256_sub_ps(_mm256_andnot_ps(sign, x), t);
            __m256 on = _mm256_cmp_ps(kept, zero, _CMP_GT_OQ);
            __m256 value = _mm256_and_ps(on, _mm256_or_ps(kept, _mm256_and_ps(x, sign)));
            if (aligned)
                _mm256_stream_ps(e + c + 8 * half, value);
            else
                _mm256_storeu_ps(e + c + 8 * half, value);
            uint32_t kept_bits = (uint32_t)_mm256_movemask_ps(on);
            uint32_t negative = (uint32_t)_mm256_movemask_ps(_mm256_and_ps(on, _mm256_cmp_ps(x, zero, _CMP_LT_OQ)));
            word |= kept_bits << (8 * half) | negative << (16 + 8 * half);
        }
        signs[c / 16] = (int32_t)word;
    }
    if (aligned) _mm_sfence();
#endif
    for (; c < n; c += 16) {
        uint32_t word = 0;
        for (int j = 0; j < 16 && c + j < n; j++) {
            float x = w[c + j];
            uint32_t on = fabsf(x) - shrink > 0.0f;
            e[c + j] = shrunk(x, shrink, 1.0f);
            word |= on << j | (on & (x < 0.0f)) << (16 + j);
        }
        signs[c / 16] = (int32_t)word;
    }
}

/* softshrink(w, shrink) into `out`, and its `signs` (see `shrink_with_signs`), the n entries split among threads in
   parts of whole vectors. */
void soft_threshold_into(const float *restrict weight, float *restrict out, int32_t *restrict signs, int64_t n,
                         float shrink, int threads) {
    int64_t size;
    int parts = parts_of(n, threads, &size);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int p = 0; p < parts; p++) {
        int64_t begin = at_most(p * size, n);
        shrink_with_signs(weight + begin, out + begin, signs + begin / 16, at_most(begin + size, n) - begin, shrink,
                          n >= PARALLEL_MIN);
    }
}

/* `effective` may be NULL: a sharded weight's is not kept. The row is read from memory once: its sums bring it into
   the cache for the effective weight. Rows are independent: threads split them without changing a bit. */
void st3_apply(const float *restrict weight, float *restrict effective, float *restrict scale, int64_t rows,
               int64_t cols, float shrink, float epsilon, int rescale, int threads) {
    int large = rows * cols >= PARALLEL_MIN;
#pragma omp parallel for num_threads(threads) if (large) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *w = weight + r * cols;
        float s = 1.0f;
        if (rescale) {
            float total, kept;
            abs_sums(w, cols, shrink, &total, &kept);
            s = 1.01f / ((kept + epsilon) / (total + epsilon) + 0.01f);
            scale[r] = s;
        }
        if (effective) shrink_into(w, effective + r * cols, cols, shrink, s, large);
    }
}
"""

_POINTER, _I64, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "soft_threshold_backward": (ctypes.c_double, [_POINTER, _POINTER, _I64, ctypes.c_int]),
    "count_below_and_select": (
        _I64,
        [_POINTER, _I64, _FLOAT, _FLOAT, ctypes.c_int, _POINTER, _I64, ctypes.c_int, *[ctypes.POINTER(_I64)] * 3],
    ),
    "select_ranks": (ctypes.c_int, [_POINTER, _I64, _POINTER, ctypes.c_int, _POINTER]),
    "st3_apply": (None, [_POINTER, _POINTER, _POINTER, _I64, _I64, _FLOAT, _FLOAT, ctypes.c_int, ctypes.c_int]),
    "soft_threshold_into": (None, [_POINTER, _POINTER, _POINTER, _I64, _FLOAT, ctypes.c_int]),
}
# Tried in turn. `-march=native` for the vector width and byte stores (and AVX-512's compress or AVX2's permutes,
# where the CPU has them); without it (a compiler that refuses it) the loops are correct, only slower.
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
# The loaded library, or None once building it failed (then the eager forms run): see `_library`.
_loaded: dict[str, ctypes.CDLL | None] = {}


def _library() -> ctypes.CDLL | None:
    """The loops, built on the first call; None, with one warning, if they cannot be."""
    if "library" not in _loaded:
        try:
            _loaded["library"] = _build()
        except (OSError, subprocess.SubprocessError) as error:
            _loaded["library"] = None
            warnings.warn(
                f"lightning-sparse: could not build its fused CPU loops ({error}); training goes on with eager "
                "PyTorch, which computes the same values in several passes per step instead of one. They need a C "
                "compiler: `cc` on the PATH, or one named by `CC`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded["library"]


def _build() -> ctypes.CDLL:
    """Compile `_SOURCE` for this machine's CPU (once per CPU, compiler and source) into the cache directory, and
    load it."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler `{compiler}`")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-sparse"
    cache.mkdir(parents=True, exist_ok=True)
    # Keyed by the CPU, as a home directory can be shared by machines with different CPUs.
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\n".join([_SOURCE, compiler, *flags, _cpu()]).encode()).hexdigest()[:16]
        library = cache / f"kernels-{key}.so"
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                source, built = Path(scratch) / "kernels.c", Path(scratch) / "kernels.so"
                source.write_text(_SOURCE)
                command = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built), "-lm"]
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode:
                    errors.append(next(iter(run.stderr.strip().splitlines()), f"exit status {run.returncode}"))
                    continue
                # Atomic: processes building at once (DDP ranks) each install a whole library.
                os.replace(built, library)
        loaded = ctypes.CDLL(str(library))
        for name, (result, arguments) in _SIGNATURES.items():
            function = getattr(loaded, name)
            function.restype, function.argtypes = result, arguments
        return loaded
    raise OSError(f"`{compiler}` failed to compile them: {errors[-1]}")


def _flag_sets() -> list[tuple[str, ...]]:
    """`_FLAG_SETS`, each first with `-fopenmp` where the process already holds GNU OpenMP (torch's own, in its Linux
    builds): the loops then split large tensors among torch's threads (`torch.get_num_threads()`), the team its own
    ops run on. Elsewhere, linking one would bring a second runtime beside torch's: the loops run on one thread."""
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except (OSError, AttributeError):  # not loaded, or no `RTLD_NOLOAD` (Windows)
        return list(_FLAG_SETS)
    return [(*flags, "-fopenmp") for flags in _FLAG_SETS] + list(_FLAG_SETS)


def _cpu() -> str:
    """What identifies this machine's CPU for `-march=native`: its model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    found = [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join([platform.machine(), platform.processor(), sys.platform, *found])


def _servable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is contiguous float32 on CPU, the first large, and neither autograd would track
    the result (it would not be differentiable) nor `torch.compile` is tracing (it cannot trace a foreign call)."""
    if tensors[0].numel() < MIN_ELEMENTS or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return _library()


def serves(values: Tensor) -> bool:
    """Whether the loops here take `values`: large, contiguous float32 on CPU, neither tracked by autograd nor traced
    by `torch.compile`, and the library built.

    Example:
        >>> serves(torch.zeros(MIN_ELEMENTS)) == (_library() is not None), serves(torch.zeros(8))
        (True, False)
    """
    return _servable(values) is not None


def soft_threshold_backward_(grad: Tensor, signs: Tensor) -> Tensor | None:
    """STR's two gradients in one pass, from the `signs` its forward wrote (`soft_threshold_into`): `grad` zeroed, in
    place, where the forward's `|w| <= threshold` (what survives is the kept gradient), and the threshold's gradient,
    `-sum(kept * sign(w))`, returned. None where the fused loop does not serve: then `grad` is untouched.

    Example:
        >>> w = torch.linspace(-1, 1, MIN_ELEMENTS)
        >>> signs = signs_for(w)
        >>> soft_threshold_into(w, torch.empty_like(w), 0.5, signs)
        True
        >>> grad = torch.ones_like(w)
        >>> d_threshold = soft_threshold_backward_(grad, signs)
        >>> bool(torch.equal(grad, (w.abs() > 0.5).float())), round(d_threshold.item())
        (True, 0)
    """
    library = _servable(grad)
    if library is None or not _holds_signs(signs, grad):
        return None
    total = library.soft_threshold_backward(grad.data_ptr(), signs.data_ptr(), grad.numel(), torch.get_num_threads())
    return torch.tensor(-total, dtype=torch.float32)


def count_below_and_select(
    values: Tensor, lo: float, hi: float, expected: int, absolute: bool = False
) -> tuple[int, Tensor, int] | None:
    """How many of the flat `values` (their magnitudes, with `absolute`) are below `lo`, those in `[lo, hi]` (in their
    order), and how many are NaN or infinite (in neither), in one pass; room is made for `expected` of those inside
    (one more pass if there are more). None where the fused loop does not serve.

    Example:
        >>> count_below_and_select(torch.arange(float(MIN_ELEMENTS)), 2.5, 4.0, expected=2)
        (3, tensor([3., 4.]), 0)
        >>> values = -torch.arange(float(MIN_ELEMENTS))
        >>> values[-1] = float("nan")
        >>> count_below_and_select(values, 2.5, 4.0, expected=2, absolute=True)
        (3, tensor([3., 4.]), 1)
    """
    library = _servable(values)
    if library is None:
        return None
    found, non_finite, needed = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
    threads = torch.get_num_threads()

    def select(inside: Tensor) -> int:
        return int(
            library.count_below_and_select(
                values.data_ptr(), values.numel(), lo, hi, absolute, inside.data_ptr(), inside.numel(), threads,
                ctypes.byref(found), ctypes.byref(non_finite), ctypes.byref(needed),
            )
        )  # fmt: skip

    # Each thread stores into its own share of the room.
    inside = torch.empty(expected + 16 * threads, dtype=torch.float32)
    below = select(inside)
    if needed.value > inside.numel():  # more than expected, or in one thread's part: once more, with room for all
        inside = torch.empty(needed.value, dtype=torch.float32)
        below = select(inside)
    return below, inside[: found.value], non_finite.value


def select_ranks(values: Tensor, ranks: Sequence[int]) -> list[float] | None:
    """The `ranks`-th smallest (from 1, each in `[1, values.numel()]`) of the flat `values`, which it reorders: a
    quickselect, where `kthvalue` copies and sorts more. None where the loop does not serve or `values` hold a NaN
    (nothing is reordered), or if it would take too long (a pathological order; then `values` are reordered).

    Example:
        >>> values = torch.arange(float(MIN_ELEMENTS)).flip(0)
        >>> select_ranks(values, [1, 100, MIN_ELEMENTS])
        [0.0, 99.0, 4095.0]
    """
    library = _servable(values)
    if library is None:
        return None
    # The loop takes distinct ranks, largest first: each search then stays left of the one before.
    distinct = sorted(set(ranks), reverse=True)
    wanted = torch.tensor(distinct, dtype=torch.int64)
    found = torch.empty(len(distinct), dtype=torch.float32)
    if library.select_ranks(values.data_ptr(), values.numel(), wanted.data_ptr(), len(distinct), found.data_ptr()):
        return None
    by_rank = dict(zip(distinct, found.tolist(), strict=True))
    return [by_rank[rank] for rank in ranks]


def signs_for(weight: Tensor, reuse: Tensor | None = None) -> Tensor:
    """Memory for the signs of `weight` that `soft_threshold_into` writes, one int32 word per 16 entries: `reuse` if
    it has the size, else new.

    Example:
        >>> signs = signs_for(torch.zeros(40, 3))
        >>> signs.shape, signs_for(torch.ones(120), reuse=signs) is signs
        (torch.Size([8]), True)
    """
    if reuse is not None and reuse.numel() == _words(weight):
        return reuse
    return torch.empty(_words(weight), dtype=torch.int32, device=weight.device)


def _words(weight: Tensor) -> int:
    return (weight.numel() + 15) // 16


def _holds_signs(signs: Tensor, weight: Tensor) -> bool:
    return (
        signs.dtype == torch.int32
        and signs.device.type == "cpu"
        and signs.is_contiguous()
        and signs.numel() == _words(weight)
    )


def soft_threshold_into(weight: Tensor, out: Tensor, threshold: float, signs: Tensor) -> bool:
    """`softshrink(weight, threshold)` into `out` (shaped like `weight`), a pruned entry +0, and into `signs`
    (`signs_for(weight)`) which entries were kept and which of those are negative, in one pass: all that STR's
    backward reads (`soft_threshold_backward_`), in a sixteenth of the weight's memory. False where the fused loop
    does not serve: nothing is written.

    Example:
        >>> weight, out = torch.linspace(-1, 1, MIN_ELEMENTS), torch.empty(MIN_ELEMENTS)
        >>> soft_threshold_into(weight, out, 0.5, signs_for(weight))
        True
        >>> torch.equal(out, torch.nn.functional.softshrink(weight, 0.5))
        True
    """
    library = _servable(weight, out)
    if library is None or out.shape != weight.shape or not _holds_signs(signs, weight):
        return False
    library.soft_threshold_into(
        weight.data_ptr(), out.data_ptr(), signs.data_ptr(), weight.numel(), threshold, torch.get_num_threads()
    )
    return True


def st3_apply(
    weight: Tensor, effective: Tensor | None, scale: Tensor, shrink: float, rescale: bool, epsilon: float
) -> bool:
    """ST-3's channel rescale (with `rescale`), from the fraction of each channel's L1 mass that `|w| > shrink` keeps
    (`epsilon` added to both sums), and the effective weight `softshrink(w, shrink) * scale` into `effective` (if
    given), in one pass over each output channel (the rows of `weight`, channels first). False where the fused loop
    does not serve: nothing is written.
    """
    tensors = [weight, scale] + ([effective] if effective is not None else [])
    library = _servable(*tensors)
    if library is None or weight.dim() == 0:
        return False
    rows = weight.shape[0]
    library.st3_apply(
        weight.data_ptr(), effective.data_ptr() if effective is not None else None, scale.data_ptr(), rows,
        weight.numel() // rows, shrink, epsilon, rescale, torch.get_num_threads(),
    )  # fmt: skip
    return True
