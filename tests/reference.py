"""Independent whole-tensor references, written from SEMANTICS.md in numpy float64.

Nothing here imports streammerge: these are the yardsticks the kernels are checked against.
The DARE draw is the documented counter-based rule, re-derived in plain Python integers.
"""

from __future__ import annotations

import math

import numpy as np
import xxhash

MASK64 = (1 << 64) - 1


def linear(xs: list[np.ndarray], ws: list[float], normalize: bool = True) -> np.ndarray:
    out = sum(w * x for w, x in zip(ws, xs))
    return out / sum(ws) if normalize else out


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """§2.3: whole tensor as one vector; 0.9995 threshold; zero-norm vectors not normalised."""
    a, b = v0.ravel().astype(np.float64), v1.ravel().astype(np.float64)
    n0, n1 = np.linalg.norm(a), np.linalg.norm(b)
    n0 = 1.0 if n0 <= 1e-8 else n0
    n1 = 1.0 if n1 <= 1e-8 else n1
    d = float(np.clip(np.dot(a / n0, b / n1), -1, 1))
    if abs(d) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        th = math.acos(d)
        out = math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b
    return out.reshape(v0.shape)


def splitmix_draw(key: int, i: int) -> int:
    """The 53-bit draw for flat element i: splitmix64 output of key + (i+1)·γ, top 53 bits."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z >> 11


def splitmix64(key: int, c: int) -> int:
    """splitmix64's output for counter c: all 64 bits."""
    z = (key + (c + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def draw32(key: int, i: int) -> int:
    """Element i's 32-bit draw: lowbias32 of i's low 32 bits XOR the block key, the low half of
    splitmix64's output for counter i >> 32."""
    x = (i & 0xFFFFFFFF) ^ (splitmix64(key, i >> 32) & 0xFFFFFFFF)
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def dare_keep(seed: int, position: int, tensor: str, numel: int, density: float) -> np.ndarray:
    key = xxhash.xxh3_64_intdigest(f"{seed}\x00{position}\x00{tensor}".encode())
    thr = int(density * (1 << 32))
    return np.array([draw32(key, i) < thr for i in range(numel)], dtype=bool)


def topk_keep(delta: np.ndarray, density: float) -> np.ndarray:
    """k = max(1, floor(d·N)) largest |δ| ranked as float32; ties by lower flat index (deviation 3)."""
    n = delta.size
    if density >= 1:
        return np.ones(delta.shape, bool)
    if density <= 0 or n == 0:
        return np.zeros(delta.shape, bool)
    k = max(1, math.floor(density * n))
    mag = np.abs(delta.ravel()).astype(np.float32)
    order = np.lexsort((np.arange(n), -mag))
    keep = np.zeros(n, bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


def band_keep(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs (§2.8): sort |δ| ascending, keep positions [bot, bot+keep). Ascending order is the
    reverse of the top-k order (magnitude, then lower flat index first)."""
    n = delta.size
    if density >= 1:
        return np.ones(delta.shape, bool)
    keep, top = math.floor(density * n), math.floor(gamma * n)
    bot = max(0, n - keep - top)
    mag = np.abs(delta.ravel()).astype(np.float32)
    descending = np.lexsort((np.arange(n), -mag))
    ascending = descending[::-1]
    out = np.zeros(n, bool)
    out[ascending[bot:bot + keep]] = True
    return out.reshape(delta.shape)


def l1_rescaled(delta: np.ndarray, keep: np.ndarray) -> np.ndarray:
    m = delta * keep
    a, a2 = np.abs(delta).sum(), np.abs(m).sum()
    return m if a < 1e-7 or a2 < 1e-7 else m * (a / a2)


def task_arithmetic(base: np.ndarray, others: list[np.ndarray], weights: list[float], keeps: list[np.ndarray],
                    consensus: bool, normalize: bool, rescale: bool, lam: float = 1.0) -> np.ndarray:
    """§2.7 given each model's keep-mask (all-true for no sparsification)."""
    deltas = []
    for x, w, keep in zip(others, weights, keeps):
        d = x - base
        d = l1_rescaled(d, keep) if (rescale and not keep.all()) else d * keep
        deltas.append(d * w)
    if consensus:
        sign = np.where(sum(deltas) >= 0, 1.0, -1.0)
        masks = [np.sign(d) == sign for d in deltas]
        s = sum(d * m for d, m in zip(deltas, masks))
        div = sum(m * w for m, w in zip(masks, weights))
        div = np.where(div == 0, 1.0, div)
    else:
        s = sum(deltas)
        div = sum(weights)
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        s = s / div
    return base + lam * s


def nearswap(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def ram(base: np.ndarray, others: list[np.ndarray], eps: float = 1e-5, plus: bool = False,
        r: float = 0.1, alpha: float = 0.2) -> np.ndarray:
    taus = [x - base for x in others]
    act = [np.abs(t) > eps for t in taus]
    c = sum(a.astype(int) for a in act)
    u, o = (c == 1), (c > 1)
    out = base.copy()
    for t, a in zip(taus, act):
        lam = 1.0
        if plus:
            shared, unique = int((a & o).sum()), int((a & u).sum())
            rho = np.float32(shared) / np.float32(max(unique, eps))
            lam = float(np.float32(1) + np.float32(r) * np.clip(rho, np.float32(0), np.float32(alpha)))
        out = out + t * a * (lam * u + o / np.maximum(c, 1))
    return out


def model_stock(base: np.ndarray, others: list[np.ndarray], filter_wise: bool = False) -> np.ndarray:
    k = len(others)
    offs = [x - base for x in others]
    if filter_wise:
        last = base.shape[-1] if base.ndim >= 2 else base.size
        offs = [o.reshape(-1, last) for o in offs]
        dot = lambda a, b: (a * b).sum(-1)  # noqa: E731
    else:
        offs = [o.ravel() for o in offs]
        dot = lambda a, b: float(np.dot(a, b))  # noqa: E731
    cos = [np.clip(dot(offs[i], offs[j]) / np.maximum(np.sqrt(dot(offs[i], offs[i]) * dot(offs[j], offs[j])),
                                                       1e-6), -1, 1)
           for i in range(k) for j in range(i + 1, k)]
    c = np.mean(cos, axis=0)
    den = 1 + (k - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, k * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    if filter_wise:
        t = np.repeat(np.atleast_1d(t)[:, None], base.shape[-1] if base.ndim >= 2 else base.size, 1).reshape(base.shape)
    return t * np.mean(others, axis=0) + (1 - t) * base


def multislerp(xs: list[np.ndarray], ws: list[float], base: np.ndarray | None = None, normalize: bool = True,
               eps: float = 1e-8) -> np.ndarray:
    """§2.5, on flattened vectors."""
    if len(xs) == 1:
        return xs[0]
    shape = xs[0].shape
    v = [(x - base if base is not None else x).ravel() for x in xs]
    w = np.array(ws, float)
    if normalize:
        w = w / w.sum()
    r = np.array([np.linalg.norm(x) for x in v])
    u = [x / (ri + eps) for x, ri in zip(v, r)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    if np.linalg.norm(m) < eps:
        out = w[0] * v[0] + w[1] * v[1]
    else:
        m = m / np.linalg.norm(m)
        g = sum(wi * (ui - np.dot(ui, m) * m) for wi, ui in zip(w, u))
        s = np.linalg.norm(g) + eps
        out = (m * np.cos(s) + g * np.sin(s) / s) * np.dot(w, r)
    out = out.reshape(shape)
    return out + base if base is not None else out


def karcher(xs: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """§2.6, on flattened vectors."""
    if len(xs) == 1:
        return xs[0]
    shape, n = xs[0].shape, len(xs)
    v = [x.ravel() for x in xs]
    r = np.array([np.linalg.norm(x) for x in v])
    u = [x / ri if ri > 0 else np.zeros_like(x) for x, ri in zip(v, r)]
    valid = [i for i in range(n) if r[i] > tol]
    if not valid:
        return np.zeros(shape)
    beta = 1 / len(valid)
    m = sum(beta * u[i] for i in valid)
    m = u[valid[0]] if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        t = np.zeros_like(m)
        for i in valid:
            c = float(np.clip(np.dot(m, u[i]), -1, 1))
            th = math.acos(c)
            if th < tol:
                continue
            t += beta * (th / math.sin(th)) * (u[i] - c * m)
        tn = np.linalg.norm(t)
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * t / tn
        if np.linalg.norm(m) > tol:
            m = m / np.linalg.norm(m)
    return (r.sum() / n * m).reshape(shape)


def nuslerp(a: np.ndarray, b: np.ndarray, wa: float, wb: float, base: np.ndarray | None = None,
            flatten: bool = True, row_wise: bool = False) -> np.ndarray:
    """§2.4: vectors are the whole tensor, each row (last axis), or each column (axis 0)."""
    t = 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
    x, y = (a - base, b - base) if base is not None else (a, b)
    if flatten:
        xv, yv = x.reshape(1, -1), y.reshape(1, -1)
    elif row_wise:
        xv, yv = np.moveaxis(x, 0, -1).reshape(-1, x.shape[0]), np.moveaxis(y, 0, -1).reshape(-1, y.shape[0])
    else:
        xv, yv = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    out = np.empty_like(xv)
    for k in range(xv.shape[0]):
        p, q = xv[k], yv[k]
        c = float(np.clip(np.dot(p / max(np.linalg.norm(p), 1e-7), q / max(np.linalg.norm(q), 1e-7)), -1, 1))
        if 1 - c * c <= 1e-16:
            out[k] = (1 - t) * p + t * q
        else:
            th = math.acos(c)
            out[k] = (math.sin((1 - t) * th) * p + math.sin(t * th) * q) / math.sin(th)
    if flatten:
        res = out.reshape(x.shape)
    elif row_wise:
        res = np.moveaxis(out.reshape(*x.shape[1:], x.shape[0]), -1, 0)
    else:
        res = out.reshape(x.shape)
    return res + base if base is not None else res


def della_keep(delta: np.ndarray, density: float, eps: float, seed: int, position: int, tensor: str) -> np.ndarray:
    """§2.8 della_magprune: ranks along axis 1 (whole tensor for 0/1-D), ties by lower index;
    keep iff draw/2^53 < (density − ε) + 2ε·(rank−1)/(n−1)."""
    if density >= 1:
        return np.ones(delta.shape, bool)
    if density <= 0:
        return np.zeros(delta.shape, bool)
    arr = delta.reshape(1, -1, 1) if delta.ndim <= 1 else delta.reshape(delta.shape[0], delta.shape[1], -1)
    mag = np.abs(arr).astype(np.float32)
    rank = np.argsort(np.argsort(mag, axis=1, kind="stable"), axis=1, kind="stable")
    n = arr.shape[1]
    prob = (density - eps) + 2 * eps * rank / (n - 1)
    key = xxhash.xxh3_64_intdigest(f"{seed}\x00{position}\x00{tensor}".encode())
    u = np.array([draw32(key, i) for i in range(delta.size)], dtype=np.float64) / 2.0**32
    return (u < prob.reshape(-1)).reshape(delta.shape)


def sce(base: np.ndarray, others: list[np.ndarray], select_topk: float = 1.0) -> np.ndarray:
    """§2.10 with the top-k of |var| ranked as float32, ties by lower flat index."""
    taus = np.stack([x - base for x in others])
    n = len(others)
    if select_topk <= 0:
        return base.copy()
    if select_topk < 1:
        var = taus.var(axis=0)
        k = math.floor(np.count_nonzero(var.astype(np.float32)) * select_topk)
        flat = np.abs(var.ravel()).astype(np.float32)
        keep = np.zeros(flat.size, bool)
        keep[np.lexsort((np.arange(flat.size), -flat))[:k]] = True
        taus = taus * keep.reshape(var.shape)
    s = np.array([np.mean(t * t) for t in taus])
    s = np.full(n, 1 / n) if abs(s.sum()) < 1e-6 else s / s.sum()
    sign = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    m = [(np.sign(t) == sign) * w for t, w in zip(taus, s)]
    return base + sum(mi * t for mi, t in zip(m, taus)) / np.maximum(sum(m), 1e-6)


def splitmix_draws_np(key: int, count: int) -> np.ndarray:
    """The same 53-bit draws as splitmix_draw, vectorised with numpy's wrapping uint64."""
    i = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.int64)


def arcee_fusion(a: np.ndarray, b: np.ndarray, seed: int = 0, tensor: str = "t") -> np.ndarray:
    """§2.12, the sample (over a million elements) drawn at key (seed, -1, tensor)."""
    last = a.shape[-1] if a.ndim else 1
    av, bv = a.reshape(-1, last), b.reshape(-1, last)

    def softmax(v):  # noqa: ANN001, ANN202
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(bv) + 1e-8, softmax(av) + 1e-8
    imp = (np.abs(bv - av) * (p * np.log(p / q)).sum(-1, keepdims=True)).ravel()
    if imp.size > 1_000_000:
        key = xxhash.xxh3_64_intdigest(f"{seed}\x00-1\x00{tensor}".encode())
        imp_s = np.sort(imp[splitmix_draws_np(key, 1_000_000) % imp.size])
    else:
        imp_s = np.sort(imp)
    qv = lambda x: imp_s[math.floor(x * (imp_s.size - 1))]  # noqa: E731
    thr = qv(0.5) + 1.5 * (qv(0.75) - qv(0.25))
    return (a + (b - a) * (imp >= thr).reshape(a.shape))


def pairwise_sum(row: list[float]) -> float:
    """The fixed order of every per-row float64 sum (README, deviation on whole-tensor statistics):
    zeros appended up to a power of two, then the second half added to the first, one rounded add at
    a time, until one value is left. Plain Python floats: every add is IEEE double addition."""
    width = 1
    while width < len(row):
        width *= 2
    vals = list(row) + [0.0] * (width - len(row))
    while len(vals) > 1:
        half = len(vals) // 2
        vals = [vals[i] + vals[half + i] for i in range(half)]
    return vals[0] if vals else 0.0
