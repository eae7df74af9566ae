/* The range regularizers' loss and gradients, fused: one call covers every layer in a few
 * passes over its weights, where torch needs a dozen operations per layer (on a small CNN
 * the operations' fixed cost, not the arithmetic, sets the training step's time).
 *
 * Each layer l: weights[l] holds channels[l] output channels of lengths[l] elements each,
 * contiguous. With a BatchNorm folded (gammas[l] != NULL) channel c is regularized as
 * w~ = f_c w, f_c = gamma_c / sqrt(var_c + eps_l). A loss row is one channel (per_channel)
 * or the whole layer; a layer's loss is the mean over its rows times `strength`.
 *
 * Written per layer: grads[l] (d loss / d weights[l]), gamma_grads[l] (d loss / d gamma,
 * when not NULL), dvalues[l] (d loss / d the layer's margin or temperature, values[l]);
 * and *loss, the total. With `decay` each layer also adds strength * e^-values[l] (DSMM).
 *
 * A channel's sums accumulate in T, a row's in double. Compiled with -ffast-math
 * (vectorized exp) but linked without it, so loading the library leaves the process's
 * floating-point mode alone.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp() arguments are floored here: e^-50 ~ 2e-22 is nothing beside a row's largest term
 * (1), and smaller results would be subnormal, which the CPU computes slowly. */
#define EXP_FLOOR (-50.0)

#define SIGN(T, x) ((T)((x) > 0) - (T)((x) < 0))
#define ABS(x) ((x) < 0 ? -(x) : (x))

/* One loss row: channels c0 .. c1 - 1 of a layer. `share` is the row's weight in the total. */
#define ROW_ARGS(T) const T *w, T *grad, int64_t c0, int64_t c1, int64_t m, const T *gamma, \
                    const T *variance, double eps, T *gamma_grad, T value, T share, double *loss, double *dvalue

#define DEFINE_KERNELS(T, SUFFIX, EXP)                                                          \
                                                                                                \
/* f_c (1 without a BatchNorm); also 1/sqrt(var_c + eps) through `inverse_std` */               \
static inline T fold_##SUFFIX(const T *gamma, const T *variance, double eps, int64_t c,         \
                              T *inverse_std) {                                                 \
    if (!gamma) { *inverse_std = 1; return 1; }                                                 \
    *inverse_std = (T)(1.0 / sqrt((double)variance[c] + eps));                                  \
    return gamma[c] * *inverse_std;                                                             \
}                                                                                               \
                                                                                                \
/* loss = max |w~|; its gradient is sign(w~) at the largest magnitude */                        \
static void linf_row_##SUFFIX(ROW_ARGS(T)) {                                                    \
    (void)value;                                                                                \
    memset(grad + c0 * m, 0, (size_t)((c1 - c0) * m) * sizeof(T));                              \
    T peak = -1, peak_largest = 0, inverse_std;                                                 \
    int64_t peak_channel = c0, peak_at = c0 * m;                                                \
    for (int64_t c = c0; c < c1; c++) {                                                         \
        T factor = ABS(fold_##SUFFIX(gamma, variance, eps, c, &inverse_std)), largest = 0;      \
        if (gamma_grad) gamma_grad[c] = 0;                                                      \
        for (int64_t i = c * m; i < (c + 1) * m; i++)                                           \
            largest = ABS(w[i]) > largest ? ABS(w[i]) : largest;                                \
        if (factor * largest > peak) {                                                         \
            peak = factor * largest;                                                            \
            peak_largest = largest;                                                             \
            peak_channel = c;                                                                   \
        }                                                                                       \
    }                                                                                           \
    T f = fold_##SUFFIX(gamma, variance, eps, peak_channel, &inverse_std);                      \
    for (int64_t i = peak_channel * m; i < (peak_channel + 1) * m; i++)                         \
        if (ABS(w[i]) == peak_largest) { peak_at = i; break; }                                  \
    T x = w[peak_at];                                                                           \
    grad[peak_at] = share * ABS(f) * SIGN(T, x);                                                \
    if (gamma_grad) gamma_grad[peak_channel] = share * SIGN(T, f) * ABS(x) * inverse_std;       \
    *loss += (double)(share * peak);                                                            \
    *dvalue = 0;                                                                                \
}                                                                                               \
                                                                                                \
/* margin M = |value|: loss = mean(max(|w~| - M, 0)^2) + M */                                     \
static void margin_row_##SUFFIX(ROW_ARGS(T)) {                                                  \
    T n = (T)((c1 - c0) * m), coef = share * 2 / n, inverse_std, margin = ABS(value);           \
    double squares = 0, excesses = 0;                                                           \
    for (int64_t c = c0; c < c1; c++) {                                                         \
        T f = fold_##SUFFIX(gamma, variance, eps, c, &inverse_std), factor = ABS(f);            \
        double weighted = 0;                                                                    \
        for (int64_t i = c * m; i < (c + 1) * m; i++) {                                         \
            T magnitude = ABS(w[i]), excess = factor * magnitude - margin;                      \
            excess = excess > 0 ? excess : 0;                                                   \
            squares += excess * excess;                                                         \
            excesses += excess;                                                                 \
            weighted += excess * magnitude;                                                     \
            grad[i] = coef * factor * excess * SIGN(T, w[i]);                                   \
        }                                                                                       \
        if (gamma_grad) gamma_grad[c] = coef * SIGN(T, f) * (T)weighted * inverse_std;          \
    }                                                                                           \
    *loss += (double)share * (squares / n + margin);                                            \
    *dvalue = (double)share * (1 - 2 * excesses / n) * SIGN(T, value);                          \
}                                                                                               \
                                                                                                \
/* temperature a = value: loss = s_max - s_min, the softmax(a w~)- and softmax(-a w~)-         \
 * weighted means of w~; d/dw~ = p(1 + a(w~ - s_max)) - q(1 - a(w~ - s_min)),                  \
 * d/da = Var_p(w~) + Var_q(w~). */                                                             \
static void soft_range_row_##SUFFIX(ROW_ARGS(T)) {                                              \
    T a = value, inverse_std;                                                                   \
    /* the largest and smallest a w~: the softmaxes' shifts */                                  \
    T top = a * fold_##SUFFIX(gamma, variance, eps, c0, &inverse_std) * w[c0 * m], bottom = top;\
    for (int64_t c = c0; c < c1; c++) {                                                         \
        T hi = w[c * m], lo = hi;                                                               \
        for (int64_t i = c * m; i < (c + 1) * m; i++) {                                         \
            hi = w[i] > hi ? w[i] : hi;                                                         \
            lo = w[i] < lo ? w[i] : lo;                                                         \
        }                                                                                       \
        T b = a * fold_##SUFFIX(gamma, variance, eps, c, &inverse_std), u = b * hi, v = b * lo; \
        T big = u > v ? u : v, small = u > v ? v : u;                                           \
        top = big > top ? big : top;                                                            \
        bottom = small < bottom ? small : bottom;                                               \
    }                                                                                           \
    double zp = 0, zq = 0, sp = 0, sq = 0;                                                      \
    for (int64_t c = c0; c < c1; c++) {                                                         \
        T f = fold_##SUFFIX(gamma, variance, eps, c, &inverse_std), b = a * f;                  \
        T czp = 0, czq = 0, csp = 0, csq = 0; /* a channel's sums; the row's in double */       \
        for (int64_t i = c * m; i < (c + 1) * m; i++) {                                         \
            T t = b * w[i], du = t - top, dv = bottom - t;                                      \
            T ep = EXP(du > (T)EXP_FLOOR ? du : (T)EXP_FLOOR);                                  \
            T eq = EXP(dv > (T)EXP_FLOOR ? dv : (T)EXP_FLOOR);                                  \
            grad[i] = ep; /* kept for the next pass */                                          \
            czp += ep;                                                                          \
            czq += eq;                                                                          \
            csp += ep * w[i];                                                                   \
            csq += eq * w[i];                                                                   \
        }                                                                                       \
        zp += czp;                                                                              \
        zq += czq;                                                                              \
        sp += (double)f * csp;                                                                  \
        sq += (double)f * csq;                                                                  \
    }                                                                                           \
    T smax = (T)(sp / zp), smin = (T)(sq / zq), ip = (T)(1 / zp), iq = (T)(1 / zq);             \
    double spread = 0;                                                                          \
    for (int64_t c = c0; c < c1; c++) {                                                         \
        T f = fold_##SUFFIX(gamma, variance, eps, c, &inverse_std), b = a * f, g = share * f;   \
        T weighted = 0, channel_spread = 0;                                                     \
        for (int64_t i = c * m; i < (c + 1) * m; i++) {                                         \
            T dv = bottom - b * w[i];                                                           \
            T p = grad[i] * ip;                                                                 \
            T q = EXP(dv > (T)EXP_FLOOR ? dv : (T)EXP_FLOOR) * iq;                              \
            T folded = f * w[i], above = folded - smax, below = folded - smin;                  \
            T pa = p * above, qb = q * below;                                                   \
            T d = p - q + a * (pa + qb);                                                        \
            channel_spread += pa * above + qb * below;                                          \
            weighted += d * w[i];                                                               \
            grad[i] = g * d;                                                                    \
        }                                                                                       \
        spread += channel_spread;                                                               \
        if (gamma_grad) gamma_grad[c] = share * weighted * inverse_std;                         \
    }                                                                                           \
    *loss += (double)share * (smax - smin);                                                     \
    *dvalue = (double)share * spread;                                                           \
}                                                                                               \
                                                                                                \
DEFINE_ENTRY(T, SUFFIX, linf)                                                                   \
DEFINE_ENTRY(T, SUFFIX, margin)                                                                 \
DEFINE_ENTRY(T, SUFFIX, soft_range)

/* The exported function of a kind: every row of every layer. */
#define DEFINE_ENTRY(T, SUFFIX, KIND)                                                           \
void KIND##_##SUFFIX(int64_t layers, const int64_t *channels, const int64_t *lengths,          \
                     const T *const *weights, const T *const *gammas,                           \
                     const T *const *variances, const double *eps, const T *values,             \
                     double strength, int64_t per_channel, int64_t decay, T *const *grads,      \
                     T *const *gamma_grads, T *loss, T *dvalues) {                              \
    double total = 0;                                                                           \
    for (int64_t l = 0; l < layers; l++) {                                                      \
        int64_t c_count = channels[l], rows = per_channel ? c_count : 1;                        \
        int64_t step = c_count / rows;                                                          \
        T share = (T)(strength / (double)rows), value = values ? values[l] : 0;                 \
        double layer_dvalue = 0, dvalue;                                                        \
        for (int64_t c = 0; c < c_count; c += step) {                                           \
            KIND##_row_##SUFFIX(weights[l], grads[l], c, c + step, lengths[l], gammas[l],       \
                                variances[l], eps[l], gamma_grads[l], value, share, &total,     \
                                &dvalue);                                                       \
            layer_dvalue += dvalue;                                                             \
        }                                                                                       \
        if (decay) { /* DSMM's e^-value, once per layer (its mean over the rows) */             \
            double term = strength * exp(-(double)value);                                       \
            total += term;                                                                      \
            layer_dvalue -= term;                                                               \
        }                                                                                       \
        if (dvalues) dvalues[l] = (T)layer_dvalue;                                              \
    }                                                                                           \
    *loss = (T)total;                                                                           \
}

DEFINE_KERNELS(float, f32, expf)
DEFINE_KERNELS(double, f64, exp)
