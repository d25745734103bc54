"""Numpy emulation of the index logic of csrc/cuda/attention_forward.cu, attention_backward.cu and seqpool.cu, for
machines without a GPU: a model of the kernels transcribed by hand (it does not read the .cu files), checked against
plain matmuls.

    python scripts/emulate_cuda_kernels.py

Attention: one warp's ldmatrix (plain and .trans) and mma.m16n8k16 fragment layouts, the forward S = Q K^T and P V,
the backward's halves of 32 queries (dV, dK, the dS^T store) and the dQ halves with the quad exchange that feeds the
16-byte reductions; with key-padding lengths, the block loops of both passes (key loop bound, zero-filled tiles, the
partial block's mask, key blocks past the length skipped, L = 0) for one sequence. SeqPool: the lane/chunk column
mapping of every width instantiation (V, C), the per-warp online softmax and the fixed-order warp merge, forward,
lse and backward, with lengths 0, 1, N and at block boundaries (padded rows hold NaN: they must never be read).
Swizzling is left out (swz permutes whole 16-byte chunks within a row and every access goes through it, so it does
not change which elements are read). Change this model together with the kernels; a GPU run
(tests/test_extension.py, tests/test_nan.py) remains the real check.
"""
import numpy as np

# ---- attention: lane L of a warp, g = L >> 2, t4 = L & 3 (the mma fragment coordinates)
L = np.arange(32); G = L >> 2; T4 = L & 3

def ldsm(tile, rows, cols, trans=False):
    # rows/cols: per-lane start address (row, col); returns 4 regs, each (32, 2)
    out = []
    for i in range(4):
        m = np.stack([tile[rows[8*i+j], cols[8*i+j]:cols[8*i+j]+8] for j in range(8)])  # 8x8 matrix i
        if trans: m = m.T
        out.append(np.stack([m[G, 2*T4], m[G, 2*T4+1]], 1))
    return out

def mma(c, a, b0, b1):
    # c: (32,4); a: 4 regs (32,2); b0,b1: (32,2)
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for l in range(32):
        g, t = G[l], T4[l]
        A[g, 2*t:2*t+2], A[g+8, 2*t:2*t+2] = a[0][l], a[1][l]
        A[g, 2*t+8:2*t+10], A[g+8, 2*t+8:2*t+10] = a[2][l], a[3][l]
        B[2*t:2*t+2, g] = b0[l]; B[2*t+8:2*t+10, g] = b1[l]
    C = A @ B
    c = c.copy()
    for l in range(32):
        g, t = G[l], T4[l]
        c[l, 0:2] += C[g, 2*t:2*t+2]; c[l, 2:4] += C[g+8, 2*t:2*t+2]
    return c

def acc_to_mat(acc, ncols):  # acc list of (32,4) tiles -> 16 x ncols
    M = np.zeros((16, ncols))
    for nt, c in enumerate(acc):
        for l in range(32):
            M[G[l], nt*8+2*T4[l]:nt*8+2*T4[l]+2] = c[l, 0:2]; M[G[l]+8, nt*8+2*T4[l]:nt*8+2*T4[l]+2] = c[l, 2:4]
    return M

def acc_to_a(acc):  # 2K tiles -> K fragments
    return [[acc[2*kk][:, 0:2], acc[2*kk][:, 2:4], acc[2*kk+1][:, 0:2], acc[2*kk+1][:, 2:4]]
            for kk in range(len(acc) // 2)]

def load_a(tile, row0):
    return [ldsm(tile, row0 + (L & 15), kk*16 + (L >> 4)*8) for kk in range(4)]

def mma_abt(acc, a, tile, row0=0):
    acc = [c.copy() for c in acc]
    for nt in range(len(acc)):
        b = ldsm(tile, row0 + nt*8 + (L & 7), (L >> 3)*8)
        acc[nt] = mma(acc[nt], a[0], b[0], b[1]); acc[nt] = mma(acc[nt], a[1], b[2], b[3])
        b = ldsm(tile, row0 + nt*8 + (L & 7), 32 + (L >> 3)*8)
        acc[nt] = mma(acc[nt], a[2], b[0], b[1]); acc[nt] = mma(acc[nt], a[3], b[2], b[3])
    return acc

def mma_ab(acc, a, tile, k0=0):
    acc = [c.copy() for c in acc]
    for kk in range(len(a)):
        for dp in range(4):
            b = ldsm(tile, k0 + kk*16 + (L & 15), dp*16 + (L >> 4)*8, trans=True)
            acc[2*dp] = mma(acc[2*dp], a[kk], b[0], b[1]); acc[2*dp+1] = mma(acc[2*dp+1], a[kk], b[2], b[3])
    return acc


def check_attention(rng):
    z = lambda n: [np.zeros((32, 4)) for _ in range(n)]
    K, Q, V, dO = (rng.standard_normal((64, 64)) for _ in range(4))
    warp = 1; r0 = warp*16
    # forward: S = Q_w K^T, O = P V
    s = mma_abt(z(8), load_a(Q, r0), K)
    assert np.allclose(acc_to_mat(s, 64), Q[r0:r0+16] @ K.T)
    P = rng.standard_normal((16, 64))
    # put P into accumulator layout then PV
    ptiles = z(8)
    for nt in range(8):
        for l in range(32):
            c = nt*8 + 2*T4[l]
            ptiles[nt][l, 0:2], ptiles[nt][l, 2:4] = P[G[l], c:c+2], P[G[l]+8, c:c+2]
    o = mma_ab(z(8), acc_to_a(ptiles), V)
    assert np.allclose(acc_to_mat(o, 64), P @ V)
    # backward halves for warp's 16 keys: S^T = K_w Q^T (per half), dV += P^T dO, dP^T = V_w dO^T, dK += dS^T Q
    dv, dk = z(8), z(8); sdS = np.zeros((64, 64)); Delta = rng.standard_normal(64)
    for half in range(2):
        qh = half*32
        st = mma_abt(z(4), load_a(K, r0), Q, qh)
        ST = acc_to_mat(st, 32); assert np.allclose(ST, K[r0:r0+16] @ Q[qh:qh+32].T)
        dv = mma_ab(dv, acc_to_a(st), dO, qh)
        dpt = mma_abt(z(4), load_a(V, r0), dO, qh)
        DPT = acc_to_mat(dpt, 32); assert np.allclose(DPT, V[r0:r0+16] @ dO[qh:qh+32].T)
        # element e of a tile: row g + 8*(e >> 1), query column qh + i*8 + 2*t4 + (e & 1)
        delta = [np.stack([Delta[qh + i*8 + 2*T4 + (e & 1)] for e in range(4)], 1) for i in range(4)]
        ds = [st[i] * (dpt[i] - delta[i]) for i in range(4)]
        dsf = acc_to_a(ds)
        for i in range(4):
            for l in range(32):
                q = qh + i*8 + 2*T4[l]; r = r0 + G[l]
                sdS[r, q:q+2] = dsf[i >> 1][(i & 1)*2][l]; sdS[r+8, q:q+2] = dsf[i >> 1][(i & 1)*2 + 1][l]
        dk = mma_ab(dk, dsf, Q, qh)
    Sfull = K[r0:r0+16] @ Q.T
    DS = Sfull * (V[r0:r0+16] @ dO.T - Delta[None, :])
    assert np.allclose(acc_to_mat(dv, 64), Sfull @ dO)
    assert np.allclose(acc_to_mat(dk, 64), DS @ Q)
    assert np.allclose(sdS[r0:r0+16], DS)
    # dQ for this warp's 16 queries (rows warp*16..) from the full sdS (fill other warps' rows too)
    sdS = np.zeros((64, 64)); DSall = rng.standard_normal((64, 64)); sdS[:] = DSall  # dS^T: row key, col query
    dq_accum = np.zeros((64, 64))
    for half in range(2):
        dq = z(4)
        for kk in range(4):
            a = ldsm(sdS, kk*16 + (L & 7) + (L >> 4)*8, warp*16 + ((L >> 3) & 1)*8, trans=True)
            for dp in range(2):
                bk = ldsm(K, kk*16 + (L & 15), (half*2 + dp)*16 + (L >> 4)*8, trans=True)
                dq[2*dp] = mma(dq[2*dp], a, bk[0], bk[1]); dq[2*dp+1] = mma(dq[2*dp+1], a, bk[2], bk[3])
        odd = (T4 & 1).astype(bool)
        for dt in range(4):
            send0 = np.where(odd, dq[dt][:, 0], dq[dt][:, 2]); send1 = np.where(odd, dq[dt][:, 1], dq[dt][:, 3])
            x0, x1 = send0[L ^ 1], send1[L ^ 1]
            for l in range(32):
                v = [x0[l], x1[l], dq[dt][l, 2], dq[dt][l, 3]] if odd[l] else [dq[dt][l, 0], dq[dt][l, 1], x0[l], x1[l]]
                q = warp*16 + G[l] + (8 if odd[l] else 0); col = (half*4 + dt)*8 + (T4[l] & 2)*2
                dq_accum[q, col:col+4] += v
    assert np.allclose(dq_accum[warp*16:warp*16+16], DSall.T[warp*16:warp*16+16] @ K)
    assert np.count_nonzero(dq_accum[:warp*16]) == 0
    print("attention: forward S, PV; backward halves dV, dK, dS store, dQ halves + quad exchange match")


# ---- attention with key-padding lengths: the block loops of attention_forward.cu / attention_backward.cu for one
# (batch row, head), tile products as plain matmuls (their fragment layouts are checked above)
BLOCK, LOG2E = 64, 1.4426950408889634


def load_tile(src, row0, n):  # load_tile: rows [row0, row0 + 64) of src, rows >= n zero-filled
    t = np.zeros((BLOCK, src.shape[1]))
    rows = np.arange(row0, row0 + BLOCK)
    ok = rows < n
    t[ok] = src[rows[ok]]
    return t


def attn_fwd(q, k, v, L, scale):
    """attn_fwd_kernel over every query block of one sequence with L real keys: (out (N, 64), lse (N,), the number
    of K/V tiles loaded)."""
    N = q.shape[0]
    out, lse = np.full((N, 64), np.nan), np.full(N, np.nan)  # poisoned: every element must be written
    loads = 0
    for q0 in range(0, N, BLOCK):
        rows = np.arange(q0, min(q0 + BLOCK, N))
        if L == 0:  # zero_tile and lse -inf
            out[rows], lse[rows] = 0.0, -np.inf
            continue
        Q = load_tile(q, q0, N)
        m, l, o = np.full(BLOCK, -np.inf), np.zeros(BLOCK), np.zeros((BLOCK, 64))
        k0 = 0
        while k0 < L:  # key blocks past L are never loaded
            K, V = load_tile(k, k0, L), load_tile(v, k0, L)
            loads += 1
            s = Q @ K.T * scale * LOG2E
            s[:, np.arange(k0, k0 + BLOCK) >= L] = -np.inf  # the partial block's padded keys
            mx = np.maximum(m, s.max(1))  # finite: key k0 < L is real
            alpha = np.exp2(m - mx)
            p = np.exp2(s - mx[:, None])
            l, o, m = l * alpha + p.sum(1), o * alpha[:, None] + p @ V, mx
            k0 += BLOCK
        out[rows] = (o / l[:, None])[: len(rows)]
        lse[rows] = ((m + np.log2(l)) / LOG2E)[: len(rows)]
    return out, lse, loads


def attn_bwd(q, k, v, do, out, lse, L, scale):
    """attn_bwd_delta_kernel, attn_bwd_kernel over every key block, attn_bwd_dq_kernel: (dq, dk, dv), each (N, 64),
    and the number of key blocks that ran the query loop."""
    N = q.shape[0]
    delta = (do * out).sum(1)
    dk, dv = np.full((N, 64), np.nan), np.full((N, 64), np.nan)
    dq_accum = np.zeros((N, 64))  # zero-filled by the caller
    looped = 0
    for k0 in range(0, N, BLOCK):
        keys = np.arange(k0, min(k0 + BLOCK, N))
        if k0 >= L:  # padded keys only: zero dK, dV, no query loop
            dk[keys], dv[keys] = 0.0, 0.0
            continue
        K, V = load_tile(k, k0, L), load_tile(v, k0, L)
        pad = np.where(np.arange(k0, k0 + BLOCK) < L, 0.0, np.inf)  # per accumulator row (key)
        dkb, dvb = np.zeros((BLOCK, 64)), np.zeros((BLOCK, 64))
        looped += 1
        for q0 in range(0, N, BLOCK):
            Q, dO = load_tile(q, q0, N), load_tile(do, q0, N)
            qs = np.arange(q0, q0 + BLOCK)
            sL = np.where(qs < N, lse[np.minimum(qs, N - 1)] * LOG2E, np.inf)
            sD = np.where(qs < N, delta[np.minimum(qs, N - 1)], 0.0)
            for qh in (0, 32):  # the halves of 32 queries
                h = slice(qh, qh + 32)
                pt = np.exp2(K @ Q[h].T * scale * LOG2E - sL[None, h] - pad[:, None])
                dvb += pt @ dO[h]
                dst = pt * (V @ dO[h].T - sD[None, h])
                dkb += dst @ Q[h]
                ok = qs[h] < N  # dQ reductions only for rows < N
                dq_accum[qs[h][ok]] += (dst.T @ K)[ok]
        dk[keys], dv[keys] = (dkb * scale)[: len(keys)], dvb[: len(keys)]
    return dq_accum * scale, dk, dv, looped


def check_attention_lengths(rng):
    N, scale = 150, 0.125  # three key/query blocks, the last one partial
    for L in (0, 1, 63, 64, 65, 128, 129, N):
        q, k, v, do = (rng.standard_normal((N, 64)) for _ in range(4))
        k[L:] = v[L:] = np.nan  # padded keys and values are never read (a NaN there would reach out or dQ)
        out, lse, loads = attn_fwd(q, k, v, L, scale)
        dq, dk, dv, looped = attn_bwd(q, k, v, do, out, lse, L, scale)
        assert all(np.isfinite(t).all() for t in (out, dq, dk, dv)), L
        blocks = -(-L // BLOCK)  # a batch pays for its real keys: key blocks past L are skipped
        assert loads == blocks * -(-N // BLOCK) and looped == blocks, (L, loads, looped)
        if L == 0:
            assert not out.any() and not dq.any() and not dk.any() and not dv.any() and np.all(lse == -np.inf)
            continue
        s = q @ k[:L].T * scale  # every query row, padded ones too, against the real keys
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        o = p @ v[:L]
        assert np.allclose(out, o) and np.allclose(lse, np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1))
        ds = p * (do @ v[:L].T - (do * o).sum(1, keepdims=True))
        assert np.allclose(dq, scale * ds @ k[:L]) and np.allclose(dv[:L], p.T @ do)
        assert np.allclose(dk[:L], scale * ds.T @ q)
        assert not dk[L:].any() and not dv[L:].any(), L  # padded keys: exactly zero
    print("attention lengths: key loop bound, partial-block mask, skipped key blocks and L = 0 match (N = 150)")


# ---- seqpool: blocks (b, s) of 16 warps take rows [s*rows, (s+1)*rows); lane columns j*32*V + lane*V (+0..V-1)
WARPS = 16


def splits(B, N):  # seqpool_cuda_splits in csrc/cuda/kernels.h
    want, most = -(-256 // B), N // 32
    return want if want < most else max(most, 1)


def cols(V, C, D):
    # per lane: list of (chunk j, column start) with the whole vector in range
    return [[(j, j*32*V + lane*V) for j in range(C) if j*32*V + lane*V < D] for lane in range(32)]


def seqpool_fwd_block(x, w, b, V, C, n0, n1):
    """One block: its max M, sum L and D accumulators relative to M (the partial, or the row when S == 1)."""
    D = x.shape[1]
    cl = cols(V, C, D)
    ms, ls, accs = [], [], []
    for warp in range(WARPS):
        m, l = -np.inf, 0.0
        acc = np.zeros((32, C, V))
        for n in range(n0 + warp, n1, WARPS):
            xv = np.zeros((32, C, V))
            for lane in range(32):
                for j, c in cl[lane]:
                    xv[lane, j] = x[n, c:c+V]
            s = sum(xv[lane, j] @ w[c:c+V] for lane in range(32) for j, c in cl[lane]) + b
            if s > m:
                r = np.exp(m - s)
                l, acc, m = l * r, acc * r, s
            p = np.exp(s - m)
            l, acc = l + p, acc + p * xv
        ms.append(m), ls.append(l), accs.append(acc)
    M = max(ms)
    L = sum(0.0 if lv == 0 else lv*np.exp(mv - M) for mv, lv in zip(ms, ls))
    sacc = np.zeros(D)
    for warp in range(WARPS):  # the fixed-order warp merge
        r = 0.0 if ls[warp] == 0 else np.exp(ms[warp] - M)
        for lane in range(32):
            for j, c in cl[lane]:
                sacc[c:c+V] += r * accs[warp][lane, j]
    return M, L, sacc


def seqpool_fwd(x, w, b, V, C, S, real):
    """real: the row's real tokens (lengths[b]); blocks take their rows below it only."""
    N = x.shape[0]
    rows = -(-N // S)
    parts = [seqpool_fwd_block(x, w, b, V, C, s * rows, min(real, (s + 1) * rows)) for s in range(S)]
    M = max(p[0] for p in parts)  # seqpool_combine_kernel (S == 1: the block itself, the same arithmetic)
    L = sum(0.0 if p[1] == 0 else p[1] * np.exp(p[0] - M) for p in parts)
    acc = sum((0.0 if p[1] == 0 else p[2] * np.exp(p[0] - M) for p in parts), np.zeros(x.shape[1]))
    return acc * (0.0 if L == 0 else 1.0 / L), -np.inf if L == 0 else M + np.log(L)  # row_inv, row_lse


def seqpool_bwd(g, x, w, b, out, lse, V, C, S, real):
    N, D = x.shape
    cl, rows = cols(V, C, D), -(-N // S)
    gx = np.full_like(x, np.nan)
    gw_rows, gb_rows = np.zeros((S, D)), np.zeros(S)  # one partial row per block, summed by the caller
    for blk in range(S):
        n0, n_end = blk * rows, min(N, (blk + 1) * rows)
        real_end = min(real, n_end)
        for warp in range(WARPS):  # padded rows first: zeros
            for n in range(max(n0, real_end) + warp, n_end, WARPS):
                for lane in range(32):
                    for j, c in cl[lane]:
                        gx[n, c:c+V] = 0.0
        for warp in range(WARPS):
            gwa, db = np.zeros((32, C, V)), 0.0
            for n in range(n0 + warp, real_end, WARPS):
                s = cd = 0.0
                for lane in range(32):
                    for j, c in cl[lane]:
                        s += x[n, c:c+V] @ w[c:c+V]
                        cd += g[c:c+V] @ (x[n, c:c+V] - out[c:c+V])
                p = np.exp(s + b - lse)
                ds = p * cd
                db += ds
                for lane in range(32):
                    for j, c in cl[lane]:
                        gx[n, c:c+V] = p * g[c:c+V] + ds * w[c:c+V]
                        gwa[lane, j] += ds * x[n, c:c+V]
            for lane in range(32):
                for j, c in cl[lane]:
                    gw_rows[blk, c:c+V] += gwa[lane, j]
            gb_rows[blk] += db
    return gx, gw_rows.sum(0), gb_rows.sum()


def check_seqpool(rng):
    # (B, N, D, V, C) as the launchers pick V, C: scalar rows (D not a multiple of the vector), float32 and 16-bit
    # vectors, fewer rows than warps; S from splits(B, N): 1 to 4 blocks per row
    for B, N, D, V, C in [(1, 5, 100, 1, 4), (64, 37, 130, 1, 8), (128, 40, 384, 8, 2), (64, 20, 1024, 4, 8),
                          (2, 3, 1024, 8, 4), (128, 70, 256, 8, 1), (64, 196, 384, 8, 2), (8, 100, 64, 8, 1)]:
        S = splits(B, N)
        rows = -(-N // S)
        assert C * V * 32 >= D
        # lengths: all, none, one, and ones that end inside a block, at a block boundary, inside the first block
        for real in sorted({N, 0, 1, N - 1, min(rows, N), min(rows + 3, N), max(N // 3, 1)}):
            x = rng.standard_normal((N, D))
            x[real:] = np.nan  # padded tokens are never read
            w = rng.standard_normal(D) / np.sqrt(D)
            b = 0.3
            out, lse = seqpool_fwd(x, w, b, V, C, S, real)
            g = rng.standard_normal(D)
            gx, gw, gb = seqpool_bwd(g, x, w, b, out, lse, V, C, S, real)
            assert np.isfinite(out).all() and np.isfinite(gx).all() and not gx[real:].any()
            if real == 0:
                assert not out.any() and lse == -np.inf and not gw.any() and gb == 0
                continue
            xr = x[:real]
            s = xr @ w + b
            p = np.exp(s - s.max())
            p /= p.sum()
            assert np.allclose(out, p @ xr) and np.isclose(lse, np.log(np.exp(s - s.max()).sum()) + s.max())
            ds = p * ((xr - out) @ g)
            assert np.allclose(gx[:real], p[:, None] * g[None] + ds[:, None] * w[None])
            assert np.allclose(gw, ds @ xr) and np.isclose(gb, ds.sum())
    print("seqpool: forward (split over blocks and combined), lse and backward match for every width and for "
          "lengths 0, 1, N and block boundaries")


if __name__ == "__main__":
    check_attention(np.random.default_rng(0))
    check_attention_lengths(np.random.default_rng(2))
    check_seqpool(np.random.default_rng(1))
